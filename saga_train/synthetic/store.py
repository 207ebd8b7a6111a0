"""Where a synthetic supervisor lives, and the refusal to use or overwrite what this package did not write.

The package ships the supervisor of ``SupervisorConfig()`` (``saga_train/synthetic/weights/supervisor-<config
hash>``, ``shipped_dir``); any other config is trained on first use into ``$SAGA_CACHE/supervisor-<config hash>``
(default cache ``~/.cache/saga_kernels``). Either directory loads like a real checkpoint
(``saga_train.model.load_qwen3vl(d)``). Its marker ``SUPERVISOR.json`` records the config, the metrics and the sha256
of every other file (``verify_supervisor`` checks them before use); a non-empty directory without the marker, or
with another config's, is never overwritten (``force`` replaces a supervisor of another config); nothing is ever
written into the package's ``weights/`` (shipping = copying a verified directory there).
"""
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

from ..errors import MissingFileError, UserError
from ..files import damaged, field, one_line, read_json, require_file, safetensors_shapes
from ..model import load_qwen3vl
from ..prompts import PROMPT_STYLES, instruction, prompt_spec
from .answers import FORMAT_VERSION

MARKER = "SUPERVISOR.json"
CACHE_ENV = "SAGA_CACHE"
SHIPPED_ROOT = Path(__file__).with_name("weights")  # supervisors shipped in the package, one directory per config


class SupervisorCacheError(UserError, RuntimeError):
    """The output directory holds something this module did not write (or a different supervisor)."""


def config_hash(cfg) -> str:
    """12 hex digits over the config fingerprint, the answer format version and both prompts' text."""
    from .world import ATTRIBUTE_NAMES

    world = SimpleNamespace(attribute_names=list(ATTRIBUTE_NAMES))  # all the prompt reads from a dataset
    texts = [instruction(prompt_spec("synthetic", world), style) for style in PROMPT_STYLES]
    blob = json.dumps({"config": cfg.fingerprint(), "format": FORMAT_VERSION, "prompts": texts}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cache_root() -> Path:
    """``$SAGA_CACHE``, else ``~/.cache/saga_kernels``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "saga_kernels")


def supervisor_dir(cfg) -> Path:
    """The cache directory of the supervisor trained with ``cfg``."""
    return cache_root() / f"supervisor-{config_hash(cfg)}"


MARKER_FIELDS = {"hash": str, "complete": bool, "config": dict, "metrics": (dict, type(None)),
                 "sha256": (dict, type(None))}


def read_marker(path) -> dict:
    """The marker of a supervisor directory, or None when there is none; a marker that is empty, truncated, garbage,
    not a JSON object, or without one of ``MARKER_FIELDS`` (or with a value of another type) raises
    ``SupervisorCacheError`` naming it."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    record = read_json(marker, error=SupervisorCacheError)
    for key, kind in MARKER_FIELDS.items():
        field(record, key, kind, path=marker, error=SupervisorCacheError)
    for name, digest in (record["sha256"] or {}).items():
        if not isinstance(digest, str):
            raise damaged(marker, f"'sha256'[{name!r}] must be a string, got {digest!r}", error=SupervisorCacheError)
    return record


def shipped_dir(cfg):
    """The supervisor of ``cfg`` shipped inside the package (``saga_train/synthetic/weights/supervisor-<hash>``), or
    None when none is shipped for this config."""
    path = SHIPPED_ROOT / f"supervisor-{config_hash(cfg)}"
    return path if (path / MARKER).is_file() else None


def file_digests(path) -> dict:
    """``{file name: sha256 hex}`` of every file in a supervisor directory but the marker (which records them)."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(Path(path).iterdir()) if f.is_file() and f.name != MARKER}


def verify_supervisor(path, cfg=None) -> dict:
    """The marker of a complete supervisor directory whose files match their recorded sha256 (and, given ``cfg``,
    whose config hash is ``cfg``'s); raises ``SupervisorCacheError`` naming what is missing, different or corrupt."""
    marker = read_marker(path)
    if marker is None or not marker.get("complete"):
        raise SupervisorCacheError(f"{path} is not a complete supervisor (no complete {MARKER})")
    if marker["metrics"] is None:
        raise damaged(Path(path) / MARKER, "a complete supervisor's marker without 'metrics'",
                      error=SupervisorCacheError)
    if cfg is not None and marker.get("hash") != config_hash(cfg):
        raise SupervisorCacheError(f"{path} holds the supervisor of config {marker.get('hash')}, "
                                   f"not {config_hash(cfg)}")
    recorded, found = marker.get("sha256") or {}, file_digests(path)
    if not recorded:
        raise SupervisorCacheError(f"{path}: {MARKER} records no sha256")
    kinds = {"missing": sorted(set(recorded) - set(found)), "added": sorted(set(found) - set(recorded)),
             "changed": sorted(n for n in set(recorded) & set(found) if recorded[n] != found[n])}
    if any(kinds.values()):
        raise SupervisorCacheError(f"{path}: files changed since it was written: "
                                   + "; ".join(f"{kind} {names}" for kind, names in kinds.items() if names))
    return marker


def check_writable(path, cfg, force: bool = False) -> str:
    """What to do with ``path``: "reuse" (a complete supervisor of this config), or "train".

    Raises ``SupervisorCacheError`` when ``path`` is a non-empty directory (or a file) without our
    marker, or holds a supervisor of another config and ``force`` is False.
    """
    path = Path(path)
    if path.resolve().is_relative_to(SHIPPED_ROOT.resolve()):
        raise SupervisorCacheError(f"refusing to write into the package's shipped weights ({path}); train into the "
                                   "cache (the default --out), then copy the directory into "
                                   f"{SHIPPED_ROOT} to ship it")
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return "train"
    marker = read_marker(path) if path.is_dir() else None
    if marker is None:
        raise SupervisorCacheError(f"refusing to overwrite {path}: it exists and was not written by "
                                   f"saga_train.synthetic.supervisor (no {MARKER})")
    same = marker.get("hash") == config_hash(cfg)
    if same and marker.get("complete") and not force:
        return "reuse"
    if not same and marker.get("complete") and not force:
        raise SupervisorCacheError(f"{path} holds a supervisor of another config (hash {marker.get('hash')}, "
                                   f"wanted {config_hash(cfg)}); pass force=True (--force) to replace it")
    return "train"


def write_marker(path: Path, cfg, complete: bool, metrics: dict = None) -> None:
    record = {"written_by": "saga_train.synthetic.supervisor", "format": FORMAT_VERSION, "hash": config_hash(cfg),
              "complete": complete, "config": dataclasses.asdict(cfg), "metrics": metrics,
              "sha256": file_digests(path) if complete else None}
    (path / MARKER).write_text(json.dumps(record, indent=2))


def load_supervisor(path, attn_implementation: str = None):
    """``(model, processor)`` of a saved supervisor directory (offline; a Qwen3-VL checkpoint like any other,
    loaded by ``saga_train.model.load_qwen3vl``).

    Its files are checked first, so that a damaged one is named: a missing directory, config.json or weights raise
    ``MissingFileError``; an empty, truncated or garbage JSON or safetensors file, a config.json transformers cannot
    use, tokenizer / processor files it cannot load, or weights without a tensor of the model (or with one of another
    shape) raise ``SupervisorCacheError`` naming the file and what is wrong."""
    import torch
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    from ..model import QWEN3VL_MODEL_TYPES
    from ..processor import load_processor

    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"supervisor directory {path} does not exist")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise MissingFileError(f"{path} is not a saved supervisor: no *.safetensors weights in it")
    config_path = require_file(path / "config.json", hint=" (the supervisor's model config)")
    for name in sorted(path.glob("*.json")):
        read_json(name, error=SupervisorCacheError)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        if config.model_type not in QWEN3VL_MODEL_TYPES:
            raise ValueError(f"model_type {config.model_type!r} is not Qwen3-VL's ('qwen3_vl')")
        with torch.device("meta"):  # the tensors the weights must hold, without allocating them
            wanted = {k: tuple(v.shape) for k, v in Qwen3VLForConditionalGeneration(config).state_dict().items()}
    except Exception as e:  # transformers' config validation raises several types (ValueError, TypeError, ...)
        raise damaged(config_path, f"not a usable Qwen3-VL config ({type(e).__name__}: {e})",
                      error=SupervisorCacheError) from e
    shapes = {}
    for name in weights:
        shapes.update(safetensors_shapes(name, error=SupervisorCacheError))
    where = weights[0] if len(weights) == 1 else path
    other = [f"{k!r} {shapes[k]} (wanted {shape})" for k, shape in wanted.items() if k in shapes and shapes[k] != shape]
    if other:
        raise damaged(where, f"{len(other)} tensor(s) of another shape than config.json gives: {', '.join(other[:3])}",
                      error=SupervisorCacheError)
    try:
        load_processor(path)
    except Exception as e:  # tokenizers / transformers raise KeyError, ValueError, OSError, ... for damaged files
        names = ", ".join(sorted(f.name for f in path.iterdir() if f.name.startswith(("tokenizer", "processor",
                                                                                          "chat_template"))))
        raise SupervisorCacheError(one_line(f"{path}: its tokenizer and processor files ({names}) cannot be loaded "
                                            f"({type(e).__name__}: {e})")) from e
    try:
        model, processor = load_qwen3vl(str(path), attn_implementation=attn_implementation)
    except Exception as e:  # what the checks above did not foresee, still named by directory
        raise SupervisorCacheError(one_line(f"{path}: cannot load the supervisor ({type(e).__name__}: {e})")) from e
    state = model.state_dict()
    stored = {state[k].data_ptr() for k in state if k in shapes}  # tied weights are stored once
    missing = [k for k in state if k not in shapes and state[k].data_ptr() not in stored]
    if missing:
        raise damaged(where, f"{len(missing)} tensor(s) of the model missing: {', '.join(missing[:3])}",
                      error=SupervisorCacheError)
    return model, processor
