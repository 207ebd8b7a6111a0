"""The synthetic supervisor's answer format: pure functions shared with its training, its evaluation and the tiny
model's vocabulary.

The answer (METHOD.md) describes item 1 and item 2 attribute by attribute, then the differences, a confidence, the
reasoning and the verdict::

    {"item 1": "red body color, blue wing color, ..., fan tail shape", "item 2": "...",
     "differences": "body color red vs red match, wing color blue vs green differ, ...",
     "confidence": "high", "reasoning": "<n> of <m> attributes differ", "same_species": "yes" | "no"}
"""
import json
import re

from ..prompts import ITEM_KEYS, instruction, pair_messages
from ..verdict import parse_verdict

FORMAT_VERSION = 4  # of the answer format and the supervisor recipe: part of every supervisor's config hash
VERDICT_KEY = "same_species"
MATCH, DIFFER = "match", "differ"


def describe(attrs: dict, attribute_names) -> str:
    """One item's description: ``"<value> <attribute>, ..."``, e.g. ``"red body color, long beak shape"``."""
    return ", ".join(f"{attrs[n]} {n}" for n in attribute_names)


def answer_dict(attrs_a: dict, attrs_b: dict, attribute_names, verdict_key: str = VERDICT_KEY) -> dict:
    """The target answer as a dict: both items described, match/differ per attribute, the verdict.

    Verdict "yes" iff every listed attribute agrees (a synthetic class IS its attribute combination).
    Values are short strings (not nested objects) to keep the answer near 140 word-level tokens. The
    differences block repeats both values next to each other ("wing color red vs blue differ") so
    match/differ is decided from adjacent tokens, not from two lists far apart.
    """
    names = list(attribute_names)
    missing = [n for n in names if n not in attrs_a or n not in attrs_b]
    if missing:
        raise KeyError(f"attributes {missing} are missing from attrs_a or attrs_b")
    same = [attrs_a[n] == attrs_b[n] for n in names]
    return {
        ITEM_KEYS[0]: describe(attrs_a, names),
        ITEM_KEYS[1]: describe(attrs_b, names),
        "differences": ", ".join(f"{n} {attrs_a[n]} vs {attrs_b[n]} {MATCH if ok else DIFFER}"
                                 for n, ok in zip(names, same)),
        "confidence": "high",
        "reasoning": f"{same.count(False)} of {len(names)} attributes differ",
        verdict_key: "yes" if all(same) else "no",
    }


def build_answer(attrs_a: dict, attrs_b: dict, attribute_names, verdict_key: str = VERDICT_KEY) -> str:
    """The target answer text: ``json.dumps(answer_dict(...))``."""
    return json.dumps(answer_dict(attrs_a, attrs_b, attribute_names, verdict_key))


def _string_after(text: str, key: str) -> str:
    """The quoted string after ``"key":`` (whitespace-tolerant), or ""."""
    match = re.search(r'"\s*' + re.escape(key) + r'\s*"\s*:\s*"([^"]*)"', text)
    return match.group(1) if match else ""


def _split_named(text: str, attribute_names, name_last: bool) -> dict:
    """``{attribute: word}`` from ``"<word> <attribute>, ..."`` (or ``"<attribute> <word>, ..."``)."""
    names = sorted(attribute_names, key=len, reverse=True)  # longest first: "wing color" before "color"
    found = dict.fromkeys(attribute_names)
    for part in (p.strip() for p in text.split(",")):
        for name in names:
            if name_last and part.endswith(" " + name):
                word = part[:-len(name)]
            elif not name_last and part.startswith(name + " "):
                word = part[len(name):]
            else:
                continue
            if found[name] is None:  # the first mention counts
                found[name] = word.strip()
            break
    return found


def _last_word(text, allowed):
    """The last word of ``text`` when it is one of ``allowed``, else None."""
    words = (text or "").split()
    return words[-1] if words and words[-1] in allowed else None


def parse_answer(text: str, attribute_names, verdict_key: str = VERDICT_KEY) -> dict:
    """Read an answer back, tolerating broken JSON: ``{"item 1": {attr: value | None}, "item 2": ...,
    "differences": {attr: "match" | "differ" | None}, "verdict": True | False | None}``.

    Each field is searched for on its own, so a truncated or garbled completion still scores on
    what it got right. The verdict is read by ``saga_train.verdict.parse_verdict``, as the SAGA
    reward reads it.
    """
    out = {key: _split_named(_string_after(text, key), attribute_names, name_last=True) for key in ITEM_KEYS}
    compared = _split_named(_string_after(text, "differences"), attribute_names, name_last=False)
    out["differences"] = {n: _last_word(v, (MATCH, DIFFER)) for n, v in compared.items()}
    out["verdict"] = parse_verdict(text, verdict_key)
    return out


def vocabulary(spec, dataset=None) -> list:
    """Every text the tiny model reads or writes for ``spec`` (the words of its word-level tokenizer): both
    prompt styles, the attribute values of ``dataset`` (when it has any) and the answer format of ``build_answer``.

    The tokenizer numbers words in order of first appearance, so this order fixes the supervisor's token ids.
    """
    texts = [instruction(spec, "dataset"), instruction(spec, "generic")]
    texts += [part.get("text", "") for m in pair_messages(spec) for part in m["content"]]
    texts += [" ".join(values) for values in (getattr(dataset, "attribute_values", None) or {}).values()]
    classes = getattr(dataset, "class_attributes", None) or [{}]
    texts += [" ".join(attrs.values()) for attrs in classes]
    example = {name: classes[0].get(name, "") for name in spec.attributes}
    texts.append(build_answer(example, example, spec.attributes, spec.verdict_key))
    texts += [MATCH, DIFFER, "yes no high medium low"]
    return texts
