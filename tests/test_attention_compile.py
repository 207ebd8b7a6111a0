"""Compile the attention_probs and attention_kl kernels for an H100 (sm_90) on a machine without a GPU.

The interpreter runs the kernels' semantics but not Triton's compiler (types of loop bounds, tl.dot
layouts, tl.reshape, shared-memory size); this catches those failures in CI. On a CUDA machine the
real tests compile and run the kernels, so this one is skipped there.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent("""
    import importlib, inspect
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def build(jitfn, types, consts):
        names = list(inspect.signature(jitfn.fn).parameters)
        sig = {nm: "constexpr" if nm in consts else types[nm] for nm in names}
        cx = {(i,): consts[nm] for i, nm in enumerate(names) if nm in consts}
        return triton.compile(ASTSource(jitfn, sig, constexprs=cx), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4})

    attn = importlib.import_module("saga_kernels.attention")._kernel()
    ints = "Lq Lk n D HKV GROUP HEAD_BLOCKS sq_b sq_h sq_l sk_b sk_h sk_l s_pos_b s_pad_b s_idx_b so_b so_h so_l"
    for dt, dot, mean, hp in (("bf16", tl.bfloat16, True, 4),):  # the Qwen3-VL-8B configuration
        types = dict(q_ptr="*" + dt, k_ptr="*" + dt, pos_ptr="*i64", pad_ptr="*i8", idx_ptr="*i64",
                     out_ptr="*fp32", scale_log2e="fp32", **{s: "i32" for s in ints.split()})
        consts = dict(HAS_PAD=True, SUM_HEADS=mean, HP=hp, BLOCK_M=16 * hp, BLOCK_Q=16, BLOCK_N=64, BLOCK_K=64,
                      BLOCK_D=128, DOT_DTYPE=dot, PRECISION="ieee")
        kernel = build(attn, types, consts)
        assert kernel.metadata.shared <= 228 * 1024, kernel.metadata.shared
    kl = importlib.import_module("saga_kernels.attention_kl")._kernel()
    types = dict(z_ptr="*bf16", a_ptr="*fp32", m_ptr="*i8", loss_ptr="*fp32", grad_ptr="*fp32",
                 **{s: "i32" for s in "N s_z s_a s_m s_g".split()})
    build(kl, types, dict(HAS_MASK=True, WITH_GRAD=True, BLOCK=128))
    print("compiled")
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels are compiled and run for real")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-4000:]
