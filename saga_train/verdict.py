"""Read the verdict (and the item-description spans) out of a sampled completion.

The answer is asked for as JSON, but completions may wrap it in text, or come from a word-level
tokenizer whose decode puts spaces around punctuation. So: balanced ``{...}`` blocks are tried
with ``json.loads`` first, then a whitespace-tolerant pattern on the raw text. Nothing found ->
``None`` (reward 0, counted by the caller as unparseable).
"""
import json
import re

_YES = {"yes", "true"}
_NO = {"no", "false"}


def _json_blocks(text: str):
    """Every balanced top-level ``{...}`` substring of ``text``, in order."""
    depth, start = 0, None
    for i, ch in enumerate(text):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                yield text[start:i + 1]


def _as_verdict(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _YES | _NO:
        return value.strip().lower() in _YES
    return None


def parse_verdict(text: str, key: str):
    """True for "yes", False for "no", None when ``key`` with a yes/no value cannot be found."""
    for block in _json_blocks(text):
        try:
            data = json.loads(block)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and key in data:
            verdict = _as_verdict(data[key])
            if verdict is not None:
                return verdict
    pattern = r'"?\s*' + re.escape(key) + r'\s*"?\s*[:=]\s*"?\s*(yes|no|true|false)\b'
    matches = re.findall(pattern, text, flags=re.IGNORECASE)
    return _as_verdict(matches[-1]) if matches else None


def item_span(text: str, item: str):
    """Character range ``(start, end)`` of the value describing ``item`` ("item 1"), or None.

    The value is the ``{...}`` object (or quoted string) after the key ``"item 1":``; these are the
    completion tokens that "describe" that image for L_KL (METHOD.md).
    """
    key = r'"\s*' + r"\s*".join(re.escape(w) for w in item.split()) + r'\s*"\s*:\s*'
    match = re.search(key, text)
    if match is None:
        return None
    start = match.end()
    if start < len(text) and text[start] == "{":
        depth = 0
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return (start, i + 1)
        return None
    if start < len(text) and text[start] == '"':
        end = text.find('"', start + 1)
        return (start, end + 1) if end > start else None
    return None


def attributes_right(described: dict, truths) -> list:
    """``[[bool] * A for each item]``: whether each attribute value an answer describes (``described``: ``{"item 1":
    {attribute: value | None}, "item 2": ...}``) is the true one (``truths``: the two items' ``{attribute: value}``;
    the order of their keys)."""
    from .prompts import ITEM_KEYS

    return [[same_value((described.get(item) or {}).get(name), value) for name, value in truth.items()]
            for item, truth in zip(ITEM_KEYS, truths)]


def same_value(got, want) -> bool:
    """A described attribute value equals the true one (stripped, case-insensitive); None (not described) never does."""
    return got is not None and str(got).strip().lower() == str(want).strip().lower()
