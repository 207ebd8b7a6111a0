"""Turn pytest-benchmark JSON files into a markdown table of ratios against saga, same run.

Usage: python benchmarks/summarize.py [--out table.md] [--merged all.json] results.json [more.json ...]

Benchmarks are parametrized by a provider (param named ``provider``); every other parameter
forms the comparison group. For each group the table lists each provider's median time and
peak memory (``extra_info["peak_bytes"]``) and its ratio to the ``saga`` provider's (no memory
ratio against a CPU RSS-delta base under 1 MiB: page noise), and the vocabulary matmul flops counted in one call
per N_live H V where the benchmark recorded them (``extra_info["flops_per_NliveHV"]``). A run that
ran out of memory (``extra_info["oom"]`` set) shows OOM instead of a time. ``--merged`` writes
the benchmarks of all inputs into one JSON file (machine info of the first input).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

PROVIDER_KEYS = ("provider", "impl")
CPU_NOISE_BYTES = 2**20


def _split(bench: dict) -> tuple[str, str]:
    params = dict(bench.get("params") or {})
    provider = next((str(params.pop(k)) for k in PROVIDER_KEYS if k in params), "saga")
    module = bench.get("fullname", "").split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
    func = (f"{module}::" if module else "") + bench["name"].split("[", 1)[0]
    rest = ", ".join(f"{k}={v}" for k, v in sorted(params.items()))
    return f"{func}({rest})", provider


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.1f} MiB"


def _measured(bench: dict | None) -> bool:
    return bench is not None and not (bench.get("extra_info") or {}).get("oom")


def _row(key: str, provider: str, b: dict, base: dict | None) -> str:
    info = b.get("extra_info") or {}
    flops = info.get("flops_per_NliveHV")
    flops = f"{flops:.2f}" if flops is not None else "-"
    if info.get("oom"):
        return f"| {key} | {provider} | OOM | - | OOM | - | {flops} |"
    t = b["stats"]["median"]
    mem = info.get("peak_bytes")
    t_ratio = f"{t / base['stats']['median']:.2f}x" if _measured(base) else "-"
    base_info = (base.get("extra_info") or {}) if _measured(base) else {}
    base_mem = base_info.get("peak_bytes")
    if base_info.get("peak_method") == "cpu.VmHWM" and (base_mem or 0) < CPU_NOISE_BYTES:
        base_mem = None  # page-granular RSS deltas this small are noise, not a base for a ratio
    m_ratio = f"{mem / base_mem:.2f}x" if mem is not None and base_mem else "-"
    return f"| {key} | {provider} | {t * 1e3:.3f} ms | {t_ratio} | {_fmt_bytes(mem)} | {m_ratio} | {flops} |"


def summarize(data: dict) -> str:
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in data.get("benchmarks", []):
        key, provider = _split(bench)
        groups[key][provider] = bench
    machine = data.get("machine_info", {})
    devices = sorted({str(b["extra_info"]["device"]) for b in data.get("benchmarks", [])
                      if (b.get("extra_info") or {}).get("device")})
    lines = [
        f"Machine: {machine.get('node', '?')}, {machine.get('cpu', {}).get('brand_raw', '?')}; "
        f"device: {', '.join(devices) or '?'}",
        "",
        "| benchmark | provider | median time | time / saga | peak extra memory | memory / saga | flops / N_live H V |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in sorted(groups):
        runs = groups[key]
        for provider in sorted(runs, key=lambda p: (p != "saga", p)):
            lines.append(_row(key, provider, runs[provider], runs.get("saga")))
    return "\n".join(lines) + "\n"


def merge(datas: list[dict]) -> dict:
    """One pytest-benchmark document holding every input's benchmarks."""
    merged = dict(datas[0]) if datas else {}
    merged["benchmarks"] = [b for d in datas for b in d.get("benchmarks", [])]
    return merged


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="pytest-benchmark JSON files")
    parser.add_argument("--out", help="write the markdown table here too")
    parser.add_argument("--merged", help="write all inputs' benchmarks into this JSON file")
    args = parser.parse_args(argv[1:])
    datas = []
    for path in args.inputs:
        try:
            with open(path) as f:
                datas.append(json.load(f))
        except (OSError, ValueError) as exc:  # a stage that died leaves no (or a torn) file: say so, go on
            print(f"summarize: skipping {path}: {exc}", file=sys.stderr)
    if not datas:
        print("summarize: no benchmark results to summarize", file=sys.stderr)
        return 1
    data = merge(datas)
    table = summarize(data)
    if args.merged:
        with open(args.merged, "w") as f:
            json.dump(data, f, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
