"""Compile the Proxy Anchor / Potential Field kernels for an H100 (sm_90) on a machine without a GPU."""
import pytest

from aot import assert_compiles, skip_on_gpu


@pytest.mark.slow
@skip_on_gpu
def test_kernels_compile_for_sm90():
    assert_compiles("""
    import saga_kernels._proxy_losses_triton as K
    build_k = lambda fn, types, consts: build(fn, types, consts, num_warps=K.NUM_WARPS)
    rows = dict(BLOCK_R=K.BLOCK_ROWS, BLOCK_C=K.BLOCK_COLS, BLOCK_K=K._block_k(512))
    grads = dict(rows, BLOCK_O=K._block_out(512))
    f32 = dict.fromkeys(["alpha", "margin", "delta", "min_dist"], "fp32")
    ptr = lambda names, t="*fp32": dict.fromkeys(names.split(), t)
    build_k(K._pa_fwd_kernel, {**f32, **ptr("p_ptr e_ptr stats_ptr"), "lab_ptr": "*i32"}, rows)
    pa_ptrs = {**f32, **ptr("e_ptr p_ptr lse_pos_ptr lse_neg_ptr coef_ptr grad_ptr"), "lab_ptr": "*i32"}
    build_k(K._pa_bwd_emb_kernel, pa_ptrs, grads)
    build_k(K._pa_bwd_proxy_kernel, pa_ptrs, grads)
    build_k(K._pf_fwd_kernel, {**f32, **ptr("x_ptr rowsum_ptr"), "lab_ptr": "*i32"}, rows)
    build_k(K._pf_bwd_kernel, {**f32, **ptr("x_ptr coef_ptr grad_ptr"), "lab_ptr": "*i32"}, grads)
    """)
