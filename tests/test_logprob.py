"""linear_logprobs: both implementations against the float64 reference (values, entropy, gradients)."""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import saga_kernels.logprob as logprob_mod
from saga_kernels import linear_logprobs
from saga_kernels.reference import linear_logprobs_reference

from utils import JUNK, assert_rule

# N not a multiple of any block, V = 1000 + odd, H spanning two H tiles with a remainder.
N, H, V = 77, 97, 1013


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Force several chunks/splits at test sizes so chunk boundaries and split merging are exercised."""
    monkeypatch.setattr(logprob_mod, "_TORCH_ROWS_PER_CHUNK", 32)
    monkeypatch.setattr(logprob_mod, "_TORCH_VOCAB_PER_CHUNK", 300)
    monkeypatch.setattr(logprob_mod, "_SPLITS", 3)  # 3 vocab splits (the last one shorter)
    monkeypatch.setattr(logprob_mod, "_SPLITS_SMALL_N", 3)
    monkeypatch.setattr(logprob_mod, "_JAC_ROWS", 40)  # path 2: row chunks of 40 and vocab segments of 384
    monkeypatch.setattr(logprob_mod, "_JAC_SEGMENT", 384)
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


def run(fn, hidden, weight, bias, targets, temperature, g_lp, g_ent, entropy, train_head=True, **kw):
    """Forward + backward of sum(g_lp * logp [+ g_ent * entropy]); returns outputs and grads (those of
    hidden, then of weight and bias when ``train_head``). ``entropy="detached"``: the entropy is returned but
    adds nothing to the objective (the reference is asked for a differentiable one and it is detached)."""
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(train_head)
    bias = bias.detach().clone().requires_grad_(train_head) if bias is not None else None
    if entropy == "detached" and fn is linear_logprobs_reference:
        logp, ent = fn(hidden, weight, targets, bias=bias, temperature=temperature, return_entropy=True, **kw)
        ent = ent.detach()
    else:
        out = fn(hidden, weight, targets, bias=bias, temperature=temperature, return_entropy=entropy, **kw)
        logp, ent = out if entropy is not False else (out, None)
    obj = (logp.double() * g_lp.double()).sum()
    if entropy is True:
        obj = obj + (ent.double() * g_ent.double()).sum()
    obj.backward()
    grads = [hidden.grad] + ([weight.grad] + ([bias.grad] if bias is not None else []) if train_head else [])
    return logp.detach(), (ent.detach() if entropy else None), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature,entropy,bias,train_head", [
    (1.0, False, False, True),  # path 3 (recompute): the head trains
    (0.7, True, True, True),  # path 3 with entropy and bias
    (0.7, False, True, False),  # path 2 (Jacobian): frozen head and bias
    (1.0, True, False, False),  # path 3: entropy with a frozen head
])
def test_matches_reference(impl, device, dtype, temperature, entropy, bias, train_head):
    hidden, weight, b, targets = make_inputs(dtype, device, bias=bias)
    g_lp = torch.randn(N, device=device)
    g_ent = torch.randn(N, device=device)

    def ours(*args, **kw):
        return linear_logprobs(*args, impl=impl, **kw)

    lp, ent, grads = run(ours, hidden, weight, b, targets, temperature, g_lp, g_ent, entropy, train_head)
    to64 = [t.double() if t is not None else None for t in (hidden, weight, b)]
    lp64, ent64, grads64 = run(linear_logprobs_reference, *to64, targets, temperature, g_lp, g_ent, entropy,
                               train_head)
    lp_pe, ent_pe, grads_pe = run(linear_logprobs_reference, hidden, weight, b, targets, temperature, g_lp, g_ent,
                                  entropy, train_head)

    assert lp.dtype == torch.float32 and lp.shape == (N,)
    ignored = targets == -100
    assert torch.all(lp[ignored] == 0)
    assert torch.all(lp[~ignored] < 0)
    slack = 2e-5 if dtype == torch.float32 else 1e-3
    assert_rule(lp, lp64, lp_pe, slack=slack, what="logprobs")
    if entropy:
        assert ent.dtype == torch.float32
        assert torch.all(ent[ignored] == 0)
        assert_rule(ent, ent64, ent_pe, slack=slack, what="entropy")
    for name, ours_g, gold_g, peer_g in zip(("hidden", "weight", "bias"), grads, grads64, grads_pe):
        assert ours_g.dtype == dtype
        assert_rule(ours_g, gold_g, peer_g, rel_slack=slack, what=f"d_{name}")
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
    lp_pe, ent_pe, grads_pe = run(linear_logprobs_reference, hidden, weight, b, targets, 1.7, g, g, True)
    assert_rule(lp, lp64, lp_pe, slack=1e-6, what="logprobs")
    assert_rule(ent, ent64, ent_pe, slack=1e-6, what="entropy")
    for name, ours, gold, peer in zip(("hidden", "weight", "bias"), grads, grads64, grads_pe):
        assert_rule(ours, gold, peer, rel_slack=1e-6, what=f"d_{name}")


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
    """A frozen head takes path 2: its backward is g * J, no matmul at all. A trained head recomputes."""
    assert _backward_matmuls(impl, device, train_weight=False) == 0
    trained = _backward_matmuls(impl, device, train_weight=True)
    chunks = 2 * 4  # (row chunks of 32) x (vocab chunks of 256 (triton) / 300 (torch))
    if impl == "triton":  # per chunk: d_hidden and d_weight (the logits are recomputed inside the kernel)
        assert trained == 2 * chunks
    else:  # per chunk: logits, d_hidden and d_weight
        assert trained == 3 * chunks


@pytest.mark.parametrize("train_head,entropy,grad,fwd,bwd", [
    (False, False, False, 2, 0),  # path 1: forward only, 2NHV
    (False, True, False, 2, 0),  # path 1 with the entropy: from the streaming statistics, no extra matmul
    (False, False, True, 4, 0),  # path 2: frozen head, the forward forms J: 4NHV, nothing in the backward
    (False, "detached", True, 4, 0),  # path 2 with the entropy read (TRL's metrics, entropy masks): still 4NHV
    (False, True, True, 2, 4),  # path 3: a differentiated entropy -> recompute in the backward: 6NHV
    (True, False, True, 2, 6),  # path 3 with a trained head: 8NHV
    (True, "detached", True, 2, 6),  # ... the entropy read on the way: still 8NHV
])
def test_flops_per_call_meet_the_floor(device, train_head, entropy, grad, fwd, bwd):
    """Matmul flops of one forward + backward of the torch fallback, counted by torch's FlopCounterMode: the
    forward costs fwd * N_active * H * V and the backward bwd * N_active * H * V; ignored rows (prompt tokens)
    cost nothing on any path."""
    from torch.utils.flop_counter import FlopCounterMode

    hidden, weight, _, targets = make_inputs(torch.float32, device, n=70)
    n_active = int((targets != -100).sum())
    assert n_active < 70
    hidden.requires_grad_(grad)
    weight.requires_grad_(train_head)
    with FlopCounterMode(display=False) as counter:
        out = linear_logprobs(hidden, weight, targets, return_entropy=entropy, impl="torch")
        if grad:
            (out[0].sum() + out[1].sum() if entropy is not False else out.sum()).backward()
    assert counter.get_total_flops() == (fwd + bwd) * n_active * H * V


def test_detached_entropy(impl, device):
    """return_entropy="detached": the entropy's value (equal to the differentiable one), no gradient, and the
    hidden gradient of the run without entropy, bitwise (the same Jacobian path)."""
    hidden, weight, b, targets = make_inputs(torch.float32, device)
    g = torch.randn(N, device=device)

    def ours(*a, **k):
        return linear_logprobs(*a, impl=impl, **k)

    lp_d, ent_d, grads_d = run(ours, hidden, weight, b, targets, 0.8, g, g, "detached", train_head=False)
    lp_n, _, grads_n = run(ours, hidden, weight, b, targets, 0.8, g, g, False, train_head=False)
    lp_t, ent_t, _ = run(ours, hidden, weight, b, targets, 0.8, g, g, True, train_head=False)
    assert torch.equal(lp_d, lp_n) and torch.equal(grads_d[0], grads_n[0])
    torch.testing.assert_close(ent_d, ent_t, rtol=0, atol=1e-5)
    h = hidden.clone().requires_grad_(True)
    lp, ent = linear_logprobs(h, weight, targets, bias=b, return_entropy="detached", impl=impl)
    assert lp.requires_grad and not ent.requires_grad


@pytest.mark.parametrize("hdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("train_head,entropy", [(False, False), (False, True), (True, "detached")])
def test_half_hidden_with_fp32_head(impl, device, hdtype, train_head, entropy):
    """Half-precision hidden states with an fp32 head and bias (a model under autocast): no V x H copy is asked
    of the caller; gradients come back in each input's dtype. Peer: what autocast computes (the head rounded to
    the hidden dtype)."""
    hidden, weight, b, targets = make_inputs(torch.float32, device)
    hidden = hidden.to(hdtype)
    g = torch.randn(N, device=device)

    def ours(*a, **k):
        return linear_logprobs(*a, impl=impl, **k)

    lp, ent, grads = run(ours, hidden, weight, b, targets, 0.9, g, g, entropy, train_head)
    gold = run(linear_logprobs_reference, hidden.double(), weight.double(), b.double(), targets, 0.9, g, g, entropy,
               train_head)
    peer = run(linear_logprobs_reference, hidden, weight.to(hdtype), b.to(hdtype), targets, 0.9, g, g, entropy,
               train_head)
    assert_rule(lp, gold[0], peer[0], slack=1e-3, what="logprobs")
    if entropy:
        assert_rule(ent, gold[1], peer[1], slack=1e-3, what="entropy")
    assert grads[0].dtype == hdtype
    if train_head:
        assert grads[1].dtype == torch.float32 and grads[2].dtype == torch.float32
    for name, o, gg, pp in zip(("hidden", "weight", "bias"), grads, gold[2], peer[2]):
        assert_rule(o, gg, pp, rel_slack=1e-3, what=f"d_{name}")


@pytest.mark.parametrize("scale,cap", [(0.3, None), (1.7, 5.0), (1.0, 2.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train_head,entropy", [(False, False), (False, "detached"), (False, True), (True, True)])
def test_logit_scale_and_softcap(impl, device, scale, cap, dtype, train_head, entropy):
    """z = cap * tanh(scale * raw / cap) / T (Gemma 2's final_logit_softcapping; Granite's / Cohere's logit scale)
    on every path, against the float64 reference; with cap 2 most logits sit in tanh's saturation."""
    hidden, weight, b, targets = make_inputs(dtype, device)
    g_lp, g_ent = torch.randn(N, device=device), torch.randn(N, device=device)
    kw = dict(logit_scale=scale, softcap=cap)

    def ours(*a, **k):
        return linear_logprobs(*a, impl=impl, **k)

    lp, ent, grads = run(ours, hidden, weight, b, targets, 0.7, g_lp, g_ent, entropy, train_head, **kw)
    gold = run(linear_logprobs_reference, hidden.double(), weight.double(), b.double(), targets, 0.7, g_lp, g_ent,
               entropy, train_head, **kw)
    peer = run(linear_logprobs_reference, hidden, weight, b, targets, 0.7, g_lp, g_ent, entropy, train_head, **kw)
    slack = 2e-5 if dtype == torch.float32 else 1e-3
    assert_rule(lp, gold[0], peer[0], slack=slack, what="logprobs")
    if entropy:
        assert_rule(ent, gold[1], peer[1], slack=slack, what="entropy")
    for name, o, gg, pp in zip(("hidden", "weight", "bias"), grads, gold[2], peer[2]):
        assert_rule(o, gg, pp, rel_slack=slack, what=f"d_{name}")


def test_weight_context_is_entered_around_the_backward_reads(impl, device):
    """A head that is only materialized inside a context (DeepSpeed ZeRO-3's gather): the recompute path's
    backward enters ``weight_context`` before it reads the head again, and gets the right gradient."""
    hidden, weight, _, targets = make_inputs(torch.float32, device)
    head = torch.nn.Parameter(torch.empty(0, H), requires_grad=False)
    entered = []

    @contextlib.contextmanager
    def gathered():
        head.data = weight.clone()
        entered.append(True)
        try:
            yield
        finally:
            head.data = torch.empty(0, H, device=device)

    h = hidden.clone().requires_grad_(True)
    with gathered():
        lp, ent = linear_logprobs(h, head, targets, return_entropy=True, weight_context=gathered, impl=impl)
    assert head.numel() == 0
    (lp.sum() + ent.sum()).backward()
    assert len(entered) == 2
    ones = torch.ones(N, device=device)
    gold = run(linear_logprobs_reference, hidden.double(), weight.double(), None, targets, 1.0, ones, ones, True, False)
    peer = run(linear_logprobs_reference, hidden, weight, None, targets, 1.0, ones, ones, True, False)
    assert_rule(h.grad, gold[2][0], peer[2][0], rel_slack=1e-6, what="d_hidden")


def test_jacobian_path_equals_recompute_path(impl, device):
    """Path 2 and path 3 give the same log-probs and hidden gradient (frozen head, fp32). Path 3 is asked for with
    a differentiable entropy that adds nothing to the objective (its upstream gradient is 0)."""
    hidden, weight, b, targets = make_inputs(torch.float32, device)
    g = torch.randn(N, device=device)
    results = []
    for entropy in (False, True):
        lp, _, grads = run(lambda *a, **k: linear_logprobs(*a, impl=impl, **k), hidden, weight, b, targets, 0.9, g,
                           torch.zeros_like(g), entropy, train_head=False)
        results.append((lp, grads[0]))
    zero = torch.zeros_like(g)
    gold = run(linear_logprobs_reference, hidden.double(), weight.double(), b.double(), targets, 0.9, g, zero, False,
               train_head=False)
    peer = run(linear_logprobs_reference, hidden, weight, b, targets, 0.9, g, zero, False, train_head=False)
    for lp, dh in results:  # each path as close to float64 as eager fp32 is
        assert_rule(lp, gold[0], peer[0], slack=1e-6, what="logprobs")
        assert_rule(dh, gold[2][0], peer[2][0], rel_slack=1e-6, what="d_hidden")


def test_forward_only_under_no_grad(impl, device):
    hidden, weight, b, targets = make_inputs(torch.float32, device)
    hidden.requires_grad_(True)
    with torch.no_grad():
        lp = linear_logprobs(hidden, weight, targets, bias=b, impl=impl)
    assert not lp.requires_grad
    gold = linear_logprobs_reference(hidden.double(), weight.double(), targets, bias=b.double())
    torch.testing.assert_close(lp.double(), gold, rtol=0, atol=2e-5)


def test_target_almost_certain_keeps_gradient_precision(impl, device):
    """p_y -> 1: the Jacobian's (1 - p_y) comes from -expm1(logprob), so the tiny gradient keeps its
    relative precision as well as eager fp32's softmax - onehot does (tolerance rule)."""
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(300, 64, generator=g).to(device)
    targets = torch.randint(0, 300, (24,), generator=g).to(device)
    hidden = (weight[targets] * torch.linspace(0.5, 3.0, 24)[:, None]).to(device)  # p_y from moderate to ~1
    ones = torch.ones(24, device=device)
    ours = run(lambda *a, **k: linear_logprobs(*a, impl=impl, **k), hidden, weight, None, targets, 1.0, ones, ones,
               False, train_head=False)
    gold = run(linear_logprobs_reference, hidden.double(), weight.double(), None, targets, 1.0, ones, ones, False,
               train_head=False)
    peer = run(linear_logprobs_reference, hidden, weight, None, targets, 1.0, ones, ones, False, train_head=False)
    assert float(gold[0].max()) > -1e-5  # some rows are (almost) certain
    assert_rule(ours[0], gold[0], peer[0], slack=1e-6, what="logprobs")
    assert_rule(ours[2][0], gold[2][0], peer[2][0], rel_slack=1e-6, what="d_hidden")


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


@pytest.mark.parametrize("rows", [0, 5])
@pytest.mark.parametrize("train_head", [False, True])
def test_empty_and_all_ignored_give_zero_gradients(impl, device, rows, train_head):
    """No rows (an empty micro-batch under DDP) or only ignored rows: log-probs 0 and a zero gradient of
    the right shape for every tensor that requires grad (a None would drop it from DDP's reduction)."""
    hidden, weight, b, _ = make_inputs(torch.float32, device, n=rows)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(train_head)
    bb = b.clone().requires_grad_(train_head)
    lp = linear_logprobs(h, w, torch.full((rows,), -100, device=device), bias=bb, impl=impl)
    lp.sum().backward()
    assert lp.shape == (rows,) and torch.all(lp == 0)
    assert h.grad is not None and h.grad.shape == h.shape and torch.all(h.grad == 0)
    if train_head:
        for p in (w, bb):
            assert p.grad is not None and p.grad.shape == p.shape and torch.all(p.grad == 0)


@pytest.mark.parametrize("junk", JUNK)
@pytest.mark.parametrize("train_head,entropy", [(False, False), (True, False), (False, True)])
def test_junk_at_ignored_rows_never_leaks(impl, device, junk, train_head, entropy):
    """Hidden states of ignored rows filled with +inf / -inf / NaN: log-probs, entropy and every gradient
    equal the clean run, and the ignored rows' gradient is exactly 0 (every path)."""
    hidden, weight, b, targets = make_inputs(torch.float32, device, n=45)
    ignored = targets == -100
    g = torch.randn(45, device=device)
    dirty = torch.where(ignored[:, None], torch.full_like(hidden, junk), hidden)

    def fn(*a, **k):
        return linear_logprobs(*a, impl=impl, **k)

    clean = run(fn, hidden, weight, b, targets, 1.0, g, g, entropy, train_head)
    bad = run(fn, dirty, weight, b, targets, 1.0, g, g, entropy, train_head)
    torch.testing.assert_close(bad[0], clean[0], rtol=0, atol=0)
    if entropy:
        torch.testing.assert_close(bad[1], clean[1], rtol=0, atol=0)
    for ours, want in zip(bad[2], clean[2]):
        torch.testing.assert_close(ours, want, rtol=0, atol=0)
    assert torch.all(bad[2][0][ignored] == 0)


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
    assert extra < logits_bytes / 10, (f"extra peak {extra / 2**20:.0f} MiB vs fp32 logits "
                                       f"{logits_bytes / 2**20:.0f} MiB")
    ours_grad = hidden.grad.clone()

    hid32 = hidden.detach().float().requires_grad_(True)
    gold = linear_logprobs_reference(hid32, weight.float(), targets)
    gold.sum().backward()
    hid_bf = hidden.detach().clone().requires_grad_(True)
    peer = linear_logprobs_reference(hid_bf, weight, targets)
    peer.sum().backward()
    assert_rule(lp, gold, peer, slack=1e-3, what="logprobs")
    assert_rule(ours_grad, hid32.grad, hid_bf.grad, rel_slack=1e-3, what="d_hidden")


# ----------------------------------------------------------------------------------------------------
# sm_90 compile of every kernel at Qwen3-VL-8B shapes (H = 4096, V = 151936), as launched
# ----------------------------------------------------------------------------------------------------
from aot import Spec, assert_specs, skip_on_gpu  # noqa: E402

_CUDA = torch.device("cuda")
_INTS = dict(row0="i32", R="i32", v_begin="i32", v_end="i32", vocab_per_split="i32", H="i32", V="i32")


def _logprob_specs(dtype: str, dot, precision, cfgs=None, *, softcap=False, w_dtype=None):
    """The three kernels for hidden states of ``dtype`` (and a head of ``w_dtype``, default the same)."""
    w_dtype = w_dtype or dtype
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    torch_w = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[w_dtype]
    cfg_s, cfg_e, cfg_d = cfgs or (logprob_mod.stats_config(_CUDA, torch_dtype, torch_w, softcap, write_p=True),
                                   logprob_mod.expect_config(_CUDA, torch_dtype, torch_w),
                                   logprob_mod.dlogits_config(_CUDA, torch_dtype, torch_w, softcap))
    warps = lambda c: dict(num_warps=c["num_warps"], num_stages=c["num_stages"])  # noqa: E731
    blocks = lambda c: {k: v for k, v in c.items() if k.startswith("BLOCK")}  # noqa: E731
    half = dtype != "fp32" or precision != "ieee"
    f32 = "*fp32"
    label = dtype + (f" hidden, {w_dtype} head" if w_dtype != dtype else "") + (", softcap" if softcap else "")
    # path 2's probability tile is fp32 whatever the dtype; path 3's dlogits chunk bf16 for bf16, else fp32
    stats = Spec("saga_kernels.logprob", "_stats_kernel",
                 dict(h_ptr="*" + dtype, w_ptr="*" + w_dtype, b_ptr="*" + dtype, tgt_ptr="*i64", order_ptr="*i64",
                      n_active_ptr="*i64", mx_ptr=f32, sx_ptr=f32, tx_ptr=f32, zt_ptr=f32,
                      p_ptr=f32, mt_ptr=f32, inv_temp="fp32", scale="fp32", cap="fp32", **_INTS),
                 dict(SPLITS=16, FIRST=False, HAS_BIAS=False, WITH_ENT=True, WRITE_P=True, SOFTCAP=softcap,
                      DOT_DTYPE=dot, PRECISION=precision, **blocks(cfg_s)),
                 label=f"{label} path 2", expect_wgmma=half,
                 divisible=("row0", "R", "v_begin", "v_end", "vocab_per_split", "H", "V", "stride_h", "stride_w",
                            "stride_p", "stride_mt"), **warps(cfg_s))
    expect = Spec("saga_kernels.logprob", "_expect_kernel",
                  dict(p_ptr=f32, mt_ptr=f32, w_ptr="*" + w_dtype, n_active_ptr="*i64", m_ptr=f32, mprev_ptr=f32,
                       e_ptr=f32),
                  dict(FIRST=False, TILE_V=cfg_s["BLOCK_V"], DOT_DTYPE=dot, PRECISION=precision, **blocks(cfg_e)),
                  label=label, expect_wgmma=half,
                  divisible=("row0", "R", "v_begin", "v_end", "H", "stride_p", "stride_mt", "stride_w", "stride_e"),
                  **warps(cfg_e))
    dlogits = Spec("saga_kernels.logprob", "_dlogits_kernel",
                   dict(h_ptr="*" + dtype, w_ptr="*" + w_dtype, b_ptr="*" + dtype, tgt_ptr="*i64", lse_ptr=f32,
                        g_ptr=f32, ge_ptr=f32, ez_ptr=f32, dzy_ptr=f32,
                        dz_ptr="*" + ("bf16" if dtype == "bf16" else "fp32"), inv_temp="fp32", scale="fp32",
                        cap="fp32"),
                   dict(HAS_BIAS=False, WITH_ENT=True, SOFTCAP=softcap, DOT_DTYPE=dot, PRECISION=precision,
                        **blocks(cfg_d)),
                   label=f"{label} path 3", expect_wgmma=half,
                   divisible=("N", "v_start", "v_stop", "H", "stride_h", "stride_w", "stride_dz"), **warps(cfg_d))
    return [stats, expect, dlogits]


def _aot_specs():
    import triton.language as tl

    return (_logprob_specs("bf16", tl.bfloat16, "tf32") + _logprob_specs("fp32", tl.float32, "tf32x3")
            + _logprob_specs("fp16", tl.float16, "tf32")  # fp32 probability tile and dlogits chunk under fp16 dots
            # a bf16 model with an fp32 head (autocast), Gemma-2's logit softcap, and both
            + _logprob_specs("bf16", tl.bfloat16, "tf32", w_dtype="fp32")
            + _logprob_specs("bf16", tl.bfloat16, "tf32", softcap=True)
            + _logprob_specs("fp32", tl.float32, "tf32x3", softcap=True)
            + _logprob_specs("bf16", tl.bfloat16, "tf32", softcap=True, w_dtype="fp32"))


AOT_SPECS = _aot_specs() if logprob_mod.triton.__class__.__name__ != "_MissingTriton" else []


@skip_on_gpu
def test_kernels_compile_for_sm90():
    """bf16, fp16 and fp32 (tf32x3) kernels at real shapes: wgmma, no spills, <= 255 registers, shared < 228 KB."""
    assert_specs(AOT_SPECS)


@pytest.mark.slow
@skip_on_gpu
def test_autotune_space_compiles_for_sm90():
    """Every config SAGA_AUTOTUNE=1 may pick compiles for sm_90 (bf16) without spills."""
    import triton.language as tl

    space = logprob_mod._AUTOTUNE_SPACE
    specs = []
    for cs in space["stats"]:
        specs.append(_logprob_specs("bf16", tl.bfloat16, "tf32", (cs, space["expect"][0], cs))[0])
    for ce in space["expect"]:
        specs.append(_logprob_specs("bf16", tl.bfloat16, "tf32", (space["stats"][0], ce, space["stats"][0]))[1])
    assert_specs(specs)


@pytest.mark.parametrize("train_head,entropy", [(False, False), (False, True), (True, False)])
def test_autocast_around_forward_and_backward_changes_nothing(impl, device, train_head, entropy):
    """An enclosing autocast region (a training loop's, forward and backward inside it) does not reach the kernels'
    own precision: the same values and gradients as without it, on every path."""
    hidden, weight, b, targets = make_inputs(torch.float32, device, n=33)
    g = torch.randn(33, device=device)
    fn = lambda *a, **k: linear_logprobs(*a, impl=impl, **k)  # noqa: E731
    plain = run(fn, hidden, weight, b, targets, 0.9, g, g, entropy, train_head)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = run(fn, hidden, weight, b, targets, 0.9, g, g, entropy, train_head)
    for got, want in zip([inside[0]] + inside[2], [plain[0]] + plain[2]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_jacobian_path_saves_only_the_live_rows(impl, device):
    """Path 2 keeps J for the rows that are used (prompt rows cost no memory): [N_live, H] fp32 and their indices."""
    hidden, weight, _, targets = make_inputs(torch.float32, device, n=60)
    targets[:45] = -100  # a long prompt
    saved = []
    h = hidden.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lp = linear_logprobs(h, weight, targets, impl=impl)
    live = int((targets != -100).sum())
    assert sum(t.numel() * t.element_size() for t in saved) <= live * (H * 4 + 8) + 60 * 8
    lp.sum().backward()
    ones = torch.ones(60, device=device)
    gold = run(linear_logprobs_reference, hidden.double(), weight.double(), None, targets, 1.0, ones, ones, False,
               train_head=False)
    peer = run(linear_logprobs_reference, hidden, weight, None, targets, 1.0, ones, ones, False, train_head=False)
    assert_rule(h.grad, gold[2][0], peer[2][0], rel_slack=1e-6, what="d_hidden")
    assert torch.all(h.grad[:45] == 0)


@pytest.mark.parametrize("where", ["hidden", "weight", "bias"])
def test_non_finite_inputs_at_used_rows_raise(where):
    hidden, weight, b, targets = make_inputs(torch.float32, "cpu", n=12, v=40)
    targets[0] = 3
    tensors = dict(hidden=hidden, weight=weight, bias=b)
    tensors[where] = tensors[where].clone()
    tensors[where].view(-1)[0] = float("nan")  # row 0 of hidden is used
    with pytest.raises(ValueError, match=f"{where} contains 1 row"):
        linear_logprobs(tensors["hidden"], tensors["weight"], targets, bias=tensors["bias"], impl="torch")


def test_numpy_and_torch_scalars_and_odd_arguments():
    import numpy as np

    hidden, weight, _, targets = make_inputs(torch.float32, "cpu", n=6, v=50)
    want = linear_logprobs(hidden, weight, targets, temperature=0.5, impl="torch")
    torch.testing.assert_close(linear_logprobs(hidden, weight, targets, temperature=np.float32(0.5), impl="torch"),
                               want)
    with pytest.raises(TypeError, match="weight_context must be None or a callable"):
        linear_logprobs(hidden, weight, targets, weight_context=5, impl="torch")
    with pytest.raises(ValueError, match="H >= 1"):
        linear_logprobs(hidden[:, :0], weight[:, :0], targets, impl="torch")
    with pytest.raises(ValueError, match="meta device"):
        linear_logprobs(hidden.to("meta"), weight.to("meta"), targets.to("meta"), impl="torch")
