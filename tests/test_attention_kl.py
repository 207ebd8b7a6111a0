"""attention_kl vs torch.nn.functional.kl_div on renormalized masked rows and the float64 reference; junk at masked
entries, non-finite values at live ones, empty inputs, check modes."""
import pytest
import torch
import torch.nn.functional as F

from saga_kernels import attention_kl
from saga_kernels._checks import input_checks
from saga_kernels.reference import attention_kl_reference

from utils import JUNK, assert_rule, poison

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
    assert_rule(ours.detach(), gold.detach(), peer.detach(), slack=SLACK, rel_slack=SLACK, what="loss")
    assert_rule(z.grad, z_gold.grad, z_peer.grad, slack=SLACK, what="grad")
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
    peer = _kl_div_rows(logits, target, torch.ones_like(logits, dtype=torch.bool))
    assert_rule(out.flatten(), gold, peer, slack=SLACK, rel_slack=SLACK)


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
    z_peer = logits.clone().requires_grad_(True)  # kl_div in bf16: the peer's error budget
    peer = _kl_div_rows(z_peer, target.bfloat16(), mask).mean()
    peer.backward()
    assert_rule(out.detach(), gold.detach(), peer.detach(), slack=SLACK, rel_slack=SLACK, what="loss")
    assert_rule(z.grad, z_gold.grad, z_peer.grad, slack=SLACK, what="grad")


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


def _loss_and_grad(logits, target, mask, reduction, impl, weight):
    z = logits.clone().requires_grad_(True)
    loss = attention_kl(z, target, mask=mask, reduction=reduction, impl=impl)
    (loss * weight).sum().backward()
    return loss, z.grad


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_junk_at_masked_entries_changes_nothing(impl, device, reduction, dtype):
    """+inf, -inf or NaN at every masked entry of logits AND target: loss and gradient equal the clean run
    exactly, and the gradient there is exactly 0."""
    logits, target, mask = _inputs(7, 45, device, seed=5, dtype=dtype)
    weight = torch.randn(7, device=device) if reduction == "none" else torch.tensor(0.8, device=device)
    clean_loss, clean_grad = _loss_and_grad(logits, target, mask, reduction, impl, weight)
    assert torch.isfinite(clean_grad).all()
    for value in JUNK:
        loss, grad = _loss_and_grad(poison(logits, mask, value), poison(target, mask, value), mask, reduction,
                                    impl, weight)
        assert torch.equal(loss, clean_loss), value
        assert torch.equal(grad, clean_grad), value
        assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("value", JUNK)
def test_non_finite_live_entries_raise(impl, device, value):
    logits, target, mask = _inputs(4, 20, device, seed=6)
    live = mask.nonzero()[5].tolist()
    bad = logits.clone()
    bad[tuple(live)] = value
    with pytest.raises(ValueError, match="logits contains"):
        attention_kl(bad, target, mask=mask, impl=impl)
    bad = target.clone()
    bad[tuple(live)] = value
    with pytest.raises(ValueError, match="target contains"):
        attention_kl(logits, bad, mask=mask, impl=impl)
    with pytest.raises(ValueError, match="logits contains"):  # no mask: every entry is live
        attention_kl(logits.masked_fill(~mask, value), target, impl=impl)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_empty_inputs_give_zero_loss_and_zero_grad(impl, device, reduction):
    for shape in ((0, 9), (3, 0, 9), (0, 0)):
        z = torch.randn(shape, device=device).requires_grad_(True)
        target = torch.rand(shape, device=device)
        loss = attention_kl(z, target, mask=torch.ones(shape, dtype=torch.bool, device=device),
                            reduction=reduction, impl=impl)
        assert loss.shape == (shape[:-1] if reduction == "none" else ())
        assert loss.dtype == torch.float32 and (loss == 0).all()
        loss.sum().backward()
        assert z.grad is not None and z.grad.shape == shape


def test_check_modes(impl, device):
    """"async" asserts the same conditions on device (on the CPU torch._assert_async raises at once);
    "off" reads no values."""
    logits, target, mask = _inputs(3, 8, device)
    empty = mask.clone()
    empty[1] = False
    with input_checks("async"):
        with pytest.raises(RuntimeError, match="target must have positive mass"):
            attention_kl(logits, target, mask=empty, impl=impl)
        with pytest.raises(RuntimeError, match="logits contains non-finite"):
            attention_kl(logits.masked_fill(mask, float("nan")), target, mask=mask, impl=impl)
        with pytest.raises(RuntimeError, match="target must be non-negative"):
            attention_kl(logits, target - 2.0, mask=mask, impl=impl)
        attention_kl(logits.masked_fill(~mask, float("nan")), target, mask=mask, impl=impl)
    with input_checks("off"):
        out = attention_kl(logits.masked_fill(mask, float("nan")), target, mask=mask, reduction="none", impl=impl)
    assert torch.isnan(out).all()
