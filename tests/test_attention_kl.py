"""attention_kl vs torch.nn.functional.kl_div on renormalized masked rows and the float64 reference."""
import pytest
import torch
import torch.nn.functional as F

from saga_kernels import attention_kl
from saga_kernels.reference import attention_kl_reference

SLACK = 1e-6  # absolute, and relative to the value (sums over rows round at about |value| * 2**-23)


def _inputs(rows, n, device, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(rows, n, generator=g)).to(device, dtype)
    target = torch.rand(rows, n, generator=g)
    target[torch.rand(rows, n, generator=g) < 0.2] = 0.0  # exact zeros: 0 log 0 = 0
    mask = torch.rand(rows, n, generator=g) < 0.7
    mask[:, 0] = True
    target[:, 0] += 0.1  # every row keeps positive mass on its mask
    return logits, target.to(device), mask.to(device)


def _kl_div_rows(logits, target, mask):
    """torch's kl_div, one row at a time on the masked entries, target renormalized there."""
    losses = []
    for z, a, m in zip(logits, target, mask):
        t = a[m] / a[m].sum()
        losses.append(F.kl_div(torch.log_softmax(z[m], dim=-1), t, reduction="sum"))
    return torch.stack(losses)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_matches_kl_div_values_and_grads(impl, device, reduction):
    logits, target, mask = _inputs(9, 37, device)
    weight = torch.randn(9, device=device) if reduction == "none" else torch.tensor(1.7, device=device)

    z = logits.clone().requires_grad_(True)
    ours = attention_kl(z, target, mask=mask, reduction=reduction, impl=impl)
    (ours * weight).sum().backward()

    z_peer = logits.clone().requires_grad_(True)
    rows = _kl_div_rows(z_peer, target, mask)
    peer = {"none": rows, "sum": rows.sum(), "batchmean": rows.mean()}[reduction]
    (peer * weight).sum().backward()

    z_gold = logits.double().requires_grad_(True)
    gold = attention_kl_reference(z_gold, target.double(), mask, reduction)
    (gold * weight.double()).sum().backward()

    assert ours.shape == peer.shape
    assert ((ours.double() - gold).abs() <= (peer.double() - gold).abs() + SLACK * (1 + gold.abs())).all()
    assert ((z.grad.double() - z_gold.grad).abs() <= (z_peer.grad.double() - z_gold.grad).abs() + SLACK).all()
    assert (z.grad[~mask] == 0).all()


def test_target_is_renormalized_and_gets_no_grad(impl, device):
    logits, target, mask = _inputs(4, 20, device, seed=1)
    target = target.requires_grad_(True)
    base = attention_kl(logits, target, mask=mask, reduction="none", impl=impl)
    scaled = attention_kl(logits, 7.5 * target.detach(), mask=mask, reduction="none", impl=impl)
    torch.testing.assert_close(base, scaled)
    noise = torch.where(mask, torch.zeros_like(target), torch.rand_like(target))
    off_mask = attention_kl(logits, target.detach() + noise, mask=mask, reduction="none", impl=impl)
    torch.testing.assert_close(base, off_mask)  # entries outside the mask are ignored
    assert not base.requires_grad


def test_leading_dims_and_no_mask(impl, device):
    logits, target, _ = _inputs(6, 17, device, seed=2)
    logits3, target3 = logits.view(2, 3, 17), target.view(2, 3, 17)
    out = attention_kl(logits3, target3, reduction="none", impl=impl)
    assert out.shape == (2, 3)
    gold = attention_kl_reference(logits.double(), target.double(), None, "none")
    torch.testing.assert_close(out.double().flatten(), gold, atol=1e-5, rtol=1e-5)


def test_equal_distributions_give_zero(impl, device):
    logits, _, mask = _inputs(5, 12, device, seed=3)
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    z = logits.clone().requires_grad_(True)
    out = attention_kl(z, probs, mask=mask, reduction="sum", impl=impl)
    out.backward()
    assert out.abs() < 1e-5
    assert z.grad.abs().max() < 1e-6


def test_bf16_logits(impl, device):
    logits, target, mask = _inputs(5, 40, device, seed=4, dtype=torch.bfloat16)
    z = logits.clone().requires_grad_(True)
    out = attention_kl(z, target, mask=mask, impl=impl)
    out.backward()
    assert out.dtype == torch.float32 and z.grad.dtype == torch.bfloat16
    z_gold = logits.double().requires_grad_(True)
    gold = attention_kl_reference(z_gold, target.double(), mask, "batchmean")
    gold.backward()
    torch.testing.assert_close(out.double(), gold, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z.grad.double(), z_gold.grad, atol=4e-3, rtol=1e-2)


def test_bad_inputs(device):
    logits, target, mask = _inputs(3, 8, device)
    with pytest.raises(ValueError, match="target must have shape"):
        attention_kl(logits, target[:, :4])
    with pytest.raises(TypeError, match="mask must have dtype"):
        attention_kl(logits, target, mask=mask.float())
    with pytest.raises(ValueError, match="reduction"):
        attention_kl(logits, target, reduction="mean")
    with pytest.raises(ValueError, match="non-negative"):
        attention_kl(logits, target - 2.0)
    empty = mask.clone()
    empty[1] = False
    with pytest.raises(ValueError, match="target row 1 has no positive mass"):
        attention_kl(logits, target, mask=empty)
    with pytest.raises(ValueError, match="logits contains"):
        attention_kl(logits.masked_fill(mask, float("nan")), target, mask=mask)
