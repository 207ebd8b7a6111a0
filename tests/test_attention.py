"""attention_probs vs the float64 reference: odd shapes, GQA groups 1/2/4, padding, rows anywhere; junk in the
keys no row can see, non-finite values where a row can, empty inputs, check modes."""
import pytest
import torch

from saga_kernels import attention_probs
from saga_kernels._checks import input_checks
from saga_kernels.reference import attention_probs_reference

from utils import JUNK, assert_rule, poison

SLACK = 1e-6


def _inputs(bsz, hq, hkv, lq, lk, dim, n, device, dtype=torch.float32, seed=0, left_pad=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, hq, lq, dim, generator=g).to(device, dtype)
    k = (1.5 * torch.randn(bsz, hkv, lk, dim, generator=g)).to(device, dtype)
    pad = torch.ones(bsz, lk, dtype=torch.bool)
    for b, count in enumerate(left_pad or []):
        pad[b, :count] = False
    lo = max(left_pad or [0])
    qpos = torch.randint(lo, lk, (bsz, lq), generator=g)
    kidx = torch.randint(0, lk, (bsz, n), generator=g)
    return q, k, kidx.to(device), qpos.to(device), pad.to(device)


def _same_dtype_torch(q, k, kidx, qpos, pad, reduce_heads):
    """The obvious computation in the inputs' own dtype: the error budget of the tolerance rule."""
    return attention_probs_reference(q, k, kidx, qpos, pad, reduce_heads=reduce_heads).float()


@pytest.mark.parametrize("hq,hkv", [(3, 3), (4, 2), (8, 2), (6, 2), (16, 1)])  # groups 1, 2, 4, 3, 16
@pytest.mark.parametrize("reduce_heads", ["mean", None])
def test_matches_float64_reference(impl, device, hq, hkv, reduce_heads):
    q, k, kidx, qpos, pad = _inputs(2, hq, hkv, 7, 45, 24, 9, device, left_pad=[0, 5])
    out = attention_probs(q, k, kidx, query_positions=qpos, key_padding_mask=pad, reduce_heads=reduce_heads,
                          impl=impl)
    gold = attention_probs_reference(q.double(), k.double(), kidx, qpos, pad, reduce_heads=reduce_heads)
    same = _same_dtype_torch(q, k, kidx, qpos, pad, reduce_heads)
    assert out.dtype == torch.float32
    assert out.shape == gold.shape
    assert_rule(out, gold, same, slack=SLACK)


def test_half_precision_inputs(impl, device):
    q, k, kidx, qpos, pad = _inputs(1, 4, 1, 5, 33, 16, 6, device, dtype=torch.bfloat16, seed=3)
    out = attention_probs(q, k, kidx, query_positions=qpos, key_padding_mask=pad, impl=impl)
    gold = attention_probs_reference(q.double(), k.double(), kidx, qpos, pad)
    same = _same_dtype_torch(q, k, kidx, qpos, pad, "mean")
    assert_rule(out, gold, same, slack=1e-3)


def test_default_positions_and_whole_row_sums_to_one(impl, device):
    """Default query positions = the last Lq; gathering every key gives rows that sum to 1 and are
    exactly zero on the causally hidden keys."""
    q, k, _, _, _ = _inputs(2, 4, 2, 5, 19, 16, 1, device, seed=1)
    kidx = torch.arange(19, device=device).expand(2, 19)
    out = attention_probs(q, k, kidx, reduce_heads=None, impl=impl)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 4, 5, device=device))
    for i in range(5):
        assert (out[:, :, i, 14 + i + 1:] == 0).all()
    gold = attention_probs_reference(q.double(), k.double(), kidx, None, None, reduce_heads=None)
    assert_rule(out, gold, _same_dtype_torch(q, k, kidx, None, None, None), slack=SLACK)


def test_padded_and_future_columns_are_zero(impl, device):
    q, k, _, _, pad = _inputs(2, 2, 2, 3, 20, 16, 1, device, seed=2, left_pad=[4, 0])
    qpos = torch.tensor([[10, 12, 19], [0, 7, 3]], device=device)
    kidx = torch.tensor([[0, 3, 4, 11, 19], [0, 1, 8, 3, 19]], device=device)
    out = attention_probs(q, k, kidx, query_positions=qpos, key_padding_mask=pad, impl=impl)
    assert (out[0, :, :2] == 0).all()  # keys 0 and 3 are padding in batch 0
    assert out[0, 0, 3] == 0 and out[0, 1, 3] > 0  # key 11: future for the row at 10, visible at 12
    # the row at position 0 sees only key 0: probability 1, up to exp(s - lse) where the two evaluations of the score
    # s = q.k / sqrt(D) may round differently (D products each: 2 D 2^-24 |q||k| / sqrt(D), the vector width's order)
    assert (out[1, 0, 1:] == 0).all()
    margin = 2 * q.shape[-1] * 2.0**-24 * float((q[1, :, 0].abs() @ k[1, :, 0].abs().T).max()) / q.shape[-1] ** 0.5
    assert abs(float(out[1, 0, 0]) - 1.0) <= margin + 2.0**-23
    assert (out[1, :, 4][:2] == 0).all() and out[1, 2, 3] > 0


def test_large_logits_stay_finite(impl, device):
    q, k, kidx, qpos, pad = _inputs(1, 2, 1, 4, 70, 32, 5, device, seed=4)
    out = attention_probs(40 * q, k, kidx, query_positions=qpos, key_padding_mask=pad, impl=impl)
    gold = attention_probs_reference(40 * q.double(), k.double(), kidx, qpos, pad)
    assert torch.isfinite(out).all()
    # scores reach |s| ~ 200 (fp32 ulp 1.5e-5): pass 2 recomputes them and may round differently from pass 1
    assert_rule(out, gold, _same_dtype_torch(40 * q, k, kidx, qpos, pad, "mean"), slack=1e-5)


def test_noncontiguous_inputs(impl, device):
    q, k, kidx, qpos, pad = _inputs(2, 4, 2, 6, 25, 16, 4, device, seed=5)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, Lq, Hq, D] storage
    k_t = k.transpose(1, 2).contiguous().transpose(1, 2)
    out = attention_probs(q_t, k_t, kidx, query_positions=qpos, impl=impl)
    gold = attention_probs_reference(q.double(), k.double(), kidx, qpos, None)
    assert_rule(out, gold, _same_dtype_torch(q, k, kidx, qpos, None, "mean"), slack=SLACK)


def test_backward_raises_a_clear_error(device):
    q, k, kidx, qpos, _ = _inputs(1, 2, 1, 3, 10, 16, 3, device)
    q.requires_grad_(True)
    out = attention_probs(q, k, kidx, query_positions=qpos)
    with pytest.raises(RuntimeError, match="detached teacher"):
        out.sum().backward()
    assert attention_probs(q.detach(), k, kidx, query_positions=qpos).grad_fn is None


def test_bad_inputs(device):
    q, k, kidx, qpos, pad = _inputs(2, 4, 2, 3, 12, 16, 3, device)
    with pytest.raises(ValueError, match="multiple of k heads"):
        attention_probs(q[:, :3], k, kidx)
    with pytest.raises(ValueError, match="key_index must lie in"):
        attention_probs(q, k, kidx + 12)
    with pytest.raises(ValueError, match="query_positions must lie in"):
        attention_probs(q, k, kidx, query_positions=qpos - 20)
    no_key = pad.clone()
    no_key[0, :5] = False
    with pytest.raises(ValueError, match="no visible key"):
        attention_probs(q, k, kidx, query_positions=torch.full_like(qpos, 4), key_padding_mask=no_key)
    with pytest.raises(TypeError, match="key_index must have dtype"):
        attention_probs(q, k, kidx.float())
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        attention_probs(q, k, kidx, key_padding_mask=pad[:, :5])
    with pytest.raises(TypeError, match="share a dtype"):
        attention_probs(q, k.double().half(), kidx)
    with pytest.raises(ValueError, match="k must have shape"):
        attention_probs(q, k[..., :8], kidx)
    with pytest.raises(ValueError, match="reduce_heads"):
        attention_probs(q, k, kidx, reduce_heads="sum")
    with pytest.raises(ValueError, match="pass query_positions"):
        attention_probs(torch.randn(2, 4, 13, 16, device=device), k, kidx)


def test_nan_canary_outside_the_views(impl, device):
    """q and k are views into NaN-filled buffers: any read past Lq/Lk/D would poison the result."""
    q, k, kidx, qpos, pad = _inputs(2, 4, 2, 5, 29, 20, 6, device, seed=6, left_pad=[3, 0])
    q_buf = torch.full((2, 4, 9, 32), float("nan"), device=device)
    k_buf = torch.full((2, 2, 40, 32), float("nan"), device=device)
    q_buf[:, :, :5, :20] = q
    k_buf[:, :, :29, :20] = k
    for reduce_heads in ("mean", None):
        out = attention_probs(q_buf[:, :, :5, :20], k_buf[:, :, :29, :20], kidx, query_positions=qpos,
                              key_padding_mask=pad, reduce_heads=reduce_heads, impl=impl)
        gold = attention_probs_reference(q.double(), k.double(), kidx, qpos, pad, reduce_heads=reduce_heads)
        assert_rule(out, gold, _same_dtype_torch(q, k, kidx, qpos, pad, reduce_heads), slack=SLACK)




def _dead_keys(lk, qpos, pad):
    """[B, Lk] keys no query row of the batch row can see: padding, or after every row's position."""
    return ~pad | (torch.arange(lk, device=pad.device) > qpos.amax(dim=1, keepdim=True))


@pytest.mark.parametrize("reduce_heads", ["mean", None])
def test_junk_in_keys_no_row_can_see_changes_nothing(impl, device, reduce_heads):
    """+inf, -inf or NaN in every padded key and every key after the last query row: the result equals the
    clean run exactly, and those key columns read 0. Rows at different positions share key tiles, so keys in
    one row's future (visible to another row) are in the tiles too."""
    q, k, _, _, pad = _inputs(2, 4, 2, 6, 83, 16, 1, device, seed=7, left_pad=[5, 0])
    qpos = torch.tensor([[9, 30, 41, 12, 70, 33], [0, 3, 17, 50, 18, 2]], device=device)
    dead = _dead_keys(83, qpos, pad)
    kidx = torch.stack([torch.randperm(83, generator=torch.Generator().manual_seed(b))[:40] for b in range(2)])
    kidx = torch.cat([kidx.to(device), torch.tensor([[0, 82], [51, 82]], device=device)], dim=1)  # dead ones
    clean = attention_probs(q, k, kidx, query_positions=qpos, key_padding_mask=pad, reduce_heads=reduce_heads,
                            impl=impl)
    for value in JUNK:
        junk_k = poison(k, ~dead[:, None, :, None], value)
        out = attention_probs(q, junk_k, kidx, query_positions=qpos, key_padding_mask=pad,
                              reduce_heads=reduce_heads, impl=impl)
        assert torch.equal(out, clean), value
    hidden = dead.gather(1, kidx)
    cols = out if reduce_heads == "mean" else out.transpose(1, 2)  # [B, Lq(, H), n]
    assert (cols.transpose(1, -1)[hidden] == 0).all()


@pytest.mark.parametrize("value", JUNK)
def test_non_finite_values_a_row_can_see_raise(impl, device, value):
    q, k, kidx, qpos, pad = _inputs(2, 4, 2, 3, 12, 16, 3, device, left_pad=[2, 0])
    qpos = torch.tensor([[4, 6, 5], [2, 11, 3]], device=device)
    bad_q = q.clone()
    bad_q[1, 2, 0, 3] = value
    with pytest.raises(ValueError, match="q contains"):
        attention_probs(bad_q, k, kidx, query_positions=qpos, key_padding_mask=pad, impl=impl)
    bad_k = k.clone()
    bad_k[0, 1, 6, 0] = value  # key 6: visible to the row at position 6 only
    with pytest.raises(ValueError, match="k contains"):
        attention_probs(q, bad_k, kidx, query_positions=qpos, key_padding_mask=pad, impl=impl)
    bad_k[0, 1, 6, 0] = 0.0
    bad_k[0, 1, 7, 0] = value  # key 7: after every row of batch 0: never read
    attention_probs(q, bad_k, kidx, query_positions=qpos, key_padding_mask=pad, impl=impl)


@pytest.mark.parametrize("reduce_heads", ["mean", None])
def test_empty_inputs(impl, device, reduce_heads):
    """No query rows, no requested columns or no batch: zeros of the right shape."""
    for bsz, lq, n in ((2, 0, 3), (2, 3, 0), (0, 3, 3)):
        q, k, kidx, qpos, pad = _inputs(bsz, 4, 2, lq, 12, 16, n, device)
        out = attention_probs(q, k, kidx, query_positions=qpos, key_padding_mask=pad, reduce_heads=reduce_heads,
                              impl=impl)
        shape = (bsz, lq, n) if reduce_heads == "mean" else (bsz, 4, lq, n)
        assert out.shape == shape and out.dtype == torch.float32 and (out == 0).all()


def test_check_modes(impl, device):
    """"async" asserts the same conditions on device (on the CPU torch._assert_async raises at once);
    "off" skips value checks: a row without a visible key then reads 0 on both paths."""
    q, k, kidx, qpos, pad = _inputs(2, 4, 2, 3, 12, 16, 3, device)
    no_key = pad.clone()
    no_key[0, :5] = False
    at_4 = torch.full_like(qpos, 4)
    bad_k = k.clone()
    bad_k[1, 0, 2, 0] = float("nan")
    with input_checks("async"):
        with pytest.raises(RuntimeError, match="key_padding_mask must leave every query row"):
            attention_probs(q, k, kidx, query_positions=at_4, key_padding_mask=no_key, impl=impl)
        with pytest.raises(RuntimeError, match="k contains non-finite"):
            attention_probs(q, bad_k, kidx, query_positions=at_4, impl=impl)
        with pytest.raises(RuntimeError, match="key_index must lie in"):
            attention_probs(q, k, kidx + 12, impl=impl)
    with input_checks("off"):
        out = attention_probs(q, k, kidx, query_positions=at_4, key_padding_mask=no_key, reduce_heads=None,
                              impl=impl)
    assert (out[0] == 0).all() and torch.isfinite(out).all()
    assert_rule(out[1], attention_probs_reference(q.double(), k.double(), kidx, at_4, no_key, reduce_heads=None)[1],
                _same_dtype_torch(q, k, kidx, at_4, no_key, None)[1], slack=SLACK)


@pytest.mark.gpu
def test_qwen3vl_8b_layer_shapes_on_gpu():
    """Issue 3's shapes in bf16 on CUDA: the Triton kernel against float64, the fp32 torch fallback on the
    same inputs as the peer."""
    q, k, kidx, qpos, pad = _inputs(2, 32, 8, 700, 1400, 128, 98, "cuda", dtype=torch.bfloat16, left_pad=[0, 40])
    qpos = torch.arange(700, 1400, device="cuda").expand(2, 700)
    for reduce_heads in ("mean", None):
        ours = attention_probs(q, k, kidx, query_positions=qpos, key_padding_mask=pad, reduce_heads=reduce_heads,
                               impl="triton")
        fallback = attention_probs(q, k, kidx, query_positions=qpos, key_padding_mask=pad,
                                   reduce_heads=reduce_heads, impl="torch")
        gold = attention_probs_reference(q.double(), k.double(), kidx, qpos, pad, reduce_heads=reduce_heads)
        assert_rule(ours, gold, fallback, slack=1e-5)
