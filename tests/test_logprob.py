"""linear_logprobs: both implementations against the float64 reference (values, entropy, gradients)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import saga_kernels.logprob as logprob_mod
from saga_kernels import linear_logprobs
from saga_kernels.reference import linear_logprobs_reference

# N not a multiple of any block, V = 1000 + odd, H spanning two H tiles with a remainder.
N, H, V = 77, 97, 1013


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Force several chunks/splits at test sizes so chunk boundaries and split merging are exercised."""
    monkeypatch.setattr(logprob_mod, "_TORCH_ROWS_PER_CHUNK", 32)
    monkeypatch.setattr(logprob_mod, "_TORCH_VOCAB_PER_CHUNK", 300)
    monkeypatch.setattr(logprob_mod, "_TARGET_PROGRAMS", 4)  # 2 row blocks x 2 splits of 4 vocab tiles
    monkeypatch.setattr(logprob_mod, "_TRITON_ROWS_PER_CHUNK", 32)
    monkeypatch.setattr(logprob_mod, "_DZ_CHUNK_BYTES", 32 * 256 * 4)  # 256 fp32 vocab columns per chunk


def make_inputs(dtype, device, *, n=N, h=H, v=V, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(v, h, generator=g) * 0.25).to(device=device, dtype=dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(device=device, dtype=dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    targets[torch.randperm(n, generator=g)[: n // 6].to(device)] = -100
    return hidden, weight, b, targets


def max_err(x, gold):
    return (x.double() - gold.double()).abs().max().item()


def assert_rule(ours, gold, peer, slack, what):
    """|ours - gold| <= |torch same dtype - gold| + slack (max-norm), gold in float64."""
    e_ours, e_peer = max_err(ours, gold), max_err(peer, gold)
    assert e_ours <= e_peer + slack, f"{what}: error {e_ours:.3g} vs torch-same-dtype {e_peer:.3g} + slack {slack:.3g}"


def run(fn, hidden, weight, bias, targets, temperature, g_lp, g_ent, entropy):
    """Forward + backward of sum(g_lp * logp [+ g_ent * entropy]); returns outputs and grads."""
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    bias = bias.detach().clone().requires_grad_(True) if bias is not None else None
    out = fn(hidden, weight, targets, bias=bias, temperature=temperature, return_entropy=entropy)
    logp, ent = out if entropy else (out, None)
    obj = (logp.double() * g_lp.double()).sum()
    if entropy:
        obj = obj + (ent.double() * g_ent.double()).sum()
    obj.backward()
    grads = [hidden.grad, weight.grad] + ([bias.grad] if bias is not None else [])
    return logp.detach(), (ent.detach() if entropy else None), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature,entropy,bias", [(1.0, False, False), (0.7, True, True)])
def test_matches_reference(impl, device, dtype, temperature, entropy, bias):
    hidden, weight, b, targets = make_inputs(dtype, device, bias=bias)
    g_lp = torch.randn(N, device=device)
    g_ent = torch.randn(N, device=device)

    def ours(*args, **kw):
        return linear_logprobs(*args, impl=impl, **kw)

    lp, ent, grads = run(ours, hidden, weight, b, targets, temperature, g_lp, g_ent, entropy)
    to64 = [t.double() if t is not None else None for t in (hidden, weight, b)]
    lp64, ent64, grads64 = run(linear_logprobs_reference, *to64, targets, temperature, g_lp, g_ent, entropy)
    lp_pe, ent_pe, grads_pe = run(linear_logprobs_reference, hidden, weight, b, targets, temperature, g_lp, g_ent,
                                  entropy)

    assert lp.dtype == torch.float32 and lp.shape == (N,)
    ignored = targets == -100
    assert torch.all(lp[ignored] == 0)
    assert torch.all(lp[~ignored] < 0)
    slack = 2e-5 if dtype == torch.float32 else 1e-3
    assert_rule(lp, lp64, lp_pe, slack, "logprobs")
    if entropy:
        assert ent.dtype == torch.float32
        assert torch.all(ent[ignored] == 0)
        assert_rule(ent, ent64, ent_pe, slack, "entropy")
    for name, ours_g, gold_g, peer_g in zip(("hidden", "weight", "bias"), grads, grads64, grads_pe):
        assert ours_g.dtype == dtype
        scale = gold_g.abs().max().item()
        assert_rule(ours_g, gold_g, peer_g, slack * scale, f"d_{name}")
    # ignored rows get an exactly zero hidden gradient
    assert torch.all(grads[0][ignored] == 0)


@pytest.mark.parametrize("n,h,v", [(1, 1, 1), (1, 5, 2), (3, 17, 129)])
def test_tiny_shapes(impl, device, n, h, v):
    """Degenerate sizes: one row, one hidden unit, a one-word vocabulary (log-prob 0, entropy 0)."""
    hidden, weight, b, _ = make_inputs(torch.float32, device, n=n, h=h, v=v)
    targets = torch.randint(0, v, (n,), device=device)
    g = torch.randn(n, device=device)
    lp, ent, grads = run(lambda *a, **k: linear_logprobs(*a, impl=impl, **k), hidden, weight, b, targets, 1.7, g,
                         g, True)
    lp64, ent64, grads64 = run(linear_logprobs_reference, hidden.double(), weight.double(), b.double(), targets,
                               1.7, g, g, True)
    torch.testing.assert_close(lp.double(), lp64, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), ent64, rtol=0, atol=1e-5)
    for ours, gold in zip(grads, grads64):
        torch.testing.assert_close(ours.double(), gold, rtol=1e-4, atol=1e-5)


def test_leading_dims_and_ignore_index(impl, device):
    hidden, weight, _, targets = make_inputs(torch.float32, device, n=21)
    targets = torch.where(targets == -100, torch.full_like(targets, -7), targets)
    lp = linear_logprobs(hidden.reshape(3, 7, H), weight, targets.reshape(3, 7), ignore_index=-7, impl=impl)
    gold = linear_logprobs_reference(hidden.double(), weight.double(), targets, ignore_index=-7)
    assert lp.shape == (3, 7)
    torch.testing.assert_close(lp.reshape(-1).double(), gold, rtol=0, atol=2e-5)


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _backward_matmuls(impl, device, train_weight):
    """Number of matmuls run by the backward of one call (40 rows: 2 row chunks of 32)."""
    hidden, weight, b, targets = make_inputs(torch.float32, device, n=40)
    hidden.requires_grad_(True)
    weight.requires_grad_(train_weight)
    lp = linear_logprobs(hidden, weight, targets, bias=b, impl=impl)
    with _CountMatmuls() as counter:
        lp.sum().backward()
    assert b.grad is None and (weight.grad is not None) == train_weight
    assert torch.isfinite(hidden.grad).all() and hidden.grad.abs().sum() > 0
    return counter.count


def test_frozen_weight_does_no_weight_work(impl, device):
    frozen = _backward_matmuls(impl, device, train_weight=False)
    trained = _backward_matmuls(impl, device, train_weight=True)
    if impl == "triton":  # per (row chunk, vocab chunk of 256): d_hidden, plus d_weight only when trained
        chunks = 2 * 4
        assert (frozen, trained) == (chunks, 2 * chunks)
    else:  # per (row chunk, vocab chunk of 300): logits + d_hidden, plus d_weight only when trained
        chunks = 2 * 4
        assert (frozen, trained) == (2 * chunks, 3 * chunks)


def test_bias_only_gradient(impl, device):
    hidden, weight, b, targets = make_inputs(torch.float32, device, n=30)
    b.requires_grad_(True)
    linear_logprobs(hidden, weight, targets, bias=b, temperature=1.3, impl=impl).sum().backward()
    b64 = b.detach().double().requires_grad_(True)
    linear_logprobs_reference(hidden.double(), weight.double(), targets, bias=b64, temperature=1.3).sum().backward()
    assert weight.grad is None
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter warns on the NaN rows
def test_nan_canary(impl, device):
    """Inputs are views into NaN-filled buffers: any out-of-bounds read poisons the result. Ignored
    rows hold NaN hidden states too: they must not leak into any gradient."""
    hidden, weight, b, targets = make_inputs(torch.float32, device, n=45)
    hbuf = torch.full((50, H + 5), float("nan"), device=device)
    wbuf = torch.full((V + 9, H + 3), float("nan"), device=device)
    bbuf = torch.full((V + 9,), float("nan"), device=device)
    hbuf[:45, :H] = hidden
    wbuf[:V, :H] = weight
    bbuf[:V] = b
    ignored = targets == -100
    hbuf[:45, :H][ignored] = float("nan")
    h_view = hbuf[:45, :H].requires_grad_(True)
    w_view = wbuf[:V, :H].requires_grad_(True)
    b_view = bbuf[:V].requires_grad_(True)
    assert h_view.stride(0) == H + 5 and w_view.stride(0) == H + 3
    lp, ent = linear_logprobs(h_view, w_view, targets, bias=b_view, return_entropy=True, impl=impl)
    (lp.sum() + ent.sum()).backward()
    for t in (lp, ent, h_view.grad, w_view.grad, b_view.grad):
        assert torch.isfinite(t).all()
    assert torch.all(h_view.grad[ignored] == 0)
    gold = linear_logprobs_reference(hidden.double()[~ignored], weight.double(), targets[~ignored], bias=b.double())
    torch.testing.assert_close(lp[~ignored].double(), gold, rtol=0, atol=2e-5)


def test_empty_and_all_ignored(impl, device):
    hidden, weight, _, _ = make_inputs(torch.float32, device, n=5)
    empty = linear_logprobs(hidden[:0].requires_grad_(True), weight, torch.zeros(0, dtype=torch.long), impl=impl)
    assert empty.shape == (0,)
    h = hidden.clone().requires_grad_(True)
    lp = linear_logprobs(h, weight, torch.full((5,), -100), impl=impl)
    lp.sum().backward()
    assert torch.all(lp == 0) and torch.all(h.grad == 0)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(weight=a["weight"][:, :-1]), ValueError, "weight"),
        (lambda a: a.update(weight=a["weight"].double()), TypeError, "weight"),
        (lambda a: a.update(hidden=a["hidden"].long()), TypeError, "hidden"),
        (lambda a: a.update(targets=a["targets"][:-1]), ValueError, "targets"),
        (lambda a: a.update(targets=a["targets"].float()), TypeError, "targets"),
        (lambda a: a["targets"].__setitem__(0, V), ValueError, "targets"),
        (lambda a: a["targets"].__setitem__(0, -3), ValueError, "targets"),
        (lambda a: a.update(bias=torch.zeros(V + 1)), ValueError, "bias"),
        (lambda a: a.update(temperature=0.0), ValueError, "temperature"),
        (lambda a: a.update(ignore_index=5), ValueError, "ignore_index"),
        (lambda a: a.update(weight=a["weight"].to("meta")), ValueError, "weight on meta"),
        (lambda a: a.update(impl="cuda"), ValueError, "impl"),
    ],
)
def test_bad_input(mutate, exc, match):
    hidden, weight, _, targets = make_inputs(torch.float32, "cpu", n=6, v=50)
    args = dict(hidden=hidden, weight=weight, targets=targets, bias=None, temperature=1.0, ignore_index=-100,
                impl="torch")
    mutate(args)
    with pytest.raises(exc, match=match):
        linear_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


@pytest.mark.gpu
def test_gpu_large_vocab_memory_and_accuracy():
    """Qwen3-VL vocabulary on a GPU: values/gradients within the tolerance rule (gold: fp32 logits),
    and extra peak memory far below one materialized logits buffer."""
    torch.manual_seed(0)
    n, h, v = 2048, 1024, 151936
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(v, h, device="cuda") * h ** -0.5).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lp = linear_logprobs(hidden, weight, targets, impl="triton")
    lp.sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    logits_bytes = n * v * 4
    assert extra < logits_bytes / 10, f"extra peak {extra / 2**20:.0f} MiB vs fp32 logits {logits_bytes / 2**20:.0f} MiB"
    ours_grad = hidden.grad.clone()

    hid32 = hidden.detach().float().requires_grad_(True)
    gold = linear_logprobs_reference(hid32, weight.float(), targets)
    gold.sum().backward()
    hid_bf = hidden.detach().clone().requires_grad_(True)
    peer = linear_logprobs_reference(hid_bf, weight, targets)
    peer.sum().backward()
    assert_rule(lp, gold, peer, 1e-3, "logprobs")
    assert_rule(ours_grad, hid32.grad, hid_bf.grad, 1e-3 * hid32.grad.abs().max().item(), "d_hidden")
