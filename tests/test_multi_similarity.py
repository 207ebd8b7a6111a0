"""multi_similarity_loss vs pml 2.9 MultiSimilarityLoss (+ MultiSimilarityMiner) and the float64 reference."""
import pytest
import torch
from pytorch_metric_learning.losses import MultiSimilarityLoss
from pytorch_metric_learning.miners import MultiSimilarityMiner

from saga_kernels import multi_similarity_loss
from saga_kernels.reference import multi_similarity_loss_reference


def _loss_and_grad(fn, x):
    x = x.detach().clone().requires_grad_()
    loss = fn(x)
    loss.backward()
    return loss.detach(), x.grad


def _assert_rule(ours, gold, peer, rel_slack, what):
    """|ours - gold| <= |peer - gold| + rel_slack * max|gold| (gold in float64, peer = pml in ours' dtype)."""
    ours, gold, peer = ours.double(), gold.double(), peer.double()
    slack = rel_slack * max(float(gold.abs().max()), 1e-30)
    excess = ((ours - gold).abs() - (peer - gold).abs() - slack).max()
    assert excess <= 0, f"{what}: error exceeds pml's by {float(excess):.3g} (slack {slack:.3g})"


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
        (130, 70, 4, 0, dict(spread=1.5)),  # several row/column tiles and D chunks
        (64, 16, 64, 0, dict(eps=None)),  # all singletons without the miner: negatives only
        (40, 150, 5, 0, dict(spread=3.0)),  # D > BLOCK_DO: two gradient-output chunks
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
    _assert_rule(ours[0], gold[0], peer[0], 1e-6, "loss")
    _assert_rule(ours[1], gold[1], peer[1], 1e-5, "grad")


def test_miner_changes_the_loss(impl, device):
    """Guard that the mining path is exercised: mined and unmined losses differ on clustered data."""
    gen = torch.Generator().manual_seed(4)
    x, y = _clustered(60, 12, 5, gen, spread=0.8)
    x, y = x.float().to(device), y.to(device)
    mined = multi_similarity_loss(x, y, impl=impl)
    unmined = multi_similarity_loss(x, y, miner_epsilon=None, impl=impl)
    assert abs(float(mined) - float(unmined)) > 1e-3
    torch.testing.assert_close(mined, _pml(y)(x), rtol=1e-5, atol=1e-6)


def test_float64_matches_reference_tightly(impl, device):
    """The torch fallback computes float64 in float64; the Triton path in fp32 (looser bound)."""
    gen = torch.Generator().manual_seed(3)
    x, y = _clustered(57, 24, 6, gen, 2)
    x, y = x.to(device), y.to(device)
    gold = _loss_and_grad(lambda e: multi_similarity_loss_reference(e, y), x)
    ours = _loss_and_grad(lambda e: multi_similarity_loss(e, y, impl=impl), x)
    assert ours[0].dtype == torch.float64 and ours[1].dtype == torch.float64
    tol = 1e-12 if impl == "torch" else 1e-5
    torch.testing.assert_close(ours[0], gold[0], rtol=tol, atol=tol)
    torch.testing.assert_close(ours[1], gold[1], rtol=tol, atol=tol * float(gold[1].abs().max()))


def test_arbitrary_label_values(impl, device):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(37, 12, generator=gen).to(device)
    dense = torch.randint(0, 5, (37,), generator=gen).to(device)
    odd = torch.tensor([-7, 2**40, 3, -1, 99], device=device)[dense]
    torch.testing.assert_close(multi_similarity_loss(x, odd, impl=impl), multi_similarity_loss(x, dense, impl=impl))
    torch.testing.assert_close(
        multi_similarity_loss(x, dense.to(torch.uint8), impl=impl), multi_similarity_loss(x, dense, impl=impl)
    )


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


def test_bfloat16_within_rule(impl, device):
    gen = torch.Generator().manual_seed(21)
    x, y = _clustered(50, 32, 7, gen)
    x, y = x.to(device), y.to(device)
    gold = _loss_and_grad(lambda e: multi_similarity_loss_reference(e, y, miner_epsilon=None), x)
    peer = _loss_and_grad(lambda e: multi_similarity_loss_reference(e, y, miner_epsilon=None), x.bfloat16())
    ours = _loss_and_grad(lambda e: multi_similarity_loss(e, y, miner_epsilon=None, impl=impl), x.bfloat16())
    assert ours[0].dtype == torch.bfloat16 and ours[1].dtype == torch.bfloat16
    _assert_rule(ours[0], gold[0], peer[0], 1e-3, "loss")
    _assert_rule(ours[1], gold[1], peer[1], 1e-2, "grad")


def test_triton_kernels_respect_masks_and_strides(device):
    """Kernels read a strided view of a NaN-filled buffer: any out-of-bounds read poisons the stats."""
    pytest.importorskip("triton")
    from saga_kernels._metric_triton import MULTI_SIMILARITY, ms_forward, pair_backward
    from saga_kernels.multi_similarity import _forward_torch

    gen = torch.Generator().manual_seed(13)
    n, d = 71, 19
    buf = torch.full((n + 9, d + 13), float("nan"), device=device)
    buf[:n, :d] = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1).to(device)
    q = buf[:n, :d]
    lab = torch.randint(0, 6, (n,), generator=gen).to(device=device, dtype=torch.int32)
    stats = ms_forward(q, lab, 2.0, 50.0, 0.5, 0.1, True)
    expected = _forward_torch(q.contiguous(), lab, 2.0, 50.0, 0.5, 0.1)
    for got, want in zip(stats, expected):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    coef = torch.full((n,), 1.0 / n, device=device)
    dq, dk = pair_backward(q, q, lab, lab, stats[:4], coef, (2.0, 50.0, 0.5, 0.1), loss=MULTI_SIMILARITY,
                           exclude_diagonal=True, use_miner=True, need_dq=True, need_dk=True)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all()


def test_bad_input_errors_name_the_argument(device):
    x = torch.randn(6, 4, device=device)
    y = torch.tensor([0, 0, 1, 1, 2, 2], device=device)
    bad = x.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="embeddings contains 1 non-finite"):
        multi_similarity_loss(bad, y)
    with pytest.raises(ValueError, match="labels has 7 entries but embeddings has 6 rows"):
        multi_similarity_loss(x, torch.zeros(7, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match="labels must have dtype"):
        multi_similarity_loss(x, y.double())
    with pytest.raises(ValueError, match="alpha must be > 0"):
        multi_similarity_loss(x, y, alpha=-1.0)
    with pytest.raises(ValueError, match="beta must be finite"):
        multi_similarity_loss(x, y, beta=float("nan"))
    with pytest.raises(TypeError, match="miner_epsilon must be a number"):
        multi_similarity_loss(x, y, miner_epsilon="0.1")
    with pytest.raises(ValueError, match="embeddings must have at least one row"):
        multi_similarity_loss(x[:0], y[:0])
