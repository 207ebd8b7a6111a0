"""Compile the attention_probs and attention_kl kernels for an H100 (sm_90) on a machine without a GPU.

Real shapes (Qwen3-VL-8B): 32 query heads over 8 kv heads (GQA group 4), head_dim 128, bf16 q/k;
the pooler's KL over one image's patch logits (256 entries a row), fp32 and bf16 logits, fp32 target.
Each spec compiles exactly what the launcher launches: the tiles and warps come from the same
``<kernel>_config`` function. Dot dtypes are spelled "tl.<name>" (tests/aot.py resolves them in its worker),
so this module imports without Triton.
"""
from saga_kernels.attention import probs_config
from saga_kernels.attention_kl import kl_config

from aot import Spec, assert_specs, skip_on_gpu

HQ, HKV, HEAD_DIM, N_KEYS = 32, 8, 128, 256  # Qwen3-VL-8B attention; key columns of one or two images
N_PATCHES = 256  # entries of one attention_kl row


def _attention_spec(dtype, dot_dtype, precision, mean, expect_wgmma):
    cfg = probs_config(HQ // HKV, N_KEYS, HEAD_DIM)
    launch = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
    types = dict(q_ptr="*" + dtype, k_ptr="*" + dtype, pos_ptr="*i64", pad_ptr="*i8", idx_ptr="*i64",
                 out_ptr="*fp32", scale="fp32")
    consts = dict(cfg, HAS_PAD=True, SUM_HEADS=mean, DOT_DTYPE=dot_dtype, PRECISION=precision)
    return Spec("saga_kernels.attention", "_probs_kernel", types, consts,
                label=f"{dtype} {'head mean' if mean else 'per head'}", expect_wgmma=expect_wgmma,
                # q/k strides of [B, H, L, 128] views of [B, L, H, 128] projections; n = 256 key columns
                divisible=("n", "D", "sq_b", "sq_h", "sq_l", "sk_b", "sk_h", "sk_l", "s_idx_b", "so_l"), **launch)


def _kl_spec(dtype, with_grad):
    cfg = kl_config(N_PATCHES)
    launch = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
    types = dict(z_ptr="*" + dtype, a_ptr="*fp32", m_ptr="*i8", loss_ptr="*fp32", grad_ptr="*fp32")
    return Spec("saga_kernels.attention_kl", "_kl_kernel", types, dict(cfg, HAS_MASK=True, WITH_GRAD=with_grad),
                label=f"{dtype} logits{' + grad' if with_grad else ''}",
                divisible=("N", "s_z", "s_a", "s_m", "s_g"), **launch)


AOT_SPECS = [
    _attention_spec("bf16", "tl.bfloat16", "tf32", True, expect_wgmma=True),  # what the probe launches
    _attention_spec("bf16", "tl.bfloat16", "tf32", False, expect_wgmma=True),
    _attention_spec("fp32", "tl.float32", "tf32x3", True, expect_wgmma=True),  # fp32 under torch's "highest"
    _kl_spec("fp32", True),
    _kl_spec("bf16", True),
    _kl_spec("fp32", False),
]


@skip_on_gpu
def test_kernels_compile_for_sm90():
    reports = assert_specs(AOT_SPECS)
    for r in reports:
        print(f"{r['name']}: {r['registers']} registers, {r['spill_bytes']} B spilled, {r['shared']} B shared, "
              f"{r['wgmma']} wgmma")
