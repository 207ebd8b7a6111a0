"""Turn a pytest-benchmark JSON file into a markdown table of ratios against saga, same run.

Usage: python benchmarks/summarize.py results.json [out.md]

Benchmarks are parametrized by a provider (param named ``provider``); every other parameter
forms the comparison group. For each group the table lists each provider's median time and
peak memory (``extra_info["peak_bytes"]``) and its ratio to the ``saga`` provider's.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

PROVIDER_KEYS = ("provider", "impl")


def _split(bench: dict) -> tuple[str, str]:
    params = dict(bench.get("params") or {})
    provider = next((str(params.pop(k)) for k in PROVIDER_KEYS if k in params), "saga")
    func = bench["name"].split("[", 1)[0]
    rest = ", ".join(f"{k}={v}" for k, v in sorted(params.items()))
    return f"{func}({rest})", provider


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.1f} MiB"


def summarize(data: dict) -> str:
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in data.get("benchmarks", []):
        key, provider = _split(bench)
        groups[key][provider] = bench
    machine = data.get("machine_info", {})
    lines = [
        f"Machine: {machine.get('node', '?')}, {machine.get('cpu', {}).get('brand_raw', '?')}; "
        f"device: {next((b['extra_info'].get('device') for b in data.get('benchmarks', []) if b.get('extra_info')), '?')}",
        "",
        "| benchmark | provider | median time | time / saga | peak extra memory | memory / saga |",
        "|---|---|---|---|---|---|",
    ]
    for key in sorted(groups):
        runs = groups[key]
        base = runs.get("saga")
        for provider in sorted(runs, key=lambda p: (p != "saga", p)):
            b = runs[provider]
            t = b["stats"]["median"]
            mem = b.get("extra_info", {}).get("peak_bytes")
            t_ratio = f"{t / base['stats']['median']:.2f}x" if base else "-"
            base_mem = base.get("extra_info", {}).get("peak_bytes") if base else None
            m_ratio = f"{mem / base_mem:.2f}x" if mem is not None and base_mem else "-"
            lines.append(f"| {key} | {provider} | {t * 1e3:.3f} ms | {t_ratio} | {_fmt_bytes(mem)} | {m_ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        table = summarize(json.load(f))
    if len(argv) == 3:
        with open(argv[2], "w") as f:
            f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
