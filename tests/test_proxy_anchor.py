"""proxy_anchor_loss against pytorch-metric-learning 2.9 ProxyAnchorLoss and the float64 reference."""
import pytest
import torch
from pytorch_metric_learning.losses import ProxyAnchorLoss as PmlProxyAnchor

import saga_kernels.proxy_anchor as pa_module
from saga_kernels import proxy_anchor_loss
from saga_kernels.reference import proxy_anchor_loss_reference


def loss_and_grads(fn, embeddings, labels, proxies, **kw):
    e = embeddings.detach().clone().requires_grad_(True)
    p = proxies.detach().clone().requires_grad_(True)
    loss = fn(e, labels, p, **kw)
    loss.backward()
    return loss.detach(), e.grad, p.grad


def pml_loss_and_grads(embeddings, labels, proxies, *, margin=0.1, alpha=32.0):
    """pml's module with our proxies copied in (its loss is computed in the embeddings' dtype)."""
    num_classes, dim = proxies.shape
    module = PmlProxyAnchor(num_classes, dim, margin=margin, alpha=alpha).to(proxies.dtype)
    with torch.no_grad():
        module.proxies.copy_(proxies)
    e = embeddings.detach().clone().requires_grad_(True)
    loss = module(e, labels)
    loss.backward()
    return loss.detach(), e.grad, module.proxies.grad


def assert_gold_rule(ours, gold, peer, slack=1e-5):
    """|ours - gold| <= |peer - gold| + slack * max|gold| (max over entries), gold in float64."""
    for name, o, g, q in zip(("loss", "grad embeddings", "grad proxies"), ours, gold, peer):
        err = (o.double() - g).abs().max().item()
        bound = (q.double() - g).abs().max().item() + slack * g.abs().max().item()
        assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e}"


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


def test_bfloat16_inputs(impl, device):
    e, y, p = make_batch(21, 32, 7, [0, 1, 2, 5], seed=11, singleton=2, device=device)
    eb, pb = e.bfloat16(), p.bfloat16()
    gold = loss_and_grads(proxy_anchor_loss_reference, eb.double(), y, pb.double())
    ours = loss_and_grads(proxy_anchor_loss, eb, y, pb, impl=impl)
    assert ours[0].dtype == torch.bfloat16 and ours[1].dtype == torch.bfloat16 and ours[2].dtype == torch.bfloat16
    assert_gold_rule(ours, gold, pml_loss_and_grads(eb, y, pb), slack=1e-2)


def test_impls_agree_on_unnormalized_scales(device):
    g = torch.Generator().manual_seed(2)
    e = (torch.randn(45, 20, generator=g) * torch.rand(45, 1, generator=g) * 10).to(device)
    p = (torch.randn(13, 20, generator=g) * 0.01).to(device)
    y = torch.randint(0, 13, (45,), generator=g).to(device)
    a = loss_and_grads(proxy_anchor_loss, e, y, p, impl="triton")
    b = loss_and_grads(proxy_anchor_loss, e, y, p, impl="torch")
    for x, z in zip(a, b):
        torch.testing.assert_close(x, z, rtol=1e-4, atol=1e-6)


def test_bad_input(device):
    e, y, p = make_batch(8, 6, 4, [0, 1, 2, 3], seed=1, device=device)
    with pytest.raises(ValueError, match="labels has 7 entries"):
        proxy_anchor_loss(e, y[:7], p)
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
    with pytest.raises(ValueError, match="proxies must have shape"):
        proxy_anchor_loss(e, y, p[:, :5])
    with pytest.raises(TypeError, match="labels must have dtype"):
        proxy_anchor_loss(e, y.float(), p)
    with pytest.raises(ValueError, match="alpha must be"):
        proxy_anchor_loss(e, y, p, alpha=0.0)
    with pytest.raises(ValueError, match="margin must be a finite number"):
        proxy_anchor_loss(e, y, p, margin=float("nan"))
    with pytest.raises(ValueError, match="impl="):
        proxy_anchor_loss(e, y, p, impl="cuda")


def padded(t, fill):
    """``t`` as the head of a larger contiguous buffer whose tail holds ``fill`` (an out-of-bounds canary)."""
    buf = torch.full((t.numel() + 4096,), fill, dtype=t.dtype, device=t.device)
    buf[: t.numel()] = t.reshape(-1)
    return buf[: t.numel()].view(t.shape)


def test_triton_kernels_read_in_bounds(device):
    """NaN after the rows and class-0 labels after the labels: any unmasked read would change the result."""
    from saga_kernels._proxy_losses_triton import pa_backward, pa_forward

    e, y, p = make_batch(70, 19, 67, list(range(1, 67, 3)), seed=9, singleton=4, device=device)
    e = torch.nn.functional.normalize(e, dim=1)
    p = torch.nn.functional.normalize(p, dim=1)
    coefs = torch.tensor([-0.7, 0.3], device=device)
    want = pa_module._torch_forward(e, p, y, 32.0, 0.1)
    want_grads = pa_module._torch_backward(e, p, y, *want, coefs[0], coefs[1], 32.0, 0.1)
    ep, pp, yp = padded(e, float("nan")), padded(p, float("nan")), padded(y.to(torch.int32), 0)
    got = pa_forward(ep, pp, yp, 32.0, 0.1)
    got_grads = pa_backward(ep, pp, yp, *got, coefs, 32.0, 0.1)
    for a, b in zip(got + got_grads, want + want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


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
    """Compiled kernels (not the interpreter) at D = 512 with many tiles and column splits."""
    e, y, p = make_batch(1000, 512, 300, list(range(0, 300, 2)), seed=13, singleton=8, device="cuda")
    gold = loss_and_grads(proxy_anchor_loss_reference, e.double(), y, p.double())
    ours = loss_and_grads(proxy_anchor_loss, e, y, p, impl="triton")
    assert_gold_rule(ours, gold, pml_loss_and_grads(e, y, p))
