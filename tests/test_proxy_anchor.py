"""proxy_anchor_loss against pytorch-metric-learning 2.9 ProxyAnchorLoss and the float64 reference.

Values and gradients follow the tolerance rule of tests/utils.py: ``err(ours) <= err(pml in the same dtype)
+ rel_slack * max|gold|``, gold = the float64 reference (which is pml's definition, checked in float64).
"""
import pytest
import torch
from pytorch_metric_learning.losses import ProxyAnchorLoss as PmlProxyAnchor

import saga_kernels.metric_common as metric_common
import saga_kernels.proxy_anchor as pa_module
from saga_kernels import proxy_anchor_loss
from saga_kernels._checks import input_checks
from saga_kernels._tl_utils import dot_config, grad_dot_config, grad_dtype
from saga_kernels.reference import proxy_anchor_loss_reference

from aot import Spec, skip_on_gpu
from utils import JUNK, assert_canary_grad, assert_rule, assert_specs_parallel, canary_view

NAMES = ("loss", "grad embeddings", "grad proxies")


def loss_and_grads(fn, embeddings, labels, proxies, **kw):
    e = embeddings.detach().clone().requires_grad_(True)
    p = proxies.detach().clone().requires_grad_(True)
    loss = fn(e, labels, p, **kw)
    loss.backward()
    return loss.detach(), e.grad, p.grad


def pml_loss_and_grads(embeddings, labels, proxies, *, margin=0.1, alpha=32.0):
    """pml's module with our proxies copied in (its loss is computed in the embeddings' dtype)."""
    num_classes, dim = proxies.shape
    module = PmlProxyAnchor(num_classes, dim, margin=margin, alpha=alpha).to(proxies.device, proxies.dtype)
    with torch.no_grad():
        module.proxies.copy_(proxies)
    e = embeddings.detach().clone().requires_grad_(True)
    loss = module(e, labels)
    loss.backward()
    return loss.detach(), e.grad, module.proxies.grad


def assert_gold_rule(ours, gold, peer, rel_slack=1e-5):
    """The rule for (loss, grad embeddings, grad proxies), max-norm."""
    for name, o, g, q in zip(NAMES, ours, gold, peer):
        assert_rule(o, g, q, rel_slack=rel_slack, what=name)


def make_batch(n, d, num_classes, present, seed, singleton=None, device="cpu"):
    """Labels drawn from ``present`` classes (others absent); ``singleton`` appears exactly once."""
    g = torch.Generator().manual_seed(seed)
    present = torch.tensor(present)
    labels = present[torch.randint(0, len(present), (n,), generator=g)]
    if singleton is not None:
        labels[labels == singleton] = present[0]
        labels[n // 2] = singleton
    embeddings = torch.randn(n, d, generator=g) * 3.0
    proxies = torch.randn(num_classes, d, generator=g)
    return embeddings.to(device), labels.to(device), proxies.to(device)


CASES = [
    # (N, D, C, classes present in the batch, singleton class)
    pytest.param(37, 19, 11, [0, 1, 2, 3, 5, 8], 3, id="odd-absent-singleton"),
    pytest.param(70, 33, 67, list(range(0, 67, 2)), 10, id="multi-tile"),
    pytest.param(150, 8, 5, [0, 1, 2, 4], 4, id="column-splits"),
    pytest.param(1, 5, 3, [1], None, id="single-row"),
    pytest.param(9, 16, 4, [2], None, id="one-class-only"),
]


@pytest.mark.parametrize("n,d,c,present,singleton", CASES)
def test_matches_pml_and_reference(impl, device, n, d, c, present, singleton):
    e, y, p = make_batch(n, d, c, present, seed=n + d + c, singleton=singleton, device=device)
    gold = loss_and_grads(proxy_anchor_loss_reference, e.double(), y, p.double())
    pml64 = pml_loss_and_grads(e.double(), y, p.double())
    for g, q in zip(gold, pml64):  # the reference is pml's definition
        torch.testing.assert_close(g, q, rtol=1e-10, atol=1e-12)
    ours = loss_and_grads(proxy_anchor_loss, e, y, p, impl=impl)
    assert ours[0].dtype == torch.float32
    assert_gold_rule(ours, gold, pml_loss_and_grads(e, y, p))


def test_hyperparameters_and_int32_labels(impl, device):
    e, y, p = make_batch(29, 24, 9, [0, 1, 4, 7, 8], seed=3, singleton=7, device=device)
    kw = dict(margin=0.25, alpha=12.0)
    gold = loss_and_grads(proxy_anchor_loss_reference, e.double(), y, p.double(), **kw)
    ours = loss_and_grads(proxy_anchor_loss, e, y.to(torch.int32), p, impl=impl, **kw)
    assert_gold_rule(ours, gold, pml_loss_and_grads(e, y, p, **kw))
    ours8 = loss_and_grads(proxy_anchor_loss, e, y.to(torch.uint8), p, impl=impl, **kw)
    for a, b in zip(ours8, ours):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_float64_torch_path_is_exact(device):
    e, y, p = make_batch(23, 7, 6, [0, 2, 3, 5], seed=5, singleton=5, device=device)
    gold = loss_and_grads(proxy_anchor_loss_reference, e.double(), y, p.double())
    ours = loss_and_grads(proxy_anchor_loss, e.double(), y, p.double(), impl="torch")
    for o, g in zip(ours, gold):
        torch.testing.assert_close(o, g, rtol=1e-10, atol=1e-12)


def test_fallback_accumulates_over_row_chunks(monkeypatch, device):
    """Force 4-row chunks so the logaddexp fold and the per-chunk gradient sums are exercised."""
    e, y, p = make_batch(19, 11, 5, [0, 1, 3, 4], seed=7, singleton=1, device=device)
    gold = loss_and_grads(proxy_anchor_loss_reference, e.double(), y, p.double())
    monkeypatch.setattr(pa_module, "chunk_rows", lambda num_proxies: 4)
    ours = loss_and_grads(proxy_anchor_loss, e.double(), y, p.double(), impl="torch")
    for o, g in zip(ours, gold):
        torch.testing.assert_close(o, g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(impl, device, dtype):
    e, y, p = make_batch(21, 32, 7, [0, 1, 2, 5], seed=11, singleton=2, device=device)
    eh, ph = e.to(dtype), p.to(dtype)
    gold = loss_and_grads(proxy_anchor_loss_reference, eh.double(), y, ph.double())
    ours = loss_and_grads(proxy_anchor_loss, eh, y, ph, impl=impl)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype and ours[2].dtype == dtype
    assert_gold_rule(ours, gold, pml_loss_and_grads(eh, y, ph), rel_slack=1e-2)


def test_half_embeddings_fp32_proxies(impl, device):
    """A bf16 model with the module's fp32 proxies: each gradient in its input's dtype, at least as accurate
    as pml with the proxies rounded to bf16."""
    e, y, p = make_batch(26, 24, 6, [0, 1, 3, 5], seed=21, singleton=3, device=device)
    eh = e.bfloat16()
    gold = loss_and_grads(proxy_anchor_loss_reference, eh.double(), y, p.double())
    ours = loss_and_grads(proxy_anchor_loss, eh, y, p, impl=impl)
    assert (ours[0].dtype, ours[1].dtype, ours[2].dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    assert_gold_rule(ours, gold, pml_loss_and_grads(eh, y, p.bfloat16()), rel_slack=1e-2)


def test_impls_agree_on_unnormalized_scales(device):
    g = torch.Generator().manual_seed(2)
    e = (torch.randn(45, 20, generator=g) * torch.rand(45, 1, generator=g) * 10).to(device)
    p = (torch.randn(13, 20, generator=g) * 0.01).to(device)
    y = torch.randint(0, 13, (45,), generator=g).to(device)
    a = loss_and_grads(proxy_anchor_loss, e, y, p, impl="triton")
    b = loss_and_grads(proxy_anchor_loss, e, y, p, impl="torch")
    for x, z in zip(a, b):
        torch.testing.assert_close(x, z, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unfused_backward(monkeypatch, device, dtype):
    """D beyond the fused limit (lowered here so the interpreter runs it): the gradient tile is written in
    row chunks and torch.mm does the products; values and gradients as the reference (the rule) and as the
    fused kernels."""
    e, y, p = make_batch(45, 19, 9, [0, 1, 2, 4, 6, 8], seed=14, singleton=6, device=device)
    e, p = e.to(dtype), p.to(dtype)
    fused = loss_and_grads(proxy_anchor_loss, e, y, p, impl="triton")
    monkeypatch.setattr(pa_module, "_MAX_FUSED_D", 8)
    monkeypatch.setattr(metric_common, "GRAD_CHUNK_BYTES", 128 * 9 * 4)  # 128-row chunks: several of them
    assert not pa_module.fused_backward(19, dtype)
    ours = loss_and_grads(proxy_anchor_loss, e, y, p, impl="triton")
    gold = loss_and_grads(proxy_anchor_loss_reference, e.double(), y, p.double())
    assert_gold_rule(ours, gold, pml_loss_and_grads(e, y, p), rel_slack=1e-5 if dtype == torch.float32 else 1e-2)
    for a, b in zip(ours, fused):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unfused_backward_in_row_and_proxy_chunks(monkeypatch, device):
    """The large-D backward over several chunks of embedding rows AND of proxies (each chunk's labels index its
    own proxies): as the fused kernels and the reference."""
    e, y, p = make_batch(150, 19, 150, list(range(0, 150, 3)), seed=15, singleton=9, device=device)
    fused = loss_and_grads(proxy_anchor_loss, e, y, p, impl="triton")
    monkeypatch.setattr(pa_module, "_MAX_FUSED_D", 8)
    monkeypatch.setattr(metric_common, "GRAD_CHUNK_BYTES", 128 * 64 * 4)  # 128 x 64 chunks: 2 x 3 of them
    ours = loss_and_grads(proxy_anchor_loss, e, y, p, impl="triton")
    gold = loss_and_grads(proxy_anchor_loss_reference, e.double(), y, p.double())
    assert_gold_rule(ours, gold, pml_loss_and_grads(e, y, p))
    for a, b in zip(ours, fused):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bad_input(device):
    e, y, p = make_batch(8, 6, 4, [0, 1, 2, 3], seed=1, device=device)
    with pytest.raises(ValueError, match="labels has 7 entries"):
        proxy_anchor_loss(e, y[:7], p)
    with pytest.raises(ValueError, match="labels has 3 entries but embeddings has 0 rows"):
        proxy_anchor_loss(e[:0], y[:3], p)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        proxy_anchor_loss(e, torch.where(y == 0, 4, y), p)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        proxy_anchor_loss(e, torch.where(y == 0, -1, y), p)
    bad = e.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="embeddings contains 1 non-finite"):
        proxy_anchor_loss(bad, y, p)
    bad = p.clone()
    bad[1, 1] = float("inf")
    with pytest.raises(ValueError, match="proxies contains 1 non-finite"):
        proxy_anchor_loss(e, y, bad)
    with pytest.raises(ValueError, match="proxies contains 1 non-finite"):
        proxy_anchor_loss(e[:0], y[:0], bad)  # checked even for an empty batch
    with pytest.raises(ValueError, match="proxies must have shape"):
        proxy_anchor_loss(e, y, p[:, :5])
    with pytest.raises(ValueError, match="proxies must have shape"):
        proxy_anchor_loss(e, y, p[:0])
    with pytest.raises(TypeError, match="labels must have dtype"):
        proxy_anchor_loss(e, y.float(), p)
    with pytest.raises(ValueError, match="alpha must be"):
        proxy_anchor_loss(e, y, p, alpha=0.0)
    with pytest.raises(ValueError, match="margin must be a finite number"):
        proxy_anchor_loss(e, y, p, margin=float("nan"))
    with pytest.raises(ValueError, match="impl="):
        proxy_anchor_loss(e, y, p, impl="cuda")
    with input_checks("off"):  # value checks off: no error (and no host sync) for a NaN embedding
        proxy_anchor_loss(torch.where(e == e[0, 0], float("nan"), e), y, p, impl="torch")


def test_empty_batch(impl, device, monkeypatch):
    """N = 0: loss 0 in the embeddings' dtype, zero gradients of the right shape for BOTH inputs (an empty DDP
    rank still reduces a proxy gradient), and no kernel or fallback runs."""
    def fail(*args, **kwargs):
        raise AssertionError("no computation may run for an empty batch")

    for name in ("_triton_forward", "_torch_forward"):
        monkeypatch.setattr(pa_module, name, fail)
    p = torch.randn(5, 12, device=device)
    for dtype in (torch.float32, torch.bfloat16):
        e = torch.empty(0, 12, device=device, dtype=dtype, requires_grad=True)
        w = p.to(dtype).detach().requires_grad_(True)
        loss = proxy_anchor_loss(e, torch.empty(0, dtype=torch.int64, device=device), w, impl=impl)
        assert loss.dtype == dtype and loss.item() == 0.0
        loss.backward()
        assert e.grad.shape == (0, 12) and e.grad.dtype == dtype
        assert w.grad is not None and w.grad.dtype == dtype and torch.equal(w.grad, torch.zeros_like(w))
    frozen = torch.empty(0, 12, device=device)
    w = p.clone().requires_grad_(True)
    proxy_anchor_loss(frozen, torch.empty(0, dtype=torch.int32, device=device), w, impl=impl).backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_canary(impl, device, dtype, monkeypatch):
    """Embeddings, proxies and labels are views into buffers whose padding holds +inf, -inf, NaN (labels: out of
    range): loss and gradients equal the clean run, and the padding's gradient is exactly zero. Both backward
    kinds run (fused, and the chunked large-D one on the Triton path)."""
    e, y, p = make_batch(70, 21, 9, [0, 1, 2, 4, 5, 7], seed=31, singleton=4, device=device)
    e, p = e.to(dtype), p.to(dtype)
    for unfused in (False, True) if impl == "triton" else (False,):
        if unfused:
            monkeypatch.setattr(pa_module, "_MAX_FUSED_D", 8)
        clean = loss_and_grads(proxy_anchor_loss, e, y, p, impl=impl)
        for fill in JUNK:
            ebuf, _ = canary_view(e, fill)
            pbuf, _ = canary_view(p, fill)
            _, yv = canary_view(y, 10**9)
            ebuf.requires_grad_(True)
            pbuf.requires_grad_(True)
            loss = proxy_anchor_loss(ebuf[:70, :21], yv, pbuf[:9, :21], impl=impl)
            loss.backward()
            torch.testing.assert_close(loss.detach(), clean[0], rtol=0, atol=0)
            assert_canary_grad(ebuf, clean[1], fill)
            assert_canary_grad(pbuf, clean[2], fill)


def test_frozen_proxies_or_embeddings(impl, device):
    """Only the inputs that require grad get one, and it equals the full backward's."""
    e, y, p = make_batch(33, 10, 6, [0, 1, 2, 5], seed=12, device=device)
    _, ge, gp = loss_and_grads(proxy_anchor_loss, e, y, p, impl=impl)
    e1 = e.clone().requires_grad_(True)
    proxy_anchor_loss(e1, y, p, impl=impl).backward()
    torch.testing.assert_close(e1.grad, ge, rtol=0, atol=0)
    p1 = p.clone().requires_grad_(True)
    proxy_anchor_loss(e, y, p1, impl=impl).backward()
    torch.testing.assert_close(p1.grad, gp, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_real_width_matches_reference():
    """Compiled kernels (not the interpreter) at D = 512 with many tiles and column splits, fp32 and bf16."""
    e, y, p = make_batch(1000, 512, 300, list(range(0, 300, 2)), seed=13, singleton=8, device="cuda")
    gold = loss_and_grads(proxy_anchor_loss_reference, e.double(), y, p.double())
    ours = loss_and_grads(proxy_anchor_loss, e, y, p, impl="triton")
    assert_gold_rule(ours, gold, pml_loss_and_grads(e, y, p))
    eh, ph = e.bfloat16(), p.bfloat16()
    gold = loss_and_grads(proxy_anchor_loss_reference, eh.double(), y, ph.double())
    ours = loss_and_grads(proxy_anchor_loss, eh, y, ph, impl="triton")
    assert_gold_rule(ours, gold, pml_loss_and_grads(eh, y, ph), rel_slack=1e-2)


# ----------------------------------------------------------------------------------------------------------
# sm_90 compile of every kernel with the configuration its launcher uses (tests/aot.py)
# ----------------------------------------------------------------------------------------------------------
def _spec(kernel, cfg, dtype, label, types, divisible, fused_backward=False):
    consts = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
    dot_dtype, precision = (grad_dot_config if fused_backward else dot_config)(dtype, torch.device("cuda"))
    ptr = {torch.bfloat16: "*bf16", torch.float16: "*fp16"}.get(dtype, "*fp32")
    types = {k: (ptr if v == "*in" else v) for k, v in types.items()}
    return Spec("saga_kernels.proxy_anchor", kernel, types, {**consts, "DOT_DTYPE": dot_dtype, "PRECISION": precision},
                label=f"{str(dtype)[6:]} {label}", num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                divisible=divisible, expect_wgmma=True)


_SCALARS = {"alpha": "fp32", "margin": "fp32"}
_FP32_PTRS = dict.fromkeys(["rx_ptr", "rw_ptr", "lse_pos_ptr", "lse_neg_ptr", "coef_ptr"], "*fp32")
_IN = {"x_ptr": "*in", "w_ptr": "*in", "lab_ptr": "*i64"}
_BWD_PTRS = {"a_ptr": "*in", "b_ptr": "*in", "lab_ptr": "*i64", "u_ptr": "*fp32",
             **dict.fromkeys(["ra_ptr", "rb_ptr", "lse_pos_ptr", "lse_neg_ptr", "coef_ptr"], "*fp32")}
# Real sizes: N = 4096 (multiple of 16), C = 100 or 10,000 (not), D, row strides and column splits (multiples of
# the blocks) divisible by 16. D is a runtime argument of the forward and grad-tile kernels: one spec per dtype.
AOT_SPECS = []
for _dt in (torch.bfloat16, torch.float32):
    AOT_SPECS.append(_spec("_pa_fwd_kernel", pa_module.fwd_config(512, _dt), _dt, "any D",
                           {**_SCALARS, **_IN, "rx_ptr": "*fp32", "rw_ptr": "*fp32", "stats_ptr": "*fp32"},
                           ("N", "D", "stride_w", "stride_x", "cols_per_split")))
    for _d in ((512, 128) if _dt == torch.bfloat16 else (256, 128)):  # the largest fused D, and 128
        assert pa_module.fused_backward(_d, _dt)
        for _proxy_rows, _rows in ((False, "NA"), (True, "NB")):  # the embeddings' pass, the proxies' pass
            AOT_SPECS.append(_spec("_pa_bwd_kernel", {**pa_module.bwd_config(_d, _dt), "PROXY_ROWS": _proxy_rows},
                                   _dt, f"D={_d} {'proxy' if _proxy_rows else 'emb'} rows",
                                   {**_SCALARS, **_BWD_PTRS}, (_rows, "D", "stride_a", "stride_b", "cols_per_split"),
                                   fused_backward=True))
    AOT_SPECS.append(_spec("_pa_grad_tile_kernel", pa_module.grad_tile_config(4096, _dt), _dt, "any D",
                           {**_SCALARS, **_FP32_PTRS, **_IN, "g_ptr": "*in"},
                           ("N", "D", "stride_x", "stride_w", "stride_g")))
# fp16 inputs: the gradient tile in an fp32 buffer; the fused backward on fp32 (tf32) operands with fp32's tiles
_dt = torch.float16
for _proxy_rows, _rows in ((False, "NA"), (True, "NB")):
    AOT_SPECS.append(_spec("_pa_bwd_kernel", {**pa_module.bwd_config(256, grad_dtype(_dt)), "PROXY_ROWS": _proxy_rows},
                           _dt, f"D=256 {'proxy' if _proxy_rows else 'emb'} rows", {**_SCALARS, **_BWD_PTRS},
                           (_rows, "D", "stride_a", "stride_b", "cols_per_split"), fused_backward=True))
AOT_SPECS.append(_spec("_pa_grad_tile_kernel", pa_module.grad_tile_config(4096, _dt), _dt, "any D",
                       {**_SCALARS, **_FP32_PTRS, **_IN, "g_ptr": "*fp32"},
                       ("N", "D", "stride_x", "stride_w", "stride_g")))


@skip_on_gpu
def test_kernels_compile_for_sm90():
    """No spills, registers <= 255, shared memory < 228 KB, and wgmma (bf16, and fp32 as tf32x3) for every
    kernel as launched; two compiler processes share the list."""
    assert_specs_parallel(AOT_SPECS)
