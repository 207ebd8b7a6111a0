"""Stand-ins for what a randomly initialized MLLM never produces, shared by the trainer tests.

A random tiny Qwen3-VL never writes a parseable verdict or item block, so tests that need reward variance
replace the verdict parser with a deterministic function of the completion text and the item-span finder
with "first half = item 1, second half = item 2"; everything else stays real.
"""
from saga_train import rollout


def fake_verdict(text, key):
    return len(text) % 2 == 0


def fake_span(text, item):
    half = len(text) // 2
    if half == 0:
        return None
    return (0, half) if item == "item 1" else (half, len(text))


def install(monkeypatch=None) -> None:
    """Replace the parser and span finder (through ``monkeypatch`` when given, else for good: forked ranks)."""
    for name, fake in (("parse_verdict", fake_verdict), ("item_span", fake_span)):
        if monkeypatch is not None:
            monkeypatch.setattr(rollout.verdict_lib, name, fake)
        else:
            setattr(rollout.verdict_lib, name, fake)
