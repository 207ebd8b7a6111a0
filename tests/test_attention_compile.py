"""Compile the attention_probs and attention_kl kernels for an H100 (sm_90) on a machine without a GPU."""
from aot import assert_compiles, skip_on_gpu


@skip_on_gpu
def test_kernels_compile_for_sm90():
    assert_compiles("""
    attn = importlib.import_module("saga_kernels.attention")._kernel()
    ints = "Lq Lk n D HKV GROUP HEAD_BLOCKS sq_b sq_h sq_l sk_b sk_h sk_l s_pos_b s_pad_b s_idx_b so_b so_h so_l"
    for dt, dot, mean, hp in (("bf16", tl.bfloat16, True, 4),):  # the Qwen3-VL-8B configuration
        types = dict(q_ptr="*" + dt, k_ptr="*" + dt, pos_ptr="*i64", pad_ptr="*i8", idx_ptr="*i64",
                     out_ptr="*fp32", scale_log2e="fp32", **{s: "i32" for s in ints.split()})
        consts = dict(HAS_PAD=True, SUM_HEADS=mean, HP=hp, BLOCK_M=16 * hp, BLOCK_Q=16, BLOCK_N=64, BLOCK_K=64,
                      BLOCK_D=128, DOT_DTYPE=dot, PRECISION="ieee")
        build(attn, types, consts)
    kl = importlib.import_module("saga_kernels.attention_kl")._kernel()
    types = dict(z_ptr="*bf16", a_ptr="*fp32", m_ptr="*i8", loss_ptr="*fp32", grad_ptr="*fp32",
                 **{s: "i32" for s in "N s_z s_a s_m s_g".split()})
    build(kl, types, dict(HAS_MASK=True, WITH_GRAD=True, BLOCK=128))
    """)
