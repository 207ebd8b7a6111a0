"""``python -m saga_train.synthetic``: train (or reuse) the synthetic-world supervisor of a ``SupervisorConfig``.

Retrains from scratch into the cache (``--out`` elsewhere, never inside the package) and prints its metrics next to
the shipped ones.
"""
import argparse
import json
import sys
from pathlib import Path

from ..config import add_dataclass_flags
from ..errors import UserError
from .store import CACHE_ENV, check_writable, read_marker, shipped_dir, supervisor_dir
from .supervisor import SupervisorConfig, ensure_supervisor


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m saga_train.synthetic",
                                     description="Train (or reuse) the synthetic-world supervisor.")
    add_dataclass_flags(parser, SupervisorConfig)
    parser.add_argument("--out", default=None, help=f"output directory (default: <cache>/supervisor-<config hash>, "
                                                    f"<cache> = ${CACHE_ENV} or ~/.cache/saga_kernels); never "
                                                    "inside the package")
    parser.add_argument("--force", action="store_true", help="retrain even if a complete supervisor is cached")
    return parser


def _number(value) -> float:
    """``value`` as a float, NaN when a (hand-edited) marker holds something else."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")


def describe_metrics(metrics: dict) -> str:
    """One line per prompt style: verdict accuracy (per pair kind) and per-attribute accuracy on held-out pairs."""
    lines = []
    for key, style in (("heldout", "dataset prompt"), ("heldout_generic", "generic prompt")):
        held = (metrics or {}).get(key)
        if not isinstance(held, dict) or not held:
            continue
        kinds = held.get("verdict_accuracy_by_kind")
        kinds = kinds if isinstance(kinds, dict) else {}
        attributes = held.get("attribute_accuracy_by_name")
        attributes = attributes if isinstance(attributes, dict) else {}
        lines.append(f"{style}: verdict {_number(held.get('verdict_accuracy')):.3f} "
                     f"(same {_number(kinds.get('same')):.2f}, one attribute {_number(kinds.get('one_attribute')):.2f}"
                     f", random {_number(kinds.get('random')):.2f}; chance 0.5), attributes "
                     + ", ".join(f"{n} {_number(v):.2f}" for n, v in attributes.items())
                     + f" ({held.get('pairs', '?')} held-out-class pairs)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
    out, force = args.pop("out"), args.pop("force")
    try:
        cfg = SupervisorConfig(**args)
        target = Path(out) if out else supervisor_dir(cfg)
        reused = check_writable(target, cfg, force) == "reuse"
        path = ensure_supervisor(cfg, target, force=force)
        metrics = read_marker(path)["metrics"] or {}
        shipped = shipped_dir(cfg)
        shipped_metrics = read_marker(shipped)["metrics"] if shipped is not None else None
    except (UserError, ValueError) as e:  # a setting, a foreign, missing or damaged directory or file
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2))
    print(f"supervisor {'reused from' if reused else 'saved to'} {path} "
          f"(trained {metrics.get('train_seconds', '?')} s)")
    print(describe_metrics(metrics))
    if shipped is not None and shipped.resolve() != path.resolve():
        print(f"the shipped supervisor of this config ({shipped}), for comparison:")
        print(describe_metrics(shipped_metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
