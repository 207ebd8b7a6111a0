"""The metric nn.Modules: proxies, buffers, and agreement with the functions and pytorch-metric-learning."""
import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

import saga_kernels
from saga_kernels import (
    MultiSimilarityLoss,
    PotentialFieldLoss,
    ProxyAnchorLoss,
    SupConLoss,
    potential_field_loss,
)


def batch(n=26, d=12, num_classes=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, num_classes, (n,), generator=g)


def test_exports():
    for name in ("proxy_anchor_loss", "potential_field_loss", "ProxyAnchorLoss", "PotentialFieldLoss",
                 "SupConLoss", "MultiSimilarityLoss"):
        assert hasattr(saga_kernels, name), name


def test_proxy_anchor_module_matches_pml(impl, device):
    torch.manual_seed(0)
    ours = ProxyAnchorLoss(7, 12, margin=0.15, alpha=20.0, impl=impl).to(device)
    assert ours.proxies.shape == (7, 12) and ours.proxies.requires_grad
    peer = pml_losses.ProxyAnchorLoss(7, 12, margin=0.15, alpha=20.0).to(device)
    with torch.no_grad():
        peer.proxies.copy_(ours.proxies)
    e, y = (t.to(device) for t in batch(num_classes=6, dtype=torch.float32))
    e1, e2 = e.clone().requires_grad_(True), e.clone().requires_grad_(True)
    loss = ours(e1, y)
    loss.backward()
    ref = peer(e2, y)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(e1.grad, e2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.proxies.grad, peer.proxies.grad, rtol=1e-4, atol=1e-6)


def test_proxy_init_is_kaiming_fan_out():
    torch.manual_seed(1)
    pa = ProxyAnchorLoss(50, 400)
    pf = PotentialFieldLoss(10, 400, proxies_per_class=5)
    for proxies in (pa.proxies, pf.proxies):  # fan_out of a [rows, D] matrix is rows: std sqrt(2 / rows)
        std = (2.0 / proxies.shape[0]) ** 0.5
        assert abs(proxies.std().item() / std - 1) < 0.05
        assert abs(proxies.mean().item()) < 0.05 * std


def test_potential_field_module():
    torch.manual_seed(2)
    module = PotentialFieldLoss(4, 12, proxies_per_class=3, alpha=3.0, delta=0.3, impl="torch").double()
    assert module.proxies.shape == (12, 12) and module.proxies.dtype == torch.float64
    assert module.proxy_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert module.proxy_labels.dtype == torch.int64
    assert set(module.state_dict()) == {"proxies", "proxy_labels"}
    e, y = batch(num_classes=4)
    loss = module(e, y)
    loss.backward()
    p = module.proxies.detach().clone().requires_grad_(True)
    expected = potential_field_loss(e, y, p, module.proxy_labels, alpha=3.0, delta=0.3, impl="torch")
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    torch.testing.assert_close(module.proxies.grad, p.grad, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no proxy has"):
        module(e, torch.full_like(y, 4))


def test_supcon_module_matches_pml():
    e, y = batch(seed=3)
    loss = SupConLoss(temperature=0.2, impl="torch")(e, y)
    torch.testing.assert_close(loss, pml_losses.SupConLoss(temperature=0.2)(e, y), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("miner_epsilon", [0.1, None])
def test_multi_similarity_module_matches_pml(miner_epsilon):
    e, y = batch(seed=4)
    loss = MultiSimilarityLoss(alpha=2.0, beta=40.0, base=0.4, miner_epsilon=miner_epsilon, impl="torch")(e, y)
    peer = pml_losses.MultiSimilarityLoss(alpha=2.0, beta=40.0, base=0.4)
    mined = pml_miners.MultiSimilarityMiner(epsilon=miner_epsilon)(e, y) if miner_epsilon is not None else None
    torch.testing.assert_close(loss, peer(e, y, mined), rtol=1e-9, atol=1e-12)


def test_bad_sizes():
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        ProxyAnchorLoss(0, 8)
    with pytest.raises(ValueError, match="proxies_per_class must be an integer >= 1"):
        PotentialFieldLoss(3, 8, proxies_per_class=0)
    with pytest.raises(ValueError, match="embedding_size must be an integer >= 1"):
        PotentialFieldLoss(3, 8.0)
