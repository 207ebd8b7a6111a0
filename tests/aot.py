"""Ahead-of-time compilation of Triton kernels for an H100 (sm_90) on a machine without a GPU.

The interpreter runs the kernels' semantics but not Triton's compiler (types of loop bounds, tl.dot
layouts, tl.reshape, shared-memory size); compiling for a GPU target catches those failures on CPU-only
CI. On a CUDA machine the real tests compile and run the kernels, so these checks are skipped there.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

skip_on_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels are compiled and run for real")

PRELUDE = textwrap.dedent("""
    import importlib, inspect
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def build(jitfn, types, consts, num_warps=4):
        '''Compile ``jitfn`` for sm_90; parameters not in ``types`` or ``consts`` are i32 scalars.'''
        names = list(inspect.signature(jitfn.fn).parameters)
        sig = {nm: "constexpr" if nm in consts else types.get(nm, "i32") for nm in names}
        cx = {(i,): consts[nm] for i, nm in enumerate(names) if nm in consts}
        kernel = triton.compile(ASTSource(jitfn, sig, constexprs=cx), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": num_warps})
        assert kernel.metadata.shared <= 228 * 1024, (jitfn.fn.__name__, kernel.metadata.shared)
        return kernel
""")


def assert_compiles(body: str) -> None:
    """Run ``PRELUDE + body`` (which calls ``build``) in a fresh interpreter-free Python; it must succeed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = PRELUDE + textwrap.dedent(body) + '\nprint("compiled")\n'
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-4000:]
