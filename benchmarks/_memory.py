"""Peak extra memory of one call, beyond what was allocated before it.

CUDA: ``torch.cuda.max_memory_allocated`` delta (the caching allocator's exact high-water mark).
CPU: the process's peak resident set (``VmHWM``) delta, after resetting it through
``/proc/self/clear_refs``; this counts every page the call touched, so it is an upper bound
that includes allocator slack (Linux only; elsewhere the CPU figure is reported as None).
"""
from __future__ import annotations

import os

import torch


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_memory(fn, device) -> tuple[int | None, str]:
    """Run ``fn()`` once and return (peak extra bytes, how it was measured)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, "cuda.max_memory_allocated"
    if not os.path.exists("/proc/self/clear_refs"):
        fn()
        return None, "unavailable on this OS"
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _proc_status("VmRSS:")
    fn()
    return _proc_status("VmHWM:") - base, "cpu.VmHWM"
