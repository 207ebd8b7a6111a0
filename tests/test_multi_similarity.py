"""multi_similarity_loss vs pml 2.9 MultiSimilarityLoss (+ MultiSimilarityMiner) and the float64 reference.

Every comparison uses the suite's one tolerance rule (``utils.assert_rule``): error against float64 no larger
than the peer's (pml, or the reference run in the op's dtype) plus a slack.
"""
import pytest
import torch
from pytorch_metric_learning.losses import MultiSimilarityLoss
from pytorch_metric_learning.miners import MultiSimilarityMiner

import saga_kernels.metric_common as metric_common
import saga_kernels.multi_similarity as ms_mod
from saga_kernels import multi_similarity_loss
from saga_kernels._tl_utils import grad_dtype
from saga_kernels.reference import multi_similarity_loss_reference

from utils import JUNK, assert_batch_input_errors, assert_only_label_equality_matters, assert_rule


def _loss_and_grad(fn, x):
    x = x.detach().clone().requires_grad_()
    loss = fn(x)
    loss.backward()
    return loss.detach(), x.grad


def _check(ours, gold, peer, loss_slack, grad_slack):
    assert_rule(ours[0], gold[0], peer[0], rel_slack=loss_slack, what="loss")
    assert_rule(ours[1], gold[1], peer[1], rel_slack=grad_slack, what="grad")


def _pml(y, alpha=2.0, beta=50.0, base=0.5, eps=0.1):
    loss = MultiSimilarityLoss(alpha=alpha, beta=beta, base=base)
    if eps is None:
        return lambda e: loss(e, y)
    miner = MultiSimilarityMiner(epsilon=eps)
    return lambda e: loss(e, y, miner(e, y))


def _clustered(n, d, classes, gen, singletons=0, spread=0.6):
    """Embeddings around per-class centres (so that the miner keeps and drops pairs) and their labels."""
    y = torch.randint(0, classes, (n,), generator=gen)
    if singletons:
        y[:singletons] = torch.arange(1000, 1000 + singletons)
    centres = torch.randn(1000 + singletons, d, generator=gen, dtype=torch.float64)
    x = centres[y] + spread * torch.randn(n, d, generator=gen, dtype=torch.float64)
    return x, y


@pytest.mark.parametrize(
    "n, d, classes, singletons, params",
    [
        (123, 33, 17, 5, dict()),  # pml defaults, odd sizes, repeated and singleton classes
        (123, 33, 17, 5, dict(eps=None)),  # no miner: every pair
        (9, 5, 3, 1, dict(eps=0.5, alpha=3.0, beta=20.0, base=0.3)),
        (130, 70, 4, 0, dict(spread=1.5)),  # several row/column tiles; fp32 D > 64: the gradient-tile backward
        (64, 16, 64, 0, dict(eps=None)),  # all singletons without the miner: negatives only
        (40, 150, 5, 0, dict(spread=3.0)),  # several D chunks of the streamed similarity
    ],
)
def test_matches_pml_and_reference(impl, device, n, d, classes, singletons, params):
    gen = torch.Generator().manual_seed(n * 100 + d)
    x, y = _clustered(n, d, classes, gen, singletons, spread=params.get("spread", 0.6))
    x, y = x.to(device), y.to(device)
    eps = params.get("eps", 0.1)
    kw = dict(alpha=params.get("alpha", 2.0), beta=params.get("beta", 50.0), base=params.get("base", 0.5))
    gold = _loss_and_grad(lambda e: multi_similarity_loss_reference(e, y, miner_epsilon=eps, **kw), x)
    peer = _loss_and_grad(_pml(y, eps=eps, **kw), x.float())
    ours = _loss_and_grad(lambda e: multi_similarity_loss(e, y, miner_epsilon=eps, impl=impl, **kw), x.float())
    assert float(gold[0]) > 0 and ours[0].dtype == torch.float32
    _check(ours, gold, peer, 1e-6, 1e-5)


def test_miner_changes_the_loss(impl, device):
    """Guard that the mining path is exercised: mined and unmined losses differ on clustered data."""
    gen = torch.Generator().manual_seed(4)
    x, y = _clustered(60, 12, 5, gen, spread=0.8)
    x, y = x.float().to(device), y.to(device)
    mined = multi_similarity_loss(x, y, impl=impl)
    unmined = multi_similarity_loss(x, y, miner_epsilon=None, impl=impl)
    assert abs(float(mined) - float(unmined)) > 1e-3
    gold = multi_similarity_loss_reference(x.double(), y)
    assert_rule(mined, gold, _pml(y)(x), rel_slack=1e-6, what="mined loss")


def test_float64_matches_reference_tightly(impl, device):
    """The torch fallback computes float64 in float64; the Triton path in fp32 (looser slack)."""
    gen = torch.Generator().manual_seed(3)
    x, y = _clustered(57, 24, 6, gen, 2)
    x, y = x.to(device), y.to(device)
    gold = _loss_and_grad(lambda e: multi_similarity_loss_reference(e, y), x)
    ours = _loss_and_grad(lambda e: multi_similarity_loss(e, y, impl=impl), x)
    assert ours[0].dtype == torch.float64 and ours[1].dtype == torch.float64
    _check(ours, gold, gold, *((1e-12, 1e-12) if impl == "torch" else (1e-5, 1e-5)))


def test_arbitrary_label_values(impl, device):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(37, 12, generator=gen).to(device)
    dense = torch.randint(0, 5, (37,), generator=gen).to(device)
    assert_only_label_equality_matters(lambda e, y: multi_similarity_loss(e, y, impl=impl), x, dense, torch.uint8)


@pytest.mark.parametrize(
    "case, eps",
    [("all_singletons", 0.1), ("one_class", 0.1), ("single_row", None), ("single_row", 0.1), ("pair_one_each", 0.1)],
)
def test_documented_zero_loss(impl, device, case, eps):
    """Miner without positive or negative pairs, or <= 1 kept pair of each kind: 0, zero grads, no NaN."""
    gen = torch.Generator().manual_seed(8)
    n = {"all_singletons": 9, "one_class": 2, "single_row": 1, "pair_one_each": 3}[case]
    x = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    y = {"all_singletons": torch.arange(9), "one_class": torch.zeros(2, dtype=torch.long),
         "single_row": torch.tensor([0]), "pair_one_each": torch.tensor([0, 0, 1])}[case]
    if case == "pair_one_each":
        # cos(0,1) = 0.5 (same class), cos(0,2) = 0.9, cos(1,2) = 0.1: the miner keeps (0,1) and (0,2) only
        x = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.75**0.5, 0.0], [0.9, -0.35 / 0.75**0.5, 0.0]], dtype=torch.float64)
        x[2, 2] = (1 - x[2, :2].pow(2).sum()).sqrt()
    x, y = x.to(device), y.to(device)
    peer = _pml(y, eps=eps)(x.float())
    assert float(peer) == 0.0 and float(multi_similarity_loss_reference(x, y, miner_epsilon=eps)) == 0.0
    xg = x.float().requires_grad_()
    loss = multi_similarity_loss(xg, y, miner_epsilon=eps, impl=impl)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(xg.grad, torch.zeros_like(xg))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eps", [None, 0.1])
def test_half_precision_within_rule(impl, device, dtype, eps):
    """Half inputs: rows normalized in fp32 (never rounded to the input dtype). With the miner the data are
    spread out so that no pair sits within half-precision rounding of a mining threshold. The peer is the
    reference in the same dtype; in fp16 that overflows (exp(beta (s - base)) > 65504 gives a NaN
    gradient), so there the peer is the reference on the fp16-rounded inputs in fp32."""
    gen = torch.Generator().manual_seed(21)
    x, y = _clustered(50, 32, 7, gen, spread=0.6 if eps is None else 3.0)
    x, y = x.to(device), y.to(device)
    gold = _loss_and_grad(lambda e: multi_similarity_loss_reference(e, y, miner_epsilon=eps), x)
    peer_input = x.to(dtype) if dtype == torch.bfloat16 else x.to(dtype).float()
    peer = _loss_and_grad(lambda e: multi_similarity_loss_reference(e, y, miner_epsilon=eps), peer_input)
    ours = _loss_and_grad(lambda e: multi_similarity_loss(e, y, miner_epsilon=eps, impl=impl), x.to(dtype))
    assert ours[0].dtype == dtype and ours[1].dtype == dtype
    _check(ours, gold, peer, 1e-3, 1e-2)


def test_empty_batch_gives_zero_gradients(impl, device):
    """N = 0: loss 0 in the embeddings' dtype and a zero gradient of shape [0, D]."""
    for dtype in (torch.float32, torch.bfloat16):
        for eps in (None, 0.1):
            x = torch.randn(0, 12, device=device, dtype=dtype, requires_grad=True)
            loss = multi_similarity_loss(x, torch.zeros(0, dtype=torch.long, device=device), miner_epsilon=eps,
                                         impl=impl)
            assert loss.dtype == dtype and float(loss.detach()) == 0.0
            loss.backward()
            assert x.grad is not None and x.grad.shape == (0, 12)


@pytest.mark.parametrize("junk", JUNK, ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("d", [19, 70], ids=["fused", "tiled"])
@pytest.mark.parametrize("eps", [None, 0.1])
def test_padded_canary(impl, device, junk, d, eps):
    """Inputs are strided views into buffers whose padding rows / columns hold +inf, -inf or NaN (labels: a
    strided view between junk values): loss and gradient equal the clean contiguous run, and the padding
    gets exactly zero gradient."""
    gen = torch.Generator().manual_seed(13)
    n = 71
    x, y = _clustered(n, d, 6, gen, spread=1.5)
    x, y = x.float().to(device), y.to(device)
    buf = torch.full((n + 9, d + 13), junk, device=device)
    buf[:n, :d] = x
    buf.requires_grad_()
    lbuf = torch.full((2 * n + 1,), -987654321, dtype=y.dtype, device=device)
    lbuf[1::2] = y
    xc = x.clone().requires_grad_()
    clean = multi_similarity_loss(xc, y, miner_epsilon=eps, impl=impl)
    clean.backward()
    loss = multi_similarity_loss(buf[:n, :d], lbuf[1::2], miner_epsilon=eps, impl=impl)
    loss.backward()
    assert float(clean.detach()) > 0
    torch.testing.assert_close(loss, clean, rtol=1e-6, atol=0)
    torch.testing.assert_close(buf.grad[:n, :d], xc.grad, rtol=1e-6, atol=1e-9)
    assert not buf.grad[n:].any() and not buf.grad[:, d:].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eps", [None, 0.1])
def test_large_d_gradient_tile_path(device, monkeypatch, dtype, eps):
    """D above the fused limit: the kernel writes the scaled gradient tile chunk by chunk and torch.mm does
    the product. The limit is lowered to 16 and the chunk to a few tiles, so rows and columns both span
    several chunks; values and gradients follow the rule against float64."""
    monkeypatch.setattr(ms_mod, "_MAX_FUSED_D", 16)
    monkeypatch.setattr(metric_common, "GRAD_CHUNK_BYTES", 128 * 32 * 4)
    gen = torch.Generator().manual_seed(41)
    x, y = _clustered(150, 40, 6, gen, spread=3.0)
    x, y = x.to(device), y.to(device)
    gold = _loss_and_grad(lambda e: multi_similarity_loss_reference(e, y, miner_epsilon=eps), x)
    peer = _loss_and_grad(lambda e: multi_similarity_loss_reference(e, y, miner_epsilon=eps), x.to(dtype))
    ours = _loss_and_grad(lambda e: multi_similarity_loss(e, y, miner_epsilon=eps, impl="triton"), x.to(dtype))
    _check(ours, gold, peer, *((1e-6, 1e-5) if dtype == torch.float32 else (1e-3, 1e-2)))


def test_bad_input_errors_name_the_argument(device):
    assert_batch_input_errors(multi_similarity_loss, device)  # embeddings / labels
    x = torch.randn(6, 4, device=device)
    y = torch.tensor([0, 0, 1, 1, 2, 2], device=device)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        multi_similarity_loss(x, y, alpha=-1.0)
    with pytest.raises(ValueError, match="beta must be finite"):
        multi_similarity_loss(x, y, beta=float("nan"))
    with pytest.raises(TypeError, match="miner_epsilon must be a number"):
        multi_similarity_loss(x, y, miner_epsilon="0.1")


# ----------------------------------------------------------------------------------------------------
# sm_90 compile of every kernel as launched (blocks, warps, stages from the launch-config functions)
# ----------------------------------------------------------------------------------------------------
from aot import Spec, assert_specs, skip_on_gpu  # noqa: E402

_KERNEL_DTYPES = {torch.bfloat16: ("*bf16", "tl.bfloat16", "tf32"), torch.float32: ("*fp32", "tl.float32", "tf32x3"),
                  torch.float16: ("*fp16", "tl.float16", "tf32")}
_FP16_FUSED = ("*fp16", "tl.float32", "tf32")  # fp16 rows, the fused backward's dots on fp32 operands (grad_dot_config)
_F32 = "*fp32"
_STATS = dict(r_ptr=_F32, l_ptr="*i32", lse_pos_ptr=_F32, lse_neg_ptr=_F32, min_pos_ptr=_F32, max_neg_ptr=_F32,
              alpha="fp32", beta="fp32", base="fp32", eps="fp32")


def _spec(kernel, types, cfg, dtype, label, divisible, kernel_dtypes=None):
    ptr, dot, precision = kernel_dtypes or _KERNEL_DTYPES[dtype]
    cfg = dict(cfg)
    warps = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
    types = {k: ptr if v == "X" else v for k, v in dict(_STATS, **types).items()}
    return Spec("saga_kernels.multi_similarity", kernel, types,
                dict(USE_MINER=True, DOT_DTYPE=dot, PRECISION=precision, **cfg),
                label=f"{label} {str(dtype).replace('torch.', '')}", expect_wgmma=dot != "tl.float32",
                divisible=divisible, **warps)


def _aot_specs():
    """Real shapes: the forward and the gradient-tile kernel (D = 512 and 128; their blocks do not depend on
    D), the fused backward at the largest fused D and at D = 128 (bf16)."""
    specs = []
    for dtype in (torch.bfloat16, torch.float32):
        specs.append(_spec("_ms_fwd_kernel", dict(x_ptr="X", mined_pos_ptr="*i32", mined_neg_ptr="*i32"),
                           ms_mod.fwd_config(512, dtype), dtype, "D=512", ("N", "D", "stride_x")))
        specs.append(_spec("_ms_grad_tile_kernel", dict(x_ptr="X", coef_ptr=_F32, w_ptr="X"),
                           ms_mod.grad_tile_config(512, dtype), dtype, "D=512",
                           ("row0", "row1", "col0", "col1", "D", "stride_x", "stride_w")))
        fused = ms_mod.fused_max_d(dtype)
        for d in sorted({fused, min(fused, 128)}, reverse=True):
            specs.append(_spec("_ms_bwd_kernel", dict(x_ptr="X", coef_ptr=_F32, u_ptr=_F32),
                               ms_mod.bwd_config(d, dtype), dtype, f"D={d}", ("N", "D", "stride_x", "stride_u")))
    # fp16 rows: the gradient tile in an fp32 buffer, the fused backward on fp32 (tf32) operands with fp32's tiles
    specs.append(_spec("_ms_grad_tile_kernel", dict(x_ptr="X", coef_ptr=_F32, w_ptr=_F32),
                       ms_mod.grad_tile_config(512, torch.float16), torch.float16, "D=512",
                       ("row0", "row1", "col0", "col1", "D", "stride_x", "stride_w")))
    d = ms_mod.fused_max_d(grad_dtype(torch.float16))
    specs.append(_spec("_ms_bwd_kernel", dict(x_ptr="X", coef_ptr=_F32, u_ptr=_F32),
                       ms_mod.bwd_config(d, grad_dtype(torch.float16)), torch.float16, f"D={d}",
                       ("N", "D", "stride_x", "stride_u"), kernel_dtypes=_FP16_FUSED))
    return specs


AOT_SPECS = _aot_specs() if ms_mod.triton.__class__.__name__ != "_MissingTriton" else []


@skip_on_gpu
def test_kernels_compile_for_sm90():
    """bf16 (wgmma) and fp32 (tf32x3): no spills, <= 255 registers, shared memory < 228 KB."""
    assert_specs(AOT_SPECS)
