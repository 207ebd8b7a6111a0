"""The sm_90 compile table of every kernel, built on a machine without a GPU.

    python benchmarks/compile_report.py --out benchmarks/results/sm90-compile.md [--json FILE]

Collects the ``AOT_SPECS`` lists of the test modules (each lists its kernels at Qwen3-VL-8B / real
shapes, with the launch configuration the launcher uses), compiles them for sm_90a with the JIT's
alignment hints (``tests/aot.py``) and writes one markdown row per compiled variant: registers, spilled
bytes, shared memory, wgmma instructions and whether the kernel is fit for an H100 (no spills,
<= 255 registers, shared < 228 KB, wgmma where a half-precision dot is expected).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRITON_INTERPRET", "1")  # importing the test modules must not need a GPU

from aot import compile_specs, problems  # noqa: E402


def collect_specs() -> list:
    """Every ``AOT_SPECS`` entry of tests/test_*.py, in file order."""
    specs = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        if "AOT_SPECS" not in path.read_text():
            continue
        specs.extend(getattr(importlib.import_module(path.stem), "AOT_SPECS", []))
    return specs


def markdown(reports: list[dict]) -> str:
    lines = ["| kernel [variant] | warps / stages | registers | spill bytes | shared bytes | wgmma | fit |",
             "|---|---|---|---|---|---|---|"]
    for r in reports:
        bad = problems(r)
        lines.append(f"| {r['name']} | {r['num_warps']} / {r['num_stages']} | {r['registers']} | {r['spill_bytes']} "
                     f"| {r['shared']} | {r['wgmma']} | {'yes' if not bad else '; '.join(bad)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="markdown file to write (default: print)")
    parser.add_argument("--json", help="also write the reports as JSON")
    args = parser.parse_args(argv)
    reports = compile_specs(collect_specs())
    table = markdown(reports)
    if args.out:
        pathlib.Path(args.out).write_text(table)
    else:
        print(table)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(reports, indent=1))
    return 1 if any(problems(r) for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
