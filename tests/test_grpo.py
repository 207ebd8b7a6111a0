"""grpo_loss / linear_grpo_loss / LinearGRPOLoss against the float64 reference and Liger-Kernel."""
import json
import os
import socket

import pytest
import torch

from saga_kernels import LinearGRPOLoss, grpo_loss, input_checks, linear_grpo_loss
from saga_kernels.reference import grpo_loss_reference, linear_logprobs_reference

from utils import JUNK

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
B, T, H, V = 3, 11, 37, 1001


def make_batch(seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(B, T, generator=g, dtype=torch.float64) * 5
    mask = (torch.rand(B, T, generator=g) > 0.25).long()
    mask[0] = 1
    mask[1, :3] = 1
    mask[2] = 0  # one empty completion
    mask[2, 0] = 1
    advantages = torch.randn(B, generator=g, dtype=torch.float64)
    advantages[1] = -advantages[1].abs()
    # token ratios spread around 1; per-sequence offsets push whole-sequence (GSPO) ratios out of the clip range too
    offset = torch.tensor([[-0.3], [0.4], [0.0]], dtype=torch.float64)
    old = logprobs + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3 + offset
    ref = logprobs + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    return [t.to(device) for t in (logprobs, mask, advantages, old, ref)]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("with_old,with_ref", [(False, False), (True, False), (True, True), (False, True)])
def test_grpo_loss_matches_reference(loss_type, level, with_old, with_ref):
    logprobs, mask, adv, old, ref = make_batch()
    kw = dict(old_logprobs=old if with_old else None, ref_logprobs=ref if with_ref else None,
              beta=0.04 if with_ref else 0.0, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type,
              max_completion_length=T + 2, importance_sampling_level=level)
    lp1 = logprobs.clone().requires_grad_(True)
    lp2 = logprobs.clone().requires_grad_(True)
    loss, stats = grpo_loss(lp1, mask, adv, **kw)
    gold = grpo_loss_reference(lp2, mask, adv, **kw)
    loss.backward()
    gold.backward()
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, gold, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lp1.grad, lp2.grad, rtol=1e-12, atol=1e-12)
    assert torch.all(lp1.grad[mask == 0] == 0)
    assert all(not v.requires_grad for v in stats.values())
    if with_old:
        assert 0 < stats["clip_ratio"] < 1
        torch.testing.assert_close(stats["clip_ratio"], stats["clip_ratio_low"] + stats["clip_ratio_high"])


def test_clip_stats_by_hand():
    lp = torch.zeros(2, 4)
    old = torch.log(torch.tensor([[1.0, 2.0, 0.5, 1.1], [0.5, 2.0, 1.0, 1.0]]))  # ratio = 1 / those
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    adv = torch.tensor([1.0, -1.0])
    # row 0 (A > 0): ratios 1, 0.5, 2, 0.909 -> only ratio 2 > 1.2 is clipped (high)
    # row 1 (A < 0): ratios 2, 0.5, 1 -> only 0.5 < 0.8 is clipped (low); the last token is masked
    _, stats = grpo_loss(lp, mask, adv, old_logprobs=old)
    assert stats["clip_ratio_high"].item() == pytest.approx(1 / 7)
    assert stats["clip_ratio_low"].item() == pytest.approx(1 / 7)
    assert stats["clip_ratio"].item() == pytest.approx(2 / 7)
    assert stats["num_tokens"].item() == 7
    assert stats["kl"].item() == 0


def test_no_old_logprobs_is_advantage_weighted_nll():
    """SAGA's case: ratio exactly 1, no clipping, gradient of -sum(m A lp) / sum(m)."""
    logprobs, mask, adv, _, _ = make_batch(seed=1)
    lp1 = logprobs.clone().requires_grad_(True)
    loss, stats = grpo_loss(lp1, mask, adv, loss_type="dapo")
    loss.backward()
    lp2 = logprobs.clone().requires_grad_(True)
    m = mask.double()
    nll = -(adv[:, None] * lp2 * m).sum() / m.sum()
    nll.backward()
    assert torch.equal(lp1.grad, lp2.grad) or torch.allclose(lp1.grad, lp2.grad, rtol=1e-14, atol=0)
    assert stats["ratio_mean"].item() == 1.0 and stats["clip_ratio"].item() == 0.0
    torch.testing.assert_close(loss, -(adv[:, None] * m).sum() / m.sum())


def test_dapo_num_items_in_batch_accumulates():
    """Two calls dividing by the batch's token count add up to one call over the whole batch."""
    logprobs, mask, adv, old, _ = make_batch(seed=2)
    whole = logprobs.clone().requires_grad_(True)
    parts = logprobs.clone().requires_grad_(True)
    loss, _ = grpo_loss(whole, mask, adv, old_logprobs=old)
    loss.backward()
    total = int(mask.sum())
    acc = sum(grpo_loss(parts[s], mask[s], adv[s], old_logprobs=old[s], num_items_in_batch=total)[0]
              for s in (slice(0, 1), slice(1, B)))
    acc.backward()
    torch.testing.assert_close(acc, loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(parts.grad, whole.grad, rtol=1e-12, atol=1e-12)
    half, _ = grpo_loss(logprobs, mask, adv, num_items_in_batch=torch.tensor(2.0 * total))
    torch.testing.assert_close(half, grpo_loss(logprobs, mask, adv)[0] / 2)


@pytest.mark.parametrize("count", [0, 0.25, torch.tensor(0.0)])
def test_num_items_in_batch_is_clamped_at_one_like_trl(count):
    """TRL divides by num_items_in_batch.clamp(min=1): a generation batch with no completion token (e.g. every
    completion truncated and masked) gives a zero loss instead of an error, and a count below 1 divides by 1."""
    logprobs, mask, adv, _, _ = make_batch(seed=13)
    lp = logprobs.clone().requires_grad_(True)
    loss, _ = grpo_loss(lp, mask, adv, num_items_in_batch=count)
    loss.backward()
    want = grpo_loss(logprobs, mask, adv, num_items_in_batch=1)[0]
    torch.testing.assert_close(loss.detach(), want, rtol=0, atol=0)
    none, _ = grpo_loss(logprobs, torch.zeros_like(mask), adv, num_items_in_batch=count)
    assert float(none) == 0.0


def _liger_loss(loss_type, beta, with_ref, level):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    return LigerFusedLinearGRPOLoss(beta=beta, compiled=False, use_ref_model=with_ref, loss_type=loss_type,
                                    max_completion_length=T + 2, importance_sampling_level=level, temperature=0.9,
                                    epsilon_low=0.2, epsilon_high=0.28)


def _linear_inputs(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(device)
    weight = (torch.randn(V, H, generator=g) * 0.3).to(device)
    ids = torch.randint(0, V, (B, T), generator=g).to(device)
    _, mask, adv, _, _ = make_batch(seed)
    with torch.no_grad():
        lp = linear_logprobs_reference(hidden.double(), weight.double(), ids, temperature=0.9).float()
    old = lp + torch.randn(B, T, generator=g) * 0.3 + torch.tensor([[-0.3], [0.4], [0.0]])
    ref = lp + torch.randn(B, T, generator=g) * 0.3
    return hidden, weight, ids, mask.to(device), adv.float().to(device), old.to(device), ref.to(device)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("with_old,with_ref", [(False, False), (True, False), (True, True)])
def test_matches_liger(impl, device, loss_type, with_old, with_ref):
    pytest.importorskip("liger_kernel")
    hidden, weight, ids, mask, adv, old, ref = _linear_inputs(device)
    beta = 0.04 if with_ref else 0.0
    level = "sequence" if loss_type == "bnpo" and with_old else "token"  # GSPO once, vs liger too
    h1 = hidden.clone().requires_grad_(True)
    w1 = weight.clone().requires_grad_(True)
    num_items = 40 if loss_type == "dapo" and with_old else None  # TRL's gradient-accumulation divisor
    out = _liger_loss(loss_type, beta, with_ref, level)(
        h1, w1, ids, mask, adv, ref_per_token_logps=ref if with_ref else None,
        old_per_token_logps=old if with_old else None, num_items_in_batch=num_items)
    out[0].backward()
    h2 = hidden.clone().requires_grad_(True)
    w2 = weight.clone().requires_grad_(True)
    loss, stats = linear_grpo_loss(h2, w2, ids, mask, adv, temperature=0.9, old_logprobs=old if with_old else None,
                                   ref_logprobs=ref if with_ref else None, beta=beta, epsilon_low=0.2,
                                   epsilon_high=0.28, loss_type=loss_type, max_completion_length=T + 2,
                                   importance_sampling_level=level, num_items_in_batch=num_items, impl=impl)
    loss.backward()
    torch.testing.assert_close(loss, out[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats["clip_ratio"], out[1][-1].float())
    if with_ref:
        torch.testing.assert_close(stats["kl"], out[1][0].float())
    if with_old:
        assert stats["clip_ratio"] > 0  # the comparison covers clipping


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter warns on the NaN rows
def test_masked_tokens_cost_nothing(impl, device):
    hidden, weight, ids, mask, adv, _, _ = _linear_inputs(device, seed=3)
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, V + 50))  # junk ids under the mask are never read
    hidden[mask == 0] = float("nan")  # nor are the hidden states there
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss, _ = linear_grpo_loss(h, w, ids, mask, adv, loss_type="grpo", impl=impl)  # no clipping: every kept
    assert torch.isfinite(loss)  # token has a non-zero gradient
    loss.backward()
    assert torch.all(h.grad[mask == 0] == 0)
    assert torch.all(h.grad[mask == 1].abs().sum(-1) > 0)
    assert torch.isfinite(w.grad).all()


def test_frozen_head_gets_no_grad(impl, device):
    hidden, weight, ids, mask, adv, _, _ = _linear_inputs(device, seed=4)
    bias = torch.randn(V, device=device)
    h = hidden.clone().requires_grad_(True)
    loss, _ = linear_grpo_loss(h, weight, ids, mask, adv, bias=bias, impl=impl)
    loss.backward()
    assert weight.grad is None and bias.grad is None and h.grad is not None


def test_module_equals_function(impl, device):
    hidden, weight, ids, mask, adv, old, ref = _linear_inputs(device, seed=5)
    module = LinearGRPOLoss(beta=0.1, loss_type="dr_grpo", max_completion_length=16, temperature=1.3, impl=impl)
    assert "dr_grpo" in repr(module)
    got, got_stats = module(hidden, weight, ids, mask, adv, old_logprobs=old, ref_logprobs=ref)
    want, want_stats = linear_grpo_loss(hidden, weight, ids, mask, adv, temperature=1.3, old_logprobs=old,
                                        ref_logprobs=ref, beta=0.1, loss_type="dr_grpo", max_completion_length=16,
                                        impl=impl)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got_stats.keys() == want_stats.keys()


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(loss_type="ppo"), ValueError, "loss_type"),
        (dict(loss_type="dr_grpo"), ValueError, "max_completion_length"),
        (dict(importance_sampling_level="batch"), ValueError, "importance_sampling_level"),
        (dict(beta=0.1), ValueError, "ref_logprobs"),
        (dict(epsilon_low=-0.1), ValueError, "epsilon_low"),
        (dict(advantages=torch.tensor([1.0, float("nan"), 0.0])), ValueError, "advantages"),
        (dict(advantages=torch.zeros(B, 1)), ValueError, "advantages"),
        (dict(completion_mask=torch.ones(B, T + 1)), ValueError, "completion_mask"),
        (dict(completion_mask=torch.full((B, T), 0.5)), ValueError, "completion_mask"),
        (dict(old_logprobs=torch.zeros(B, T - 1)), ValueError, "old_logprobs"),
        (dict(ref_logprobs=torch.zeros(B, T, dtype=torch.long)), TypeError, "ref_logprobs"),
        (dict(logprobs=torch.zeros(B * T)), ValueError, "logprobs"),
        (dict(num_items_in_batch=-1), ValueError, "num_items_in_batch"),
        (dict(num_items_in_batch=float("nan")), ValueError, "num_items_in_batch"),
        (dict(use_bias_correction_kl="yes"), TypeError, "use_bias_correction_kl"),
        (dict(beta=float("inf")), ValueError, "beta"),
        (dict(num_items_in_batch=torch.ones(2)), ValueError, "num_items_in_batch"),
        (dict(num_items_in_batch=10, loss_type="bnpo"), ValueError, "num_items_in_batch"),
    ],
)
def test_grpo_bad_input(kwargs, exc, match):
    logprobs, mask, adv, _, _ = make_batch()
    args = dict(logprobs=logprobs, completion_mask=mask, advantages=adv)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        grpo_loss(args.pop("logprobs"), args.pop("completion_mask"), args.pop("advantages"), **args)


def test_linear_grpo_bad_input():
    hidden, weight, ids, mask, adv, _, _ = _linear_inputs("cpu")
    bad_ids = ids.clone()
    bad_ids[0, 0] = V  # mask[0] is all ones, so this id is used
    with pytest.raises(ValueError, match="completion_ids"):
        linear_grpo_loss(hidden, weight, bad_ids, mask, adv, impl="torch")
    with pytest.raises(ValueError, match="hidden"):
        linear_grpo_loss(hidden[0], weight, ids, mask, adv, impl="torch")
    with pytest.raises(ValueError, match="completion_ids"):
        linear_grpo_loss(hidden, weight, ids[:, :-1], mask, adv, impl="torch")
    with pytest.raises(TypeError, match="weight"):
        linear_grpo_loss(hidden, weight.double(), ids, mask, adv, impl="torch")
    with pytest.raises(ValueError, match="loss_type"):
        LinearGRPOLoss(loss_type="gspo")


def test_issue_minimal_case_masked_minus_inf():
    """The reported case: -inf in old_logprobs under the mask gave a NaN gradient there."""
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = grpo_loss(lp, torch.tensor([[1, 0]]), torch.tensor([1.0]),
                        old_logprobs=torch.tensor([[-1.1, float("-inf")]]))
    loss.backward()
    want = -float(torch.exp(torch.tensor(0.1)))
    assert abs(float(loss.detach()) - want) < 1e-6
    torch.testing.assert_close(lp.grad, torch.tensor([[want, 0.0]]))


def _assert_junk_inert(run, inputs, where, mask, junk):
    """``run(inputs)`` -> (loss, stats, gradient) is the same with ``junk`` at the masked positions of
    ``inputs[where]``, and the gradient there is exactly 0."""
    clean = run(inputs)
    junked = torch.where(mask.bool(), inputs[where], torch.full_like(inputs[where], junk))
    dirty = run(dict(inputs, **{where: junked}))
    assert torch.equal(dirty[0], clean[0]) and torch.equal(dirty[2], clean[2])
    assert all(torch.equal(dirty[1][k], clean[1][k]) for k in clean[1])
    assert torch.all(dirty[2][mask == 0] == 0)


@pytest.mark.parametrize("junk", JUNK)
@pytest.mark.parametrize("where", ["logprobs", "old_logprobs", "ref_logprobs"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_junk_at_masked_positions_never_leaks(junk, where, loss_type, level):
    """+inf / -inf / NaN at masked positions of any log-prob input: loss, stats and gradient equal the clean
    run, and the gradient at masked positions is exactly 0."""
    logprobs, mask, adv, old, ref = make_batch(seed=6)
    kw = dict(beta=0.04, epsilon_high=0.28, loss_type=loss_type, max_completion_length=T + 2,
              importance_sampling_level=level)
    inputs = dict(logprobs=logprobs, old_logprobs=old, ref_logprobs=ref)

    def run(values):
        lp = values["logprobs"].clone().requires_grad_(True)
        loss, stats = grpo_loss(lp, mask, adv, old_logprobs=values["old_logprobs"],
                                ref_logprobs=values["ref_logprobs"], **kw)
        loss.backward()
        return loss.detach(), stats, lp.grad

    _assert_junk_inert(run, inputs, where, mask, junk)


def test_log_softmax_logprobs_with_masked_minus_inf_keep_hidden_gradients_finite():
    """Log-probs gathered from a model's own log_softmax: a banned token (logit -inf) at padded positions
    gives -inf log-probs there; no hidden-state gradient may become NaN."""
    hidden, weight, ids, mask, adv, _, _ = _linear_inputs("cpu", seed=7)
    banned = V - 1
    bias = torch.zeros(V)
    bias[banned] = float("-inf")
    pad_ids = torch.where(mask.bool(), ids.clamp(max=V - 2), torch.full_like(ids, banned))
    grads = []
    for use in (pad_ids, ids.clamp(max=V - 2)):
        h = hidden.clone().requires_grad_(True)
        lp = torch.log_softmax(h @ weight.T + bias, dim=-1).gather(-1, use[..., None])[..., 0]
        loss, _ = grpo_loss(lp, mask, adv, loss_type="dapo")
        loss.backward()
        grads.append(h.grad)
    assert torch.isfinite(grads[0]).all()
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("where", ["logprobs", "old_logprobs", "ref_logprobs"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_at_kept_positions_raise(where, value):
    logprobs, mask, adv, old, ref = make_batch()
    inputs = dict(logprobs=logprobs, old_logprobs=old, ref_logprobs=ref)
    bad = inputs[where].clone()
    bad[0, 0] = value  # mask[0] is all ones
    inputs[where] = bad
    with pytest.raises(ValueError, match=f"{where} contains 1 non-finite"):
        grpo_loss(inputs["logprobs"], mask, adv, old_logprobs=inputs["old_logprobs"],
                  ref_logprobs=inputs["ref_logprobs"], beta=0.04)
    with input_checks("async"), pytest.raises(RuntimeError, match=f"{where} contains non-finite"):
        grpo_loss(inputs["logprobs"], mask, adv, old_logprobs=inputs["old_logprobs"],
                  ref_logprobs=inputs["ref_logprobs"], beta=0.04)
    with input_checks("off"):  # no value check at all: the caller asked for none, so no error either
        grpo_loss(inputs["logprobs"], mask, adv, old_logprobs=inputs["old_logprobs"],
                  ref_logprobs=inputs["ref_logprobs"], beta=0.04)


@pytest.mark.parametrize("with_bias", [False, True])
def test_empty_batch_gives_zero_head_gradients(impl, device, with_bias):
    """B = 0 (a rank whose micro-batch is empty): zero loss, and zero gradients of the right shape for
    the hidden states, weight and bias, so DDP's reduction sees every parameter."""
    h = torch.randn(0, T, H, device=device, requires_grad=True)
    w = torch.randn(V, H, device=device, requires_grad=True)
    b = torch.randn(V, device=device, requires_grad=True) if with_bias else None
    loss, stats = linear_grpo_loss(h, w, torch.zeros(0, T, dtype=torch.long, device=device),
                                   torch.zeros(0, T, dtype=torch.long, device=device), torch.zeros(0, device=device),
                                   bias=b, impl=impl)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(stats["num_tokens"]) == 0.0
    for p in (h, w) + ((b,) if with_bias else ()):
        assert p.grad is not None and p.grad.shape == p.shape and torch.all(p.grad == 0)


def _num_items_worker(rank, world, port, out_dir):
    """One gloo rank: its share of the batch, TRL's num_items_in_batch (global token count), ours vs Liger;
    then the gradients are averaged over ranks as DDP does."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    hidden, weight, ids, mask, adv, old, _ = _linear_inputs("cpu", seed=8)
    total = int(mask.sum())
    rows = slice(rank, rank + 1) if rank == 0 else slice(1, B)
    out = {}
    for name in ("ours", "liger"):
        h = hidden[rows].clone().requires_grad_(True)
        if name == "ours":
            loss, _ = linear_grpo_loss(h, weight, ids[rows], mask[rows], adv[rows], old_logprobs=old[rows],
                                       num_items_in_batch=total, impl="torch")
        else:
            liger = LigerFusedLinearGRPOLoss(beta=0.0, compiled=False, use_ref_model=False, loss_type="dapo")
            loss = liger(h, weight, ids[rows], mask[rows], adv[rows], old_per_token_logps=old[rows],
                         num_items_in_batch=total)[0]
        loss.backward()
        full = torch.zeros(B, T, H)
        full[rows] = h.grad
        torch.distributed.all_reduce(full)
        out[name] = dict(loss=float(loss), grad=(full / world).tolist())  # DDP's average over ranks
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    torch.distributed.destroy_process_group()


def test_num_items_in_batch_follows_trl_under_torch_distributed(tmp_path):
    """On 2 gloo ranks each rank's loss equals Liger-Kernel's (TRL's num_items_in_batch / world_size), and the
    DDP-averaged gradient equals one process's gradient over the whole batch."""
    pytest.importorskip("liger_kernel")
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_num_items_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    hidden, weight, ids, mask, adv, old, _ = _linear_inputs("cpu", seed=8)
    h = hidden.clone().requires_grad_(True)
    loss, _ = linear_grpo_loss(h, weight, ids, mask, adv, old_logprobs=old, impl="torch")  # the whole batch
    loss.backward()
    for rank in range(2):
        got = json.load(open(tmp_path / f"rank{rank}.json"))
        assert abs(got["ours"]["loss"] - got["liger"]["loss"]) <= 1e-5 * max(1.0, abs(got["liger"]["loss"]))
        torch.testing.assert_close(torch.tensor(got["ours"]["grad"]), torch.tensor(got["liger"]["grad"]),
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.tensor(got["ours"]["grad"]), h.grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Options other RL code passes: TRL's bias-corrected KL, per-token advantages, per-token weights
# ----------------------------------------------------------------------------------------------------
def _per_token_inputs(seed=9):
    logprobs, mask, adv, old, ref = make_batch(seed)
    g = torch.Generator().manual_seed(seed + 100)
    adv_bt = adv[:, None] + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    weights = torch.rand(B, T, generator=g, dtype=torch.float64) * 1.5 + 0.25
    return logprobs, mask, adv, adv_bt, weights, old, ref


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("per_token_adv,with_weights,bias_correction", [
    (True, False, False), (False, True, False), (False, False, True), (True, True, True)])
def test_per_token_options_match_reference(loss_type, level, per_token_adv, with_weights, bias_correction):
    logprobs, mask, adv, adv_bt, weights, old, ref = _per_token_inputs()
    kw = dict(old_logprobs=old, ref_logprobs=ref, beta=0.04, epsilon_high=0.28, loss_type=loss_type,
              max_completion_length=T + 2, importance_sampling_level=level, use_bias_correction_kl=bias_correction,
              token_weights=weights if with_weights else None)
    advantages = adv_bt if per_token_adv else adv
    lp1 = logprobs.clone().requires_grad_(True)
    lp2 = logprobs.clone().requires_grad_(True)
    loss, stats = grpo_loss(lp1, mask, advantages, **kw)
    gold = grpo_loss_reference(lp2, mask, advantages, **kw)
    loss.backward()
    gold.backward()
    torch.testing.assert_close(loss, gold, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lp1.grad, lp2.grad, rtol=1e-12, atol=1e-12)
    assert torch.all(lp1.grad[mask == 0] == 0)


def test_bias_correction_changes_the_kl_gradient_even_on_policy():
    """Without old log-probs the ratio is 1 but its gradient is not 0: the corrected KL's gradient differs
    (TRL's default; a route without it is off in gradient, not only in value)."""
    logprobs, mask, adv, _, _, _, ref = _per_token_inputs(seed=10)
    grads = []
    for corrected in (False, True):
        lp = logprobs.clone().requires_grad_(True)
        loss, _ = grpo_loss(lp, mask, adv, ref_logprobs=ref, beta=0.04, use_bias_correction_kl=corrected)
        loss.backward()
        grads.append(lp.grad)
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_bias_corrected_kl_and_token_weights_match_liger(impl, device, level, loss_type):
    """Liger-Kernel's use_bias_correction_kl and vllm_is_ratio (TRL's importance_sampling_ratio) against ours."""
    pytest.importorskip("liger_kernel")
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    hidden, weight, ids, mask, adv, old, ref = _linear_inputs(device, seed=11)
    weights = (torch.rand(B, T, generator=torch.Generator().manual_seed(3)) + 0.5).to(device)
    liger = LigerFusedLinearGRPOLoss(beta=0.04, compiled=False, use_ref_model=True, loss_type=loss_type,
                                     importance_sampling_level=level, temperature=0.9, epsilon_high=0.28,
                                     use_bias_correction_kl=True)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = liger(h1, w1, ids, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old, vllm_is_ratio=weights)
    out[0].backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, _ = linear_grpo_loss(h2, w2, ids, mask, adv, temperature=0.9, old_logprobs=old, ref_logprobs=ref,
                               beta=0.04, epsilon_high=0.28, loss_type=loss_type, importance_sampling_level=level,
                               use_bias_correction_kl=True, token_weights=weights, impl=impl)
    loss.backward()
    torch.testing.assert_close(loss, out[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("junk", JUNK)
@pytest.mark.parametrize("where", ["advantages", "token_weights"])
def test_junk_in_per_token_inputs_under_the_mask_never_leaks(junk, where):
    logprobs, mask, _, adv_bt, weights, old, ref = _per_token_inputs(seed=12)
    inputs = dict(advantages=adv_bt, token_weights=weights)

    def run(values):
        lp = logprobs.clone().requires_grad_(True)
        loss, stats = grpo_loss(lp, mask, values["advantages"], old_logprobs=old, ref_logprobs=ref, beta=0.04,
                                use_bias_correction_kl=True, token_weights=values["token_weights"])
        loss.backward()
        return loss.detach(), stats, lp.grad

    _assert_junk_inert(run, inputs, where, mask, junk)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(advantages=torch.zeros(B, T + 1)), ValueError, "advantages must have shape"),
    (dict(advantages=torch.zeros(B, T, 1)), ValueError, "advantages must have 1 or 2 dims"),
    (dict(token_weights=torch.ones(B, T - 1)), ValueError, "token_weights must have shape"),
    (dict(token_weights=torch.ones(B, T, dtype=torch.long)), TypeError, "token_weights must have dtype"),
])
def test_per_token_bad_input(kwargs, exc, match):
    logprobs, mask, adv, _, _ = make_batch()
    args = dict(advantages=adv)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        grpo_loss(logprobs, mask, args.pop("advantages"), **args)


@pytest.mark.parametrize("where", ["advantages", "token_weights"])
def test_non_finite_per_token_values_at_kept_positions_raise(where):
    logprobs, mask, _, adv_bt, weights, _, _ = _per_token_inputs()
    inputs = dict(advantages=adv_bt.clone(), token_weights=weights.clone())
    inputs[where][0, 0] = float("nan")  # mask[0] is all ones
    with pytest.raises(ValueError, match=f"{where} contains 1 non-finite"):
        grpo_loss(logprobs, mask, inputs["advantages"], token_weights=inputs["token_weights"])
