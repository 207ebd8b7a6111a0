"""Ahead-of-time compilation of Triton kernels for an H100 (sm_90a) on a machine without a GPU.

The interpreter runs the kernels' semantics but not Triton's compiler (types of loop bounds, tl.dot
layouts, shared-memory size, register pressure); compiling for the GPU target catches those failures
on CPU-only CI and gives the numbers a speed design rests on. Each test file that owns kernels lists
them as ``AOT_SPECS`` (a list of :class:`Spec`) and calls :func:`assert_specs`; the compile table under
``benchmarks/results/`` is built from the same lists by ``benchmarks/compile_report.py``.

A :class:`Spec` compiles the kernel with the specialization the JIT gives it at real sizes: every pointer
and every integer named in ``divisible`` carries ``tt.divisibility=16`` (without those hints Triton
compiles a different, unvectorized and unpipelined variant). From the artifact it reports shared memory,
registers and spilled bytes (``ptxas -v``), local-memory instructions in the PTX and the number of
``wgmma`` (Hopper tensor-core) instructions.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

skip_on_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels are compiled and run for real")

SHARED_LIMIT = 228 * 1024  # bytes of shared memory per block on sm_90
REGISTER_LIMIT = 255


@dataclasses.dataclass(frozen=True)
class Spec:
    """One compiled variant of a kernel: ``module.kernel`` with argument ``types`` (pointer types such as
    ``"*bf16"``, scalars ``"fp32"``/``"i64"``; anything unnamed is ``"i32"``) and ``consts`` (constexprs)."""

    module: str
    kernel: str
    types: dict
    consts: dict
    label: str = ""
    num_warps: int = 4
    num_stages: int = 3
    divisible: tuple = ()
    expect_wgmma: bool = False

    @property
    def name(self) -> str:
        return f"{self.module.rsplit('.', 1)[-1]}.{self.kernel}" + (f" [{self.label}]" if self.label else "")


_WORKER = textwrap.dedent('''
    import importlib, inspect, json, os, re, subprocess, sys, tempfile
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    def as_const(v):
        if isinstance(v, str) and v.startswith("tl."):
            return getattr(tl, v[3:])
        return v

    reports = []
    for spec in json.load(sys.stdin):
        kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
        names = list(inspect.signature(kernel.fn).parameters)
        consts = {k: as_const(v) for k, v in spec["consts"].items()}
        unknown = set(spec["types"]) - set(names)
        assert not unknown and set(consts) <= set(names), (spec["kernel"], unknown, set(consts) - set(names))
        sig = {n: "constexpr" if n in consts else spec["types"].get(n, "i32") for n in names}
        hinted = {n for n in names if sig[n].startswith("*")} | set(spec["divisible"])
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in hinted}
        src = ASTSource(kernel, sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
        ptx = compiled.asm["ptx"]
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
        os.unlink(f.name)
        regs = re.search(r"Used (\\d+) registers", log)
        spills = re.search(r"(\\d+) bytes spill stores, (\\d+) bytes spill loads", log)
        reports.append(dict(name=spec["name"], shared=compiled.metadata.shared,
                            registers=int(regs.group(1)) if regs else None,
                            spill_bytes=int(spills.group(1)) + int(spills.group(2)) if spills else None,
                            local_insts=len(re.findall(r"\\b(?:ld|st)\\.local", ptx)),
                            wgmma=len(re.findall(r"wgmma\\.mma_async", ptx)),
                            num_warps=spec["num_warps"], num_stages=spec["num_stages"],
                            expect_wgmma=spec["expect_wgmma"]))
    print("AOT-REPORT" + json.dumps(reports))
''')


def _encode(value):
    """constexpr values cross the process boundary as JSON; tl dtypes travel as "tl.<name>"."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    name = getattr(value, "name", None) or str(value)
    return "tl." + {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}.get(name, name)


def compile_specs(specs, root: str | None = None) -> list[dict]:
    """Compile every spec for sm_90a in a fresh interpreter-free Python; return one report dict per spec.
    ``root``: the checkout whose ``saga_kernels`` is compiled (default: this one)."""
    payload = [dict(dataclasses.asdict(s), name=s.name, consts={k: _encode(v) for k, v in s.consts.items()},
                    divisible=list(s.divisible)) for s in specs]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", _WORKER], input=json.dumps(payload), env=env, capture_output=True,
                         text=True, timeout=900)
    marker = "AOT-REPORT"
    if run.returncode != 0 or marker not in run.stdout:
        raise AssertionError(f"sm_90 compilation failed:\n{run.stderr[-6000:]}")
    return json.loads(run.stdout.split(marker, 1)[1])


def problems(report: dict) -> list[str]:
    """What is wrong with one compiled kernel (empty when it is fit for an H100)."""
    out = []
    if report["shared"] > SHARED_LIMIT:
        out.append(f"shared memory {report['shared']} B > {SHARED_LIMIT} B")
    if report["registers"] is None or report["registers"] > REGISTER_LIMIT:
        out.append(f"registers {report['registers']}")
    if report["spill_bytes"] or report["local_insts"]:
        out.append(f"spills {report['spill_bytes']} B, {report['local_insts']} local-memory instructions")
    if report["expect_wgmma"] and not report["wgmma"]:
        out.append("no wgmma instruction (the dot does not use Hopper tensor cores)")
    return out


def assert_specs(specs) -> list[dict]:
    """Compile ``specs`` and fail listing every kernel that does not fit (shared memory, registers, spills,
    missing wgmma). Returns the reports."""
    reports = compile_specs(specs)
    bad = [f"{r['name']}: {'; '.join(p)}" for r in reports if (p := problems(r))]
    assert not bad, "\n".join(bad)
    return reports
