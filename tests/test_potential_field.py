"""potential_field_loss against the float64 reference of METHOD.md's definition.

The same-dtype peer of the tolerance rule is the energy written with plain PyTorch ops on the
materialized Gram matrix, d = sqrt(2 - 2 x x^T), with autograd's backward. Any tiled evaluation has
that formula's float32 cancellation near d = 0 (only the N x N x D differences avoid it), so it is the
honest same-dtype baseline; errors are compared in Frobenius norm.
"""
import pytest
import torch
import torch.nn.functional as F

import saga_kernels.potential_field as pf_module
from saga_kernels import potential_field_loss
from saga_kernels.potential_field import MIN_DISTANCE
from saga_kernels.reference import potential_field_loss_reference


def reference(e, y, p, py, **kw):
    return potential_field_loss_reference(e, y, p, py, min_distance=MIN_DISTANCE, **kw)


def gram_peer(e, y, p, py, *, alpha=4.0, delta=0.2):
    points = torch.cat([F.normalize(e, dim=1), F.normalize(p, dim=1)])
    classes = torch.cat([y, py])
    n = points.shape[0]
    d = (2.0 - 2.0 * (points @ points.T)).clamp(min=MIN_DISTANCE**2).sqrt()
    same = classes[:, None] == classes[None, :]
    psi = torch.where(same, -d.clamp(min=delta).pow(-alpha), d.clamp(max=delta).pow(-alpha))
    return psi.masked_fill(torch.eye(n, dtype=torch.bool, device=psi.device), 0.0).sum() / (n * (n - 1))


def loss_and_grads(fn, e, y, p, py, **kw):
    e = e.detach().clone().requires_grad_(True)
    p = p.detach().clone().requires_grad_(True)
    loss = fn(e, y, p, py, **kw)
    loss.backward()
    return loss.detach(), e.grad, p.grad


def assert_gold_rule(ours, gold, peer, slack=1e-5):
    """||ours - gold|| <= ||peer - gold|| + slack * ||gold|| (Frobenius), gold in float64."""
    for name, o, g, q in zip(("loss", "grad embeddings", "grad proxies"), ours, gold, peer):
        err = (o.double() - g).norm().item()
        bound = (q.double() - g).norm().item() + slack * g.norm().item()
        assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e}"


def check(impl, e, y, p, py, **kw):
    gold = loss_and_grads(reference, e.double(), y, p.double(), py, **kw)
    ours = loss_and_grads(potential_field_loss, e, y, p, py, impl=impl, **kw)
    assert ours[0].dtype == e.dtype
    assert all(torch.isfinite(t).all() for t in ours)
    assert_gold_rule(ours, gold, loss_and_grads(gram_peer, e, y, p, py, **kw))
    return ours, gold


def make_set(n, d, num_classes, per_class, seed, device="cpu"):
    """Random embeddings/labels and ``per_class`` proxies per class, proxy classes in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    embeddings = torch.randn(n, d, generator=g) * 2.0
    proxies = torch.randn(num_classes * per_class, d, generator=g)
    order = torch.randperm(num_classes * per_class, generator=g)
    proxy_labels = torch.arange(num_classes).repeat_interleave(per_class)[order]
    return embeddings.to(device), labels.to(device), proxies.to(device), proxy_labels.to(device)


def near(point, distance, g):
    """A point at about ``distance`` from unit(point) on the sphere, with a random norm."""
    u = F.normalize(point, dim=0)
    v = torch.randn(point.shape, generator=g, dtype=point.dtype)
    v = F.normalize(v - (v @ u) * u, dim=0)
    return (u + distance * v) * (0.5 + torch.rand((), generator=g).item())


CASES = [
    # (N, D, classes, proxies per class)
    pytest.param(37, 19, 5, 1, id="odd-M1"),
    pytest.param(41, 3, 4, 3, id="low-dim-natural-close-pairs"),
    pytest.param(70, 24, 3, 15, id="multi-tile-M15"),
    pytest.param(1, 8, 2, 2, id="single-embedding"),
]


@pytest.mark.parametrize("n,d,c,m", CASES)
def test_matches_reference(impl, device, n, d, c, m):
    check(impl, *make_set(n, d, c, m, seed=n * d + m, device=device))


def test_closer_than_delta_and_coincident(impl, device):
    """Pairs at 0.03..0.15 (same and different class, embedding-embedding and embedding-proxy), exact
    duplicates and an embedding on top of a proxy: finite, and equal to the reference (both clamp)."""
    e, y, p, py = make_set(24, 16, 3, 2, seed=4)
    g = torch.Generator().manual_seed(5)
    y[0], y[1], y[2], y[3] = 0, 1, 0, 2
    e[1] = near(e[0], 0.05, g)  # different class, inside delta: repulsion d^-alpha
    e[2] = near(e[0], 0.12, g)  # same class, inside delta: flat attraction
    e[3] = near(e[2], 0.15, g)
    e[4] = near(p[(py == (1 - y[4].clamp(max=1))).nonzero()[0, 0]], 0.03, g)  # next to another class's proxy
    e[5] = near(p[(py == y[5]).nonzero()[0, 0]], 0.08, g)  # next to its own proxy
    e[6], y[6] = 3.0 * e[7], 1 - y[7].clamp(max=1)  # coincident, different class: clamped at MIN_DISTANCE
    e[8], y[8] = e[9], y[9]  # coincident, same class
    e[10] = p[(py != y[10]).nonzero()[0, 0]] * 2.0  # on top of another class's proxy
    d = torch.cdist(F.normalize(e.double(), dim=1), F.normalize(e.double(), dim=1))
    assert d[0, 1] < 0.2 and d[0, 2] < 0.2 and d[6, 7] < MIN_DISTANCE
    ours, gold = check(impl, e.to(device), y.to(device), p.to(device), py.to(device))
    n = e.shape[0] + p.shape[0]
    assert gold[0] > 2 * MIN_DISTANCE**-4 / (n * (n - 1))  # the clamped coincident pair (both orders) is in it


def test_hyperparameters(impl, device):
    e, y, p, py = make_set(30, 5, 3, 2, seed=8, device=device)
    check(impl, e, y, p, py, alpha=2.0, delta=0.5)


def test_float64_torch_path_is_exact(device):
    for n, d, c, m in [(37, 19, 5, 1), (41, 3, 4, 3)]:
        e, y, p, py = make_set(n, d, c, m, seed=1, device=device)
        gold = loss_and_grads(reference, e.double(), y, p.double(), py)
        ours = loss_and_grads(potential_field_loss, e.double(), y, p.double(), py, impl="torch")
        for o, g in zip(ours, gold):
            torch.testing.assert_close(o, g, rtol=1e-9, atol=1e-12)


def test_fallback_accumulates_over_row_chunks(monkeypatch, device):
    e, y, p, py = make_set(17, 4, 3, 2, seed=2, device=device)
    gold = loss_and_grads(reference, e.double(), y, p.double(), py)
    monkeypatch.setattr(pf_module, "tile_size", lambda n_cols: 5)
    ours = loss_and_grads(potential_field_loss, e.double(), y, p.double(), py, impl="torch")
    for o, g in zip(ours, gold):
        torch.testing.assert_close(o, g, rtol=1e-9, atol=1e-12)


def test_arbitrary_label_values(impl, device):
    """Labels are compared for equality only: negative and sparse class ids work."""
    e, y, p, py = make_set(19, 6, 3, 2, seed=3, device=device)
    values = torch.tensor([-7, 40, 1000], device=device)
    check(impl, e, values[y], p, values[py].to(torch.int32))


def test_bfloat16_inputs(impl, device):
    e, y, p, py = make_set(20, 16, 3, 2, seed=6, device=device)
    eb, pb = e.bfloat16(), p.bfloat16()
    gold = loss_and_grads(reference, eb.double(), y, pb.double(), py)
    ours = loss_and_grads(potential_field_loss, eb, y, pb, py, impl=impl)
    assert ours[0].dtype == torch.bfloat16 and ours[1].dtype == torch.bfloat16 and ours[2].dtype == torch.bfloat16
    assert_gold_rule(ours, gold, loss_and_grads(gram_peer, eb, y, pb, py), slack=1e-2)


def test_bad_input(device):
    e, y, p, py = make_set(8, 6, 3, 2, seed=1, device=device)
    with pytest.raises(ValueError, match="labels has 7 entries"):
        potential_field_loss(e, y[:7], p, py)
    with pytest.raises(ValueError, match=r"no proxy has .*\[3\]"):
        potential_field_loss(e, torch.where(y == 0, 3, y), p, py)
    with pytest.raises(ValueError, match="proxy_labels has 5 entries"):
        potential_field_loss(e, y, p, py[:5])
    with pytest.raises(ValueError, match="proxies must have shape"):
        potential_field_loss(e, y, p[:, :4], py)
    bad = e.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="embeddings contains 1 non-finite"):
        potential_field_loss(bad, y, p, py)
    bad = p.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="proxies contains 1 non-finite"):
        potential_field_loss(e, y, bad, py)
    with pytest.raises(TypeError, match="proxy_labels must have dtype"):
        potential_field_loss(e, y, p, py.float())
    with pytest.raises(ValueError, match="delta must be"):
        potential_field_loss(e, y, p, py, delta=-0.1)
    with pytest.raises(ValueError, match="alpha must be"):
        potential_field_loss(e, y, p, py, alpha=float("nan"))


def padded(t, fill):
    """``t`` as the head of a larger contiguous buffer whose tail holds ``fill`` (an out-of-bounds canary)."""
    buf = torch.full((t.numel() + 4096,), fill, dtype=t.dtype, device=t.device)
    buf[: t.numel()] = t.reshape(-1)
    return buf[: t.numel()].view(t.shape)


def test_triton_kernels_read_in_bounds(device):
    """NaN after the rows and class-0 labels after the labels: any unmasked read would change the result."""
    from saga_kernels._proxy_losses_triton import pf_backward, pf_forward

    e, y, p, py = make_set(50, 13, 3, 7, seed=10, device=device)
    x = F.normalize(torch.cat([e, p]), dim=1)
    lab = torch.cat([y, py]).to(torch.int32)
    coef = torch.tensor([0.37], device=device)
    want = pf_module._torch_forward(x, lab, 4.0, 0.2)
    want_grad = pf_module._torch_backward(x, lab, coef, 4.0, 0.2)
    xp, lp = padded(x, float("nan")), padded(lab, 0)
    torch.testing.assert_close(pf_forward(xp, lp, 4.0, 0.2, MIN_DISTANCE), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(pf_backward(xp, lp, coef, 4.0, 0.2, MIN_DISTANCE), want_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_real_width_matches_reference():
    """Compiled kernels (not the interpreter) at D = 512 with many tiles and column splits."""
    e, y, p, py = make_set(700, 512, 40, 15, seed=14, device="cuda")
    check("triton", e, y, p, py)
