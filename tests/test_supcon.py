"""supcon_loss vs pytorch-metric-learning 2.9 SupConLoss and the float64 reference, both impls.

Every comparison uses the suite's one tolerance rule (``utils.assert_rule``): error against float64 no larger
than the peer's (pml, or the reference run in the op's dtype) plus a slack.
"""
import pytest
import torch
from pytorch_metric_learning.losses import SupConLoss

import saga_kernels.metric_common as metric_common
import saga_kernels.supcon as supcon_mod
from saga_kernels import input_checks, supcon_loss
from saga_kernels._tl_utils import grad_dtype
from saga_kernels.reference import supcon_loss_reference

from utils import JUNK, assert_batch_input_errors, assert_only_label_equality_matters, assert_rule, odd_labels


def _loss_and_grads(fn, x, ref=None):
    x = x.detach().clone().requires_grad_()
    r = ref.detach().clone().requires_grad_() if ref is not None else None
    loss = fn(x, r)
    loss.backward()
    return loss.detach(), x.grad, (r.grad if r is not None else None)


def _check(ours, gold, peer, loss_slack, grad_slack, what=""):
    """Loss and every gradient present in ``gold`` within the rule (relative slacks)."""
    assert_rule(ours[0], gold[0], peer[0], rel_slack=loss_slack, what=f"loss {what}")
    for i, name in ((1, "embeddings"), (2, "ref_embeddings")):
        if gold[i] is not None:
            assert_rule(ours[i], gold[i], peer[i], rel_slack=grad_slack, what=f"grad {name} {what}")


def _labels(n, num_classes, gen, singletons=0):
    """Random labels in [0, num_classes) plus ``singletons`` rows whose labels occur once."""
    y = torch.randint(0, num_classes, (n,), generator=gen)
    if singletons:
        y[:singletons] = torch.arange(1000, 1000 + singletons)
    return y


@pytest.mark.parametrize(
    "n, d, classes, singletons, temperature",
    [
        (123, 33, 17, 5, 0.1),  # odd sizes, repeated and singleton classes
        (7, 5, 3, 1, 0.1),
        (130, 70, 4, 0, 0.07),  # several row/column tiles; fp32 D > 64: the gradient-tile backward
        (40, 16, 40, 0, 0.5),  # mostly singleton classes
        (40, 150, 5, 2, 0.1),  # several D chunks of the streamed similarity
    ],
)
def test_matches_pml_and_reference(impl, device, n, d, classes, singletons, temperature):
    gen = torch.Generator().manual_seed(n * 1000 + d)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64).to(device)
    y = _labels(n, classes, gen, singletons).to(device)
    gold = _loss_and_grads(lambda e, _: supcon_loss_reference(e, y, temperature=temperature), x)
    peer = _loss_and_grads(lambda e, _: SupConLoss(temperature)(e, y), x.float())
    ours = _loss_and_grads(lambda e, _: supcon_loss(e, y, temperature=temperature, impl=impl), x.float())
    assert ours[0].dtype == torch.float32 and torch.isfinite(ours[1]).all()
    _check(ours, gold, peer, 1e-6, 1e-5)


def test_float64_matches_reference_tightly(impl, device):
    """The torch fallback computes float64 in float64; the Triton path in fp32 (looser slack)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(57, 24, generator=gen, dtype=torch.float64).to(device)
    y = _labels(57, 6, gen, 2).to(device)
    gold = _loss_and_grads(lambda e, _: supcon_loss_reference(e, y), x)
    ours = _loss_and_grads(lambda e, _: supcon_loss(e, y, impl=impl), x)
    assert ours[0].dtype == torch.float64 and ours[1].dtype == torch.float64
    _check(ours, gold, gold, *((1e-12, 1e-12) if impl == "torch" else (1e-5, 1e-5)))


@pytest.mark.parametrize("query_needs_grad, ref_needs_grad", [(True, True), (True, False), (False, True)])
def test_reference_set_matches_pml(impl, device, query_needs_grad, ref_needs_grad):
    """ref_embeddings/ref_labels act as pml's ref_emb/ref_labels: queries vs every reference row."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(45, 21, generator=gen, dtype=torch.float64).to(device)
    r = torch.randn(83, 21, generator=gen, dtype=torch.float64).to(device)
    y = _labels(45, 9, gen, 3).to(device)
    yr = _labels(83, 9, gen).to(device)

    def run(fn, dtype):
        xe = x.to(dtype).clone().requires_grad_(query_needs_grad)
        re = r.to(dtype).clone().requires_grad_(ref_needs_grad)
        loss = fn(xe, re)
        loss.backward()
        return loss.detach(), xe.grad, re.grad

    gold = run(lambda e, k: supcon_loss_reference(e, y, ref_embeddings=k, ref_labels=yr), torch.float64)
    peer = run(lambda e, k: SupConLoss()(e, y, ref_emb=k, ref_labels=yr), torch.float32)
    ours = run(lambda e, k: supcon_loss(e, y, ref_embeddings=k, ref_labels=yr, impl=impl), torch.float32)
    _check(ours, gold, peer, 1e-6, 1e-5)
    assert (ours[1] is None) == (not query_needs_grad) and (ours[2] is None) == (not ref_needs_grad)


@pytest.mark.parametrize("ref_is_batch", [True, False])
def test_ref_labels_identical_to_labels_drop_the_diagonal(impl, device, ref_is_batch):
    """pml drops pairs (i, i) when ref_labels is the labels tensor itself, whatever ref_emb is."""
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(33, 10, generator=gen, dtype=torch.float64).to(device)
    r = x if ref_is_batch else torch.randn(33, 10, generator=gen, dtype=torch.float64).to(device)
    y = _labels(33, 5, gen).to(device)
    if ref_is_batch:
        torch.testing.assert_close(supcon_loss_reference(x, y, ref_embeddings=r, ref_labels=y),
                                   supcon_loss_reference(x, y))

    def run(fn, dtype):
        xe = x.to(dtype).detach().clone().requires_grad_()
        re = xe if ref_is_batch else r.to(dtype).detach().clone().requires_grad_()
        loss = fn(xe, re)
        loss.backward()
        return loss.detach(), xe.grad, None if ref_is_batch else re.grad

    gold = run(lambda e, k: supcon_loss_reference(e, y, ref_embeddings=k, ref_labels=y), torch.float64)
    peer = run(lambda e, k: SupConLoss()(e, y, ref_emb=k, ref_labels=y), torch.float32)
    ours = run(lambda e, k: supcon_loss(e, y, ref_embeddings=k, ref_labels=y, impl=impl), torch.float32)
    _check(ours, gold, peer, 1e-6, 1e-5)


def test_arbitrary_label_values(impl, device):
    """Only label equality matters: negative / huge / sparse values give the same loss as dense ids."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(37, 12, generator=gen).to(device)
    dense = torch.randint(0, 5, (37,), generator=gen).to(device)
    assert_only_label_equality_matters(lambda e, y: supcon_loss(e, y, impl=impl), x, dense, torch.int32)
    r = torch.randn(20, 12, generator=gen).to(device)
    dense_r = torch.randint(0, 5, (20,), generator=gen).to(device)
    odd, odd_r = odd_labels(dense), odd_labels(dense_r)
    torch.testing.assert_close(supcon_loss(x, odd, ref_embeddings=r, ref_labels=odd_r.to(torch.int64), impl=impl),
                               supcon_loss(x, dense.to(torch.int16), ref_embeddings=r, ref_labels=dense_r, impl=impl))


@pytest.mark.parametrize("case", ["all_singletons", "one_class", "single_row", "one_pos_one_neg", "one_ref_key"])
def test_documented_zero_loss(impl, device, case):
    """No positive pair, no negative pair, <= 1 of each (pml's rule), or no anchor with loss > 0:
    loss 0, zero gradients, no NaN."""
    gen = torch.Generator().manual_seed(8)
    if case == "all_singletons":
        x, y = torch.randn(9, 6, generator=gen), torch.arange(9)
    elif case == "one_class":
        x, y = torch.randn(9, 6, generator=gen), torch.full((9,), 4)
    else:
        x, y = torch.randn(1, 6, generator=gen), torch.tensor([0])
    kwargs = {}
    if case == "one_pos_one_neg":  # one query against [positive, negative]
        kwargs = dict(ref_embeddings=torch.randn(2, 6, generator=gen).to(device),
                      ref_labels=torch.tensor([0, 1], device=device))
    if case == "one_ref_key":  # queries [0, 1, 0] against one key of class 0: per-anchor losses are all exactly 0
        x, y = torch.randn(3, 6, generator=gen), torch.tensor([0, 1, 0])
        kwargs = dict(ref_embeddings=torch.randn(1, 6, generator=gen).to(device),
                      ref_labels=torch.tensor([0], device=device))
    x = x.to(device).requires_grad_()
    loss = supcon_loss(x, y.to(device), impl=impl, **kwargs)
    loss.backward()
    peer = SupConLoss()(x.detach(), y.to(device),
                        **({} if not kwargs else
                           dict(ref_emb=kwargs["ref_embeddings"], ref_labels=kwargs["ref_labels"])))
    assert float(peer) == 0.0
    assert float(loss.detach()) == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("n, m", [(0, 7), (5, 0)])
def test_empty_batch_gives_zero_gradients(impl, device, with_ref, n, m):
    """N = 0 (or an empty reference set): loss 0 in the embeddings' dtype, zero gradients of the right
    shape for every tensor that requires grad."""
    if m == 0 and not with_ref:
        pytest.skip("an empty reference set needs one")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(n, 12, device=device, dtype=dtype, requires_grad=True)
        y = torch.randint(0, 3, (n,), device=device)
        kwargs = {}
        if with_ref:
            r = torch.randn(m, 12, device=device, dtype=dtype, requires_grad=True)
            kwargs = dict(ref_embeddings=r, ref_labels=torch.randint(0, 3, (m,), device=device))
        loss = supcon_loss(x, y, impl=impl, **kwargs)
        assert loss.dtype == dtype and float(loss.detach()) == 0.0
        loss.backward()
        assert x.grad is not None and x.grad.shape == x.shape and not x.grad.any()
        if with_ref:
            assert r.grad is not None and r.grad.shape == r.shape and not r.grad.any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_ref", [False, True])
def test_half_precision_within_rule(impl, device, dtype, with_ref):
    """Half inputs: rows normalized in fp32 (never rounded to the input dtype), self and reference set."""
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(50, 32, generator=gen, dtype=torch.float64).to(device)
    y = _labels(50, 7, gen).to(device)
    r = torch.randn(30, 32, generator=gen, dtype=torch.float64).to(device) if with_ref else None
    yr = _labels(30, 7, gen).to(device) if with_ref else None
    kw = dict(ref_labels=yr) if with_ref else {}

    def fn(f):
        return lambda e, k: f(e, y, ref_embeddings=k, **kw)

    gold = _loss_and_grads(fn(supcon_loss_reference), x, r)
    peer = _loss_and_grads(fn(supcon_loss_reference), x.to(dtype), None if r is None else r.to(dtype))
    ours = _loss_and_grads(lambda e, k: supcon_loss(e, y, ref_embeddings=k, impl=impl, **kw), x.to(dtype),
                           None if r is None else r.to(dtype))
    assert ours[0].dtype == dtype and ours[1].dtype == dtype
    _check(ours, gold, peer, 1e-3, 1e-2)


@pytest.mark.parametrize("junk", JUNK, ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("d", [21, 70], ids=["fused", "tiled"])
@pytest.mark.parametrize("with_ref", [False, True])
def test_padded_canary(impl, device, junk, d, with_ref):
    """Inputs are strided views into buffers whose padding rows / columns hold +inf, -inf or NaN (labels:
    a strided view between junk values): loss and gradients equal the clean contiguous run, and the
    padding gets exactly zero gradient. Any out-of-bounds read or 0 * inf leak shows up as NaN."""
    gen = torch.Generator().manual_seed(31)
    n, m = 37, 29
    x = torch.randn(n, d, generator=gen).to(device)
    r = torch.randn(m, d, generator=gen).to(device)
    y = torch.randint(0, 5, (n,), generator=gen).to(device)
    yr = torch.randint(0, 5, (m,), generator=gen).to(device)

    def padded(t, rows, cols):
        buf = torch.full((t.shape[0] + rows, t.shape[1] + cols), junk, device=device)
        buf[: t.shape[0], : t.shape[1]] = t
        return buf.requires_grad_()

    def padded_labels(lab):
        buf = torch.full((2 * lab.numel() + 1,), -123456789, dtype=lab.dtype, device=device)
        buf[1::2] = lab
        return buf[1::2]

    def run(xe, re, ye, yre):
        kw = dict(ref_embeddings=re, ref_labels=yre) if with_ref else {}
        return supcon_loss(xe, ye, impl=impl, **kw)

    xc, rc = x.clone().requires_grad_(), r.clone().requires_grad_()
    clean = run(xc, rc, y, yr)
    clean.backward()
    xb, rb = padded(x, 5, 11), padded(r, 3, 7)
    loss = run(xb[:n, :d], rb[:m, :d], padded_labels(y), padded_labels(yr))
    loss.backward()
    torch.testing.assert_close(loss, clean, rtol=1e-6, atol=0)
    torch.testing.assert_close(xb.grad[:n, :d], xc.grad, rtol=1e-6, atol=1e-9)
    assert not xb.grad[n:].any() and not xb.grad[:, d:].any()
    if with_ref:
        torch.testing.assert_close(rb.grad[:m, :d], rc.grad, rtol=1e-6, atol=1e-9)
        assert not rb.grad[m:].any() and not rb.grad[:, d:].any()
    else:
        assert rb.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_ref", [False, True])
def test_large_d_gradient_tile_path(device, monkeypatch, dtype, with_ref):
    """D above the fused limit: the kernel writes the scaled gradient tile chunk by chunk and torch.mm does
    the products. The limit is lowered to 16 and the chunk to a few tiles, so rows and columns both span
    several chunks here; values and gradients follow the rule against float64."""
    monkeypatch.setattr(supcon_mod, "_MAX_FUSED_D", 16)
    monkeypatch.setattr(metric_common, "GRAD_CHUNK_BYTES", 128 * 64 * 4)
    gen = torch.Generator().manual_seed(41)
    n, m, d = 150, 140, 40
    x = torch.randn(n, d, generator=gen, dtype=torch.float64).to(device)
    r = torch.randn(m, d, generator=gen, dtype=torch.float64).to(device) if with_ref else None
    y = _labels(n, 6, gen, 3).to(device)
    yr = _labels(m, 6, gen).to(device) if with_ref else None
    kw = dict(ref_labels=yr) if with_ref else {}
    gold = _loss_and_grads(lambda e, k: supcon_loss_reference(e, y, ref_embeddings=k, **kw), x, r)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    peer = _loss_and_grads(lambda e, k: supcon_loss_reference(e, y, ref_embeddings=k, **kw), cast(x), cast(r))
    ours = _loss_and_grads(lambda e, k: supcon_loss(e, y, ref_embeddings=k, impl="triton", **kw), cast(x), cast(r))
    slack = (1e-6, 1e-5) if dtype == torch.float32 else (1e-3, 1e-2)
    _check(ours, gold, peer, *slack)


def test_bad_input_errors_name_the_argument(device):
    assert_batch_input_errors(supcon_loss, device)  # embeddings / labels
    x = torch.randn(6, 4, device=device)
    y = torch.tensor([0, 0, 1, 1, 2, 2], device=device)
    bad = x.clone()
    bad[2, 1] = float("nan")
    inf_ref = x.clone()
    inf_ref[0, 0] = float("inf")
    with pytest.raises(ValueError, match="ref_embeddings contains"):
        supcon_loss(x, y, ref_embeddings=inf_ref, ref_labels=y)
    with input_checks("off"):  # value checks off: no error (the caller asked for it)
        supcon_loss(bad, y, impl="torch")
    with pytest.raises(ValueError, match="ref_labels is missing"):
        supcon_loss(x, y, ref_embeddings=x)
    with pytest.raises(ValueError, match=r"ref_embeddings must have shape \[\*, 4\]"):
        supcon_loss(x, y, ref_embeddings=torch.randn(3, 5, device=device), ref_labels=y[:3])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        supcon_loss(x, y, temperature=0.0)
    with pytest.raises(ValueError, match="impl="):
        supcon_loss(x, y, impl="cuda-please")


@pytest.mark.gpu
@pytest.mark.parametrize("loss_name", ["supcon", "multi_similarity"])
def test_gpu_streams_without_n_by_n_memory(loss_name):
    """CUDA, N = 32,768: an N x N fp32 matrix would be 4 GiB; the Triton path stays within a few
    copies of the [N, D] inputs, and agrees with the torch fallback (same device) on loss and grads."""
    from saga_kernels import multi_similarity_loss

    fn = supcon_loss if loss_name == "supcon" else multi_similarity_loss
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, d = 32768, 128
    x = torch.randn(n, d, device="cuda", generator=gen)
    y = torch.randint(0, 512, (n,), device="cuda", generator=gen)
    results = {}
    for impl in ("triton", "torch"):
        xe = x.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = fn(xe, y, impl=impl)
        loss.backward()
        torch.cuda.synchronize()
        results[impl] = (loss.detach(), xe.grad, torch.cuda.max_memory_allocated() - base)
    peak = results["triton"][2]
    assert peak < 16 * n * d * 4, f"Triton path peak {peak / 2**20:.0f} MiB"
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-4, atol=1e-6)
    # a global measure: an MS mining decision may flip for a pair within rounding of its threshold
    gt, gf = results["triton"][1], results["torch"][1]
    assert float((gt - gf).norm() / gf.norm()) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("d", [128, 768])
@pytest.mark.parametrize("with_ref", [False, True])
def test_gpu_no_host_sync(d, with_ref):
    """The CUDA path (value checks asynchronous) never synchronizes with the host: CUDA-graph and
    torch.compile friendly. Fused (D = 128) and gradient-tile (D = 768) backward."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1000, d, device="cuda", generator=gen, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 50, (1000,), device="cuda", generator=gen)
    kw = {}
    if with_ref:
        kw = dict(ref_embeddings=torch.randn(700, d, device="cuda", generator=gen, dtype=torch.bfloat16,
                                             requires_grad=True),
                  ref_labels=torch.randint(0, 50, (700,), device="cuda", generator=gen))
    supcon_loss(x, y, **kw).backward()  # warm-up: compilation and caches may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        supcon_loss(x, y, **kw).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ----------------------------------------------------------------------------------------------------
# sm_90 compile of every kernel as launched (blocks, warps, stages from the launch-config functions)
# ----------------------------------------------------------------------------------------------------
from aot import Spec, assert_specs, skip_on_gpu  # noqa: E402

_KERNEL_DTYPES = {torch.bfloat16: ("*bf16", "tl.bfloat16", "tf32"), torch.float32: ("*fp32", "tl.float32", "tf32x3"),
                  torch.float16: ("*fp16", "tl.float16", "tf32")}
_FP16_FUSED = ("*fp16", "tl.float32", "tf32")  # fp16 rows, the fused backward's dots on fp32 operands (grad_dot_config)
_F32 = "*fp32"


def _spec(kernel, types, consts, cfg, dtype, label, divisible, kernel_dtypes=None):
    ptr, dot, precision = kernel_dtypes or _KERNEL_DTYPES[dtype]
    cfg = dict(cfg)
    warps = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
    types = {k: ptr if v == "X" else v for k, v in types.items()}
    return Spec("saga_kernels.supcon", kernel, types, dict(consts, DOT_DTYPE=dot, PRECISION=precision, **cfg),
                label=f"{label} {str(dtype).replace('torch.', '')}", expect_wgmma=dot != "tl.float32",
                divisible=divisible, **warps)


def _aot_specs():
    """Real shapes: the forward and the gradient-tile kernel (D = 512 and 128; their blocks do not depend on
    D), the fused backward at the largest fused D and at D = 128 (bf16), self and both reference passes."""
    specs = []
    for dtype in (torch.bfloat16, torch.float32):
        specs.append(_spec("_supcon_fwd_kernel",
                           dict(q_ptr="X", k_ptr="X", rq_ptr=_F32, rk_ptr=_F32, lq_ptr="*i32", lk_ptr="*i32",
                                lse_ptr=_F32, pos_sum_ptr=_F32, inv_temp="fp32"),
                           dict(EXCLUDE_DIAGONAL=True), supcon_mod.fwd_config(512, dtype), dtype, "D=512",
                           ("N", "M", "D", "stride_q", "stride_k")))
        for sym in (True, False):
            specs.append(_spec("_supcon_grad_tile_kernel",
                               dict(q_ptr="X", k_ptr="X", rq_ptr=_F32, rk_ptr=_F32, lq_ptr="*i32", lk_ptr="*i32",
                                    lse_ptr=_F32, inv_pos_ptr=_F32, coef_ptr=_F32, w_ptr="X", inv_temp="fp32"),
                               dict(SYMMETRIC=sym, EXCLUDE_DIAGONAL=sym), supcon_mod.grad_tile_config(512, dtype),
                               dtype, f"{'self' if sym else 'ref'} D=512",
                               ("row0", "row1", "col0", "col1", "D", "stride_q", "stride_k", "stride_w")))
        fused = supcon_mod.fused_max_d(dtype)
        for d in sorted({fused, min(fused, 128)}, reverse=True):
            for a_stats, b_stats, what in ((True, True, "self"), (True, False, "ref rows"), (False, True, "ref cols")):
                # the launcher passes None for the stats of the side that has none (a constexpr, compiled out)
                stats = {f"{k}_{side}_ptr": (_F32 if on else None) for side, on in (("a", a_stats), ("b", b_stats))
                         for k in ("lse", "inv_pos")}
                specs.append(_spec("_supcon_bwd_kernel",
                                   dict(a_ptr="X", b_ptr="X", ra_ptr=_F32, rb_ptr=_F32, la_ptr="*i32", lb_ptr="*i32",
                                        coef_ptr=_F32, u_ptr=_F32, inv_temp="fp32",
                                        **{k: v for k, v in stats.items() if v is not None}),
                                   dict(A_STATS=a_stats, B_STATS=b_stats, EXCLUDE_DIAGONAL=a_stats and b_stats,
                                        **{k: v for k, v in stats.items() if v is None}),
                                   supcon_mod.bwd_config(d, dtype), dtype, f"{what} D={d}",
                                   ("NA", "NB", "D", "stride_a", "stride_b", "stride_u")))
    # fp16 rows: the gradient tile in an fp32 buffer, the fused backward on fp32 (tf32) operands with fp32's tiles
    specs.append(_spec("_supcon_grad_tile_kernel",
                       dict(q_ptr="X", k_ptr="X", rq_ptr=_F32, rk_ptr=_F32, lq_ptr="*i32", lk_ptr="*i32",
                            lse_ptr=_F32, inv_pos_ptr=_F32, coef_ptr=_F32, w_ptr=_F32, inv_temp="fp32"),
                       dict(SYMMETRIC=True, EXCLUDE_DIAGONAL=True), supcon_mod.grad_tile_config(512, torch.float16),
                       torch.float16, "self D=512", ("row0", "row1", "col0", "col1", "D", "stride_q", "stride_k",
                                                      "stride_w")))
    d = supcon_mod.fused_max_d(grad_dtype(torch.float16))
    specs.append(_spec("_supcon_bwd_kernel",
                       dict(a_ptr="X", b_ptr="X", ra_ptr=_F32, rb_ptr=_F32, la_ptr="*i32", lb_ptr="*i32",
                            coef_ptr=_F32, u_ptr=_F32, inv_temp="fp32", lse_a_ptr=_F32, inv_pos_a_ptr=_F32,
                            lse_b_ptr=_F32, inv_pos_b_ptr=_F32),
                       dict(A_STATS=True, B_STATS=True, EXCLUDE_DIAGONAL=True),
                       supcon_mod.bwd_config(d, grad_dtype(torch.float16)), torch.float16, f"self D={d}",
                       ("NA", "NB", "D", "stride_a", "stride_b", "stride_u"), kernel_dtypes=_FP16_FUSED))
    return specs


AOT_SPECS = _aot_specs() if supcon_mod.triton.__class__.__name__ != "_MissingTriton" else []


@skip_on_gpu
def test_kernels_compile_for_sm90():
    """bf16 (wgmma) and fp32 (tf32x3): no spills, <= 255 registers, shared memory < 228 KB."""
    assert_specs(AOT_SPECS)
