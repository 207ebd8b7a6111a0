"""Readers of the files the project reads (JSON, safetensors, faiss indexes, images, text tables) whose errors name
the file and say what is wrong with it, instead of a bare ``SafetensorError: incomplete metadata``.

Every reader takes ``error``, the ``UserError`` subclass it raises for a damaged file (``DamagedFileError`` by
default; the embedder loader passes ``ModelLoadError``, the dataset readers ``DatasetError``, the supervisor store
``SupervisorCacheError``), and ``what``, an optional prefix naming what the file belongs to ("CUB-200-2011"). A file
that does not exist raises ``MissingFileError``; one that is empty, truncated, garbage, of another format or without
a key it needs raises ``error("<what>: <path>: <what is wrong>")``.
"""
from __future__ import annotations

import json
import os
import re

from .errors import DamagedFileError, MissingFileError, UserError

JSON_KINDS = {dict: "a JSON object", list: "a JSON array", str: "a string", int: "an integer", float: "a number",
              bool: "true or false", type(None): "null"}


def _where(path, what=None) -> str:
    return f"{what}: {path}" if what else str(path)


def one_line(text) -> str:
    """``text`` on one line (a library's multi-line message inside ours): line breaks and the indents after them
    become single spaces."""
    return re.sub(r"\s*\n\s*", " ", str(text)).strip()


def damaged(path, problem: str, *, error=DamagedFileError, what=None) -> UserError:
    """The exception (to raise) for the file ``path`` and its ``problem``: ``error("<what>: <path>: <problem>")``, on
    one line."""
    return error(one_line(f"{_where(path, what)}: {problem}"))


def require_file(path, *, what=None, hint: str = "") -> str:
    """``path`` when it is a file, else ``MissingFileError`` naming it (plus ``hint``)."""
    if not os.path.isfile(path):
        state = "is not a file" if os.path.exists(path) else "does not exist"
        raise MissingFileError(f"{_where(path, what)} {state}{hint}")
    return str(path)


def read_bytes(path, *, error=DamagedFileError, what=None, allow_empty: bool = False) -> bytes:
    """The bytes of ``path``: ``MissingFileError`` when it is missing, ``error`` when unreadable or (unless
    ``allow_empty``) empty."""
    require_file(path, what=what)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise damaged(path, f"cannot read it ({e.strerror or e})", error=error, what=what) from e
    if not allow_empty and not raw.strip():
        raise damaged(path, "the file is empty", error=error, what=what)
    return raw


def kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(JSON_KINDS.get(k, k.__name__) for k in kinds)


def is_kind(value, kind) -> bool:
    """``isinstance(value, kind)`` as JSON means it: a bool is not a number, an int is a float."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int) and float in kinds:
        return True
    return isinstance(value, kinds)


def _short(value) -> str:
    text = repr(value)
    return f"{JSON_KINDS.get(type(value), type(value).__name__)} {text[:60]}{'...' if len(text) > 60 else ''}"


def read_json(path, *, error=DamagedFileError, what=None, kind=dict):
    """The JSON value in ``path``, checked to be a ``kind`` (None: any). Empty, garbage (not UTF-8), truncated or
    otherwise invalid JSON, or another kind of value, raises ``error`` naming the file."""
    raw = read_bytes(path, error=error, what=what)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise damaged(path, f"not a JSON file: byte {e.start} is not UTF-8 text (garbage or a binary file)",
                      error=error, what=what) from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise damaged(path, f"not valid JSON, truncated or damaged ({e.msg}: line {e.lineno} column {e.colno})",
                      error=error, what=what) from e
    if kind is not None and not is_kind(data, kind):
        raise damaged(path, f"holds {_short(data)}, not {kind_name(kind)}", error=error, what=what)
    return data


def field(data: dict, key: str, kind, *, path, error=DamagedFileError, what=None, where: str = ""):
    """``data[key]`` (``data`` read from ``path``), checked to be a ``kind`` (a type or a tuple of types, as
    ``is_kind``); a missing key or a value of another kind raises ``error`` naming the file (and ``where`` in it)."""
    if key not in data:
        raise damaged(path, f"{where}missing key {key!r}", error=error, what=what)
    value = data[key]
    if not is_kind(value, kind):
        raise damaged(path, f"{where}{key!r} must be {kind_name(kind)}, got {_short(value)}", error=error, what=what)
    return value


def list_field(data: dict, key: str, item_kind, *, path, error=DamagedFileError, what=None, where: str = "") -> list:
    """``data[key]``, checked to be a list of ``item_kind`` values (the first bad item is named)."""
    values = field(data, key, list, path=path, error=error, what=what, where=where)
    for i, value in enumerate(values):
        if not is_kind(value, item_kind):
            raise damaged(path, f"{where}{key!r}[{i}] must be {kind_name(item_kind)}, got {_short(value)}",
                          error=error, what=what)
    return values


def read_lines(path, *, error=DamagedFileError, what=None) -> list:
    """``(line number, text)`` of every line of the UTF-8 text file ``path`` (blank ones included); a line that is
    not UTF-8 raises ``error`` naming ``path:line``. An empty file gives ``[]``."""
    raw = read_bytes(path, error=error, what=what, allow_empty=True)
    lines = []
    for n, line in enumerate(raw.split(b"\n"), 1):
        try:
            text = line.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{_where(path, what)}:{n}: not UTF-8 text (byte {e.start + 1} of the line): garbage or a "
                        "binary file") from e
        lines.append((n, text.rstrip("\r")))
    return lines


def _safetensors_problem(e) -> str:
    return f"not a readable safetensors file, truncated or damaged ({e})"


def read_safetensors(path, *, error=DamagedFileError, what=None, keys=()) -> dict:
    """The tensors of the safetensors file ``path`` (on the CPU), which must hold every name in ``keys``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    require_file(path, what=what)
    if os.path.getsize(path) == 0:
        raise damaged(path, "the file is empty", error=error, what=what)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise damaged(path, _safetensors_problem(e), error=error, what=what) from e
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise damaged(path, f"no tensor {', '.join(map(repr, missing))} (it holds {few(sorted(tensors))})",
                      error=error, what=what)
    return tensors


def safetensors_shapes(path, *, error=DamagedFileError, what=None) -> dict:
    """``{name: shape}`` from the header of the safetensors file ``path`` (no tensor is read; a truncated file is
    still found, since the header must cover the whole file)."""
    from safetensors import SafetensorError, safe_open

    require_file(path, what=what)
    if os.path.getsize(path) == 0:
        raise damaged(path, "the file is empty", error=error, what=what)
    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise damaged(path, _safetensors_problem(e), error=error, what=what) from e


def few(names, count: int = 3) -> str:
    """At most ``count`` names, then how many more: ``'a', 'b', 'c' and 4 more``."""
    names = list(names)
    shown = ", ".join(map(repr, names[:count])) or "nothing"
    return shown + (f" and {len(names) - count} more" if len(names) > count else "")


def state_dict_problems(expected: dict, loaded: dict) -> str:
    """What keeps ``loaded`` (name -> tensor) from being loaded into a module whose state dict is ``expected``:
    missing or unexpected names, other shapes, tensors that are not floating point; "" when it fits."""
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    shapes = [f"{k!r} {tuple(loaded[k].shape)} (wanted {tuple(expected[k].shape)})" for k in sorted(expected)
              if k in loaded and tuple(loaded[k].shape) != tuple(expected[k].shape)]
    dtypes = [k for k in sorted(loaded) if k in expected and expected[k].is_floating_point()
              and not loaded[k].is_floating_point()]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing: {few(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensor(s): {few(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} of another shape: {', '.join(shapes[:3])}" + (" ..." if len(shapes) > 3 else ""))
    if dtypes:
        parts.append(f"{len(dtypes)} not floating point: {few(dtypes)}")
    return "; ".join(parts)


def _faiss_problem(e) -> str:
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", text)


def read_faiss_index(path, *, error=DamagedFileError, what=None):
    """The faiss index saved in ``path``."""
    import faiss

    require_file(path, what=what)
    if os.path.getsize(path) == 0:
        raise damaged(path, "the file is empty", error=error, what=what)
    try:
        return faiss.read_index(str(path))
    except (RuntimeError, MemoryError) as e:
        raise damaged(path, f"not a readable faiss index, truncated or damaged ({_faiss_problem(e)})", error=error,
                      what=what) from e


def open_image(path, *, error=DamagedFileError, what=None):
    """The image at ``path`` as a decoded RGB ``PIL.Image``; a missing, empty, truncated or garbage file raises
    ``error("<what>: cannot read image <path>: <why>")``."""
    from PIL import Image, UnidentifiedImageError

    prefix = f"{what}: " if what else ""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL raises several types (OSError, SyntaxError, ValueError, ...) for damaged files
        if isinstance(e, FileNotFoundError):
            why = "no such file"
        elif os.path.isfile(path) and os.path.getsize(path) == 0:
            why = "the file is empty"
        elif isinstance(e, UnidentifiedImageError):
            why = "not an image PIL can read (garbage or another format)"
        elif "truncated" in str(e):
            why = f"truncated ({e})"
        else:
            why = f"{type(e).__name__}: {e}"
        raise error(one_line(f"{prefix}cannot read image {path}: {why}")) from e


__all__ = ["damaged", "few", "field", "is_kind", "kind_name", "list_field", "one_line", "open_image", "read_bytes",
           "read_faiss_index", "read_json", "read_lines", "read_safetensors", "require_file", "safetensors_shapes",
           "state_dict_problems"]
