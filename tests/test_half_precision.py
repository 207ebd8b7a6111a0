"""Half-precision inputs at the edges of their range (issue 22): for every kernel, fp16 and bf16 inputs with
near-certain targets and extreme logits (log-probs, GRPO), extreme similarities (metric losses: near-duplicate
embeddings, large alpha / beta, short rows), saturated attention rows (attention_probs, attention_kl); values and
gradients against the float64 reference through the tolerance rule, both implementations.

What these cases catch: a probability, exp-sum or gradient weight held in a half dtype between or inside kernels.
fp16 flushes numbers below 6e-8 to 0 (exp(-18) = 1.5e-8: the rivals of a near-certain token), keeps a few bits
below 6e-5 and overflows above 65504 (a probability times the inverse norms of short rows, a Potential Field force,
exp(beta (s - base))); bf16 keeps fp32's range. The kernels hold all of them in fp32, and hand a product at most bf16
(``saga_kernels._tl_utils.grad_dtype``).

fp16 runs as a GPU runs it (the ``gpu_dtypes`` fixture): a GPU feeds fp16 inputs to the tensor cores as fp16 while the
interpreter's default dot is fp32, so the fixture gives the kernels the GPU's dtype choices (dot operands, the
gradient tiles handed to cuBLAS). The interpreter's fp16 dot rounds both operands to fp16 and accumulates in fp32, as
wgmma does: whatever a kernel casts to fp16 on a GPU is cast here too (bf16 cannot be emulated: the interpreter's
bf16 arithmetic is unreliable). Before the fix these cases gave NaN gradients (fp16 gradient weights overflowing)
or a d_hidden 100% wrong (a near-certain token's rivals flushed to 0).

Peers: the reference in the inputs' own dtype (the obvious computation). Where fp16's range cannot run it (a
non-finite value or gradient: exp(beta (s - base)) = e^25 in Multi-Similarity, exp(70) in Proxy Anchor, d^-5 in
Potential Field), the peer is the same computation in fp32 on the fp16 inputs, a stricter one (``_peer``).
"""
import pytest
import torch
import torch.nn.functional as F

import saga_kernels._tl_utils as tl_utils
import saga_kernels.attention as attention_mod
import saga_kernels.logprob as logprob_mod
import saga_kernels.metric_common as metric_common
import saga_kernels.multi_similarity as ms_mod
import saga_kernels.potential_field as pf_mod
import saga_kernels.proxy_anchor as pa_mod
import saga_kernels.supcon as supcon_mod
from saga_kernels import (
    attention_kl,
    attention_probs,
    grpo_loss,
    linear_grpo_loss,
    linear_logprobs,
    multi_similarity_loss,
    potential_field_loss,
    proxy_anchor_loss,
    supcon_loss,
)
from saga_kernels.reference import (
    attention_kl_reference,
    attention_probs_reference,
    grpo_loss_reference,
    linear_logprobs_reference,
    multi_similarity_loss_reference,
    potential_field_loss_reference,
    proxy_anchor_loss_reference,
    supcon_loss_reference,
)

from conftest import HAS_CUDA
from utils import assert_rule

HALF = [torch.float16, torch.bfloat16]
FP16_MAX = torch.finfo(torch.float16).max


@pytest.fixture
def gpu_dtypes(monkeypatch):
    """Under the interpreter, fp16 inputs get the dtypes of a GPU launch (module docstring); on a GPU, nothing."""
    if HAS_CUDA:
        return
    cuda = torch.device("cuda")

    def as_gpu(choose):
        def config(dtype, device, **kw):
            return choose(dtype, cuda if dtype == torch.float16 else device, **kw)
        return config

    for mod in (logprob_mod, supcon_mod, ms_mod, pa_mod, pf_mod, attention_mod):
        monkeypatch.setattr(mod, "dot_config", as_gpu(tl_utils.dot_config))
        if hasattr(mod, "grad_dot_config"):
            monkeypatch.setattr(mod, "grad_dot_config", as_gpu(tl_utils.grad_dot_config))
    for mod in (logprob_mod, metric_common):
        monkeypatch.setattr(mod, "grad_buffer_dtype", as_gpu(tl_utils.grad_buffer_dtype))


def _run(fn, inputs, upstream=None):
    """``fn(*inputs)`` and the gradients of the objective with respect to the float inputs that require grad:
    [outputs..., gradients...], detached. The objective is sum(upstream * first output) (upstream 1 when None), or
    with a tuple of upstreams sum over the outputs of upstream_k * output_k (a None upstream: that output is left
    out)."""
    outs = fn(*inputs)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = []
    if leaves:
        ups = upstream if isinstance(upstream, tuple) else (1.0 if upstream is None else upstream,)
        obj = sum((o.double() * (u.double() if isinstance(u, torch.Tensor) else u)).sum()
                  for o, u in zip(outs, ups) if u is not None)
        grads = torch.autograd.grad(obj, leaves)
    return [o.detach() for o in outs] + list(grads)


def _leaf(t, dtype, grad=True):
    return t.detach().to(dtype).requires_grad_(grad)


def _peer(fn, inputs, dtype, upstream=None):
    """The reference ``fn`` on ``inputs`` (float tensors) in ``dtype``; for fp16, in fp32 on the fp16 values when fp16
    cannot hold the computation (a non-finite output or gradient)."""
    cast = [_leaf(t, dtype, t.requires_grad) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in inputs]
    res = _run(fn, cast, upstream)
    if dtype == torch.float16 and not all(torch.isfinite(r).all() for r in res):
        cast = [_leaf(t.to(dtype), torch.float32, t.requires_grad)
                if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
        res = _run(fn, cast, upstream)
    return res


def _gold(fn, inputs, dtype, upstream=None):
    """The reference ``fn`` in float64 on the inputs rounded to ``dtype`` (what the op actually receives)."""
    cast = [_leaf(t.to(dtype), torch.float64, t.requires_grad)
            if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
    return _run(fn, cast, upstream)


def _ours(fn, inputs, dtype, upstream=None):
    cast = [_leaf(t, dtype, t.requires_grad) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in inputs]
    return _run(fn, cast, upstream)


def _check(ours, gold, peer, names, *, slack=0.0, rel_slack=0.0):
    """The rule for every output and gradient; the gold must be finite and (gradients) fit fp16, or the case would
    prove nothing."""
    assert len(ours) == len(gold) == len(peer) == len(names)
    for o, g, p, name in zip(ours, gold, peer, names):
        assert torch.isfinite(g).all() and g.abs().max() < FP16_MAX, f"{name}: the case leaves fp16's range"
        assert torch.isfinite(o).all(), f"{name}: non-finite values"
        assert_rule(o.double(), g, p.double(), slack=slack, rel_slack=rel_slack, what=name)


# ----------------------------------------------------------------------------------------------------------
# linear_logprobs: near-certain targets, extreme logits; all three paths
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def small_tiles(monkeypatch):
    """Several vocab segments, splits and chunks at V = 300, so the online rescaling to the non-target maximum
    crosses segment, split and chunk boundaries (with the target and the largest rival in different ones)."""
    monkeypatch.setattr(logprob_mod, "_SPLITS", 2)
    monkeypatch.setattr(logprob_mod, "_SPLITS_SMALL_N", 2)
    monkeypatch.setattr(logprob_mod, "_JAC_ROWS", 4)
    monkeypatch.setattr(logprob_mod, "_JAC_SEGMENT", 128)
    monkeypatch.setattr(logprob_mod, "_TORCH_VOCAB_PER_CHUNK", 100)
    monkeypatch.setattr(logprob_mod, "_TORCH_ROWS_PER_CHUNK", 4)
    monkeypatch.setattr(logprob_mod, "_DZ_CHUNK_BYTES", 8 * 128 * 4)


V, H = 300, 32
LEADS = (3.0, 9.0, 18.0, 25.0, 40.0, 90.0)  # how far each row's target leads every other logit
UPSTREAM = (1.0, 64.0, 65536.0, 65536.0, 65536.0, 65536.0, 1.0)  # GradScaler's first scale where it fits fp16


def _near_certain_head(seed=0, offset=0.0):
    """hidden [7, H], weight [V, H], bias [V], targets [7] (fp32): row i < 6 reads hidden unit i, on which every
    logit but its target's is -LEADS[i] (plus noise); row 6 is ignored. ``offset``: added to every logit (bias), so
    the logits are large in absolute terms while their differences stay."""
    g = torch.Generator().manual_seed(seed)
    hidden = 0.05 * torch.randn(7, H, generator=g)
    weight = 0.05 * torch.randn(V, H, generator=g)
    targets = torch.randperm(V, generator=g)[:7]
    targets[:3] = torch.tensor([5, 140, 290])  # the targets in different segments and splits
    for i, lead in enumerate(LEADS):
        hidden[i, i] = 1.0
        weight[:, i] = -lead
        weight[targets[i], i] = 0.0
    weight[(targets[1] + 150) % V, 1] = -1.0  # row 1's largest rival sits in a later segment than its target
    targets[6] = -100
    bias = offset + 0.05 * torch.randn(V, generator=g)
    return hidden, weight, bias, targets


def _logprob_fn(impl, entropy, with_bias):
    def fn(h, w, b, t):
        return linear_logprobs(h, w, t, bias=b if with_bias else None, return_entropy=entropy, impl=impl)
    return fn


def _logprob_ref(entropy, with_bias):
    def fn(h, w, b, t):
        if entropy == "detached":
            lp, ent = linear_logprobs_reference(h, w, t, bias=b if with_bias else None, return_entropy=True)
            return lp, ent.detach()
        return linear_logprobs_reference(h, w, t, bias=b if with_bias else None, return_entropy=entropy)
    return fn


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("path,entropy,train_head", [
    ("forward", True, False),  # path 1 (no gradient)
    ("jacobian", False, False),  # path 2 (frozen head)
    ("jacobian", "detached", False),  # path 2, entropy read
    ("recompute", False, True),  # path 3 (the head trains)
    ("recompute", True, False),  # path 3 (differentiated entropy)
])
@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_logprobs_near_certain_targets(impl, small_tiles, gpu_dtypes, dtype, path, entropy, train_head, offset):
    hidden, weight, bias, targets = _near_certain_head(offset=offset)
    with_bias = offset != 0.0
    need_h = path != "forward"
    inputs = [hidden.requires_grad_(need_h), weight.requires_grad_(train_head),
              bias.requires_grad_(train_head and with_bias), targets]
    upstream = (torch.tensor(UPSTREAM),)
    if entropy is True and path == "recompute":  # a differentiated entropy, with its own upstream gradient
        upstream += (torch.tensor([1024.0, 1.0, 65536.0, 2.0, 65536.0, 65536.0, 1.0]),)
    with torch.set_grad_enabled(need_h):
        ours = _ours(_logprob_fn(impl, entropy, with_bias), inputs, dtype, upstream)
        gold = _gold(_logprob_ref(entropy, with_bias), inputs, dtype, upstream)
        peer = _peer(_logprob_ref(entropy, with_bias), inputs, dtype, upstream)
    names = ["logprobs"] + (["entropy"] if entropy else []) + (["d_hidden"] if need_h else []) + (
        ["d_weight"] + (["d_bias"] if with_bias else []) if train_head else [])
    _check(ours, gold, peer, names, slack=1e-6)
    if need_h:  # and per row: every live row's d_hidden to 1% (the rule alone is dominated by the largest row)
        dh, dh64 = ours[names.index("d_hidden")].double(), gold[names.index("d_hidden")]
        for i in range(6):
            scale = dh64[i].abs().max()
            if scale > 1e-3:
                assert (dh[i] - dh64[i]).abs().max() <= 1e-2 * scale, f"row {i} (lead {LEADS[i]})"


def test_logprobs_issue_minimal_case(impl, gpu_dtypes):
    """The reported case: V = 128, H = 32, h = e_0, W[:, 0] = -18 but W[0, 0] = 0, target 0, fp16, frozen head (path
    2), upstream 65536. Before the fix the probability tile held exp(-18) in fp16 (0): d_hidden 100% wrong."""
    h = torch.zeros(1, 32)
    h[0, 0] = 1.0
    w = torch.zeros(128, 32)
    w[:, 0] = -18.0
    w[0, 0] = 0.0
    w[:, 1:] = 0.01 * torch.randn(128, 31, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0])
    up = torch.tensor([65536.0])
    inputs = [h.requires_grad_(True), w, None, t]
    ours = _ours(lambda a, b, _, c: linear_logprobs(a, b, c, impl=impl), inputs, torch.float16, up)
    gold = _gold(lambda a, b, _, c: linear_logprobs_reference(a, b, c), inputs, torch.float16, up)
    peer = _peer(lambda a, b, _, c: linear_logprobs_reference(a, b, c), inputs, torch.float16, up)
    rel = float((ours[1].double() - gold[1]).norm() / gold[1].norm())
    assert rel <= 1e-2, f"d_hidden relative error {rel:.3g}"
    _check(ours, gold, peer, ["logprobs", "d_hidden"], slack=1e-6)


# ----------------------------------------------------------------------------------------------------------
# GRPO: half log-probs at the edges, and the fused head with near-certain completions
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_loss_half_logprobs(dtype, level):
    """Log-probs of near-certain tokens (-1e-6) and of very unlikely ones (-60), old / ref log-probs far apart (clipped
    ratios, a large k3 KL): the loss computes in fp32 whatever the inputs' dtype."""
    g = torch.Generator().manual_seed(3)
    lp = torch.tensor([[-1e-6, -3e-5, -60.0, -0.7, -12.0], [-2e-4, -9.0, -1e-6, -25.0, -0.05]])
    old = lp + torch.tensor([[0.0, 2e-5, 3.0, -0.5, 0.3], [-1.0, 0.1, 4e-6, -2.0, 0.0]])
    ref = lp + torch.tensor([[3.0, -4.0, 1.0, 0.0, -7.0], [0.5, 2.0, -3.0, 6.0, 1e-3]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    adv = torch.randn(2, 5, generator=g)
    kw = dict(beta=0.04, importance_sampling_level=level, use_bias_correction_kl=True)

    def ours_fn(x, o, r):
        return grpo_loss(x, mask, adv, old_logprobs=o, ref_logprobs=r, **kw)[0]

    def ref_fn(x, o, r):
        return grpo_loss_reference(x, mask, adv.to(x.dtype), old_logprobs=o, ref_logprobs=r, **kw)

    inputs = [lp.requires_grad_(True), old, ref]
    ours = _ours(ours_fn, inputs, dtype, 1024.0)
    gold = _gold(ref_fn, inputs, dtype, 1024.0)
    peer = _peer(ref_fn, inputs, dtype, 1024.0)
    assert ours[0].dtype == torch.float32
    _check(ours, gold, peer, ["loss", "d_logprobs"], slack=1e-6, rel_slack=1e-6)


@pytest.mark.parametrize("dtype", HALF)
def test_linear_grpo_near_certain_completions(impl, small_tiles, gpu_dtypes, dtype):
    """linear_grpo_loss over a frozen head (path 2) whose completions are near-certain, upstream 4096."""
    hidden, weight, _, targets = _near_certain_head(seed=5)
    ids = torch.where(targets < 0, 0, targets).reshape(1, 7)
    mask = (targets >= 0).long().reshape(1, 7)
    adv = torch.tensor([1.5])

    def ours_fn(h, w):
        return linear_grpo_loss(h.reshape(1, 7, H), w, ids, mask, adv, impl=impl)[0]

    def ref_fn(h, w):
        lp = linear_logprobs_reference(h, w, torch.where(mask[0].bool(), ids[0], -100)).reshape(1, 7)
        return grpo_loss_reference(lp, mask, adv.to(lp.dtype))

    inputs = [hidden.requires_grad_(True), weight]
    ours = _ours(ours_fn, inputs, dtype, 4096.0)
    gold = _gold(ref_fn, inputs, dtype, 4096.0)
    peer = _peer(ref_fn, inputs, dtype, 4096.0)
    _check(ours, gold, peer, ["loss", "d_hidden"], slack=1e-6, rel_slack=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Metric losses: near-duplicate embeddings, extreme exponents, short rows (large inverse norms)
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(params=["fused", "gradient tile"])
def backward_path(request, monkeypatch):
    """The fused backward (D within the fused limit) or the large-D gradient-tile path (the limits lowered below D)."""
    if request.param == "gradient tile":
        for mod in (supcon_mod, ms_mod, pa_mod, pf_mod):
            monkeypatch.setattr(mod, "_MAX_FUSED_D", 8)
        for mod in (supcon_mod, ms_mod):
            monkeypatch.setattr(mod, "_MAX_FUSED_D_FP32", 8)
    return request.param


def _clusters(n_per, centers, noise, norm, seed, d=16):
    """Rows near-duplicating their class center (``noise`` relative), scaled to ``norm`` (short rows: large inverse
    norms, the range of a gradient weight r_i r_j); labels = center index."""
    g = torch.Generator().manual_seed(seed)
    c = F.normalize(centers, dim=1)
    x = c.repeat_interleave(n_per, dim=0) + noise * torch.randn(len(c) * n_per, d, generator=g)
    labels = torch.arange(len(c)).repeat_interleave(n_per)
    return F.normalize(x, dim=1) * norm, labels


def _centers(k, seed, d=16, twins=()):
    """k random directions; each (a, b) in ``twins`` makes center b a near-duplicate of center a."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(k, d, generator=g)
    for a, b in twins:
        c[b] = c[a] + 0.02 * torch.randn(d, generator=g)
    return c


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("with_ref", [False, True])
def test_supcon_extreme_similarities(impl, gpu_dtypes, backward_path, dtype, with_ref):
    """Near-duplicate positives and a near-duplicate class pair (cosines within 1e-4 of 1), T = 0.05 (logits 20 apart:
    softmax weights of 2e-9), rows of norm 1e-3 (gradient weights r_i r_j ~ 1e6, beyond fp16)."""
    x, y = _clusters(3, _centers(4, 1, twins=[(0, 1)]), 1e-3, 1e-3, seed=2)
    kw = dict(temperature=0.05)
    if with_ref:
        k, ky = _clusters(2, _centers(4, 1, twins=[(0, 1)]), 1e-3, 1e-3, seed=3)
        inputs = [x.requires_grad_(True), k.requires_grad_(True)]

        def fn(a, b):
            return supcon_loss(a, y, ref_embeddings=b, ref_labels=ky, impl=impl, **kw)

        def ref(a, b):
            return supcon_loss_reference(a, y, ref_embeddings=b, ref_labels=ky, **kw)
        names = ["loss", "d_embeddings", "d_ref_embeddings"]
    else:
        inputs = [x.requires_grad_(True)]

        def fn(a):
            return supcon_loss(a, y, impl=impl, **kw)

        def ref(a):
            return supcon_loss_reference(a, y, **kw)
        names = ["loss", "d_embeddings"]
    ours, gold, peer = _ours(fn, inputs, dtype), _gold(ref, inputs, dtype), _peer(ref, inputs, dtype)
    _check(ours, gold, peer, names, slack=1e-6, rel_slack=1e-3)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("alpha,beta,base", [(2.0, 50.0, 0.5), (40.0, 80.0, 0.0)])
def test_multi_similarity_extreme_similarities(impl, gpu_dtypes, backward_path, dtype, alpha, beta, base):
    """Near-duplicate negatives (a twin class pair: exp(beta (s - base)) up to e^80, beyond fp16) and positives,
    rows of norm 3e-4 (gradient weights G r_i r_j / N up to 1e6, beyond fp16); no miner (its decisions would hinge
    on half-precision rounding of cosines near 1)."""
    x, y = _clusters(3, _centers(4, 4, twins=[(0, 1), (2, 3)]), 1e-3, 3e-4, seed=5)
    kw = dict(alpha=alpha, beta=beta, base=base, miner_epsilon=None)
    inputs = [x.requires_grad_(True)]
    ours = _ours(lambda a: multi_similarity_loss(a, y, impl=impl, **kw), inputs, dtype)
    gold = _gold(lambda a: multi_similarity_loss_reference(a, y, **kw), inputs, dtype)
    peer = _peer(lambda a: multi_similarity_loss_reference(a, y, **kw), inputs, dtype)
    _check(ours, gold, peer, ["loss", "d_embeddings"], slack=1e-6, rel_slack=1e-3)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("alpha,margin", [(64.0, 0.1), (32.0, 0.9)])
def test_proxy_anchor_extreme_similarities(impl, gpu_dtypes, backward_path, dtype, alpha, margin):
    """Embeddings near-duplicating their proxy and a near-duplicate proxy pair (negative cosines near 1: exponents
    alpha (s + margin) up to 70), alpha large, a margin at the edge (0.9: positives sit right at it); rows and
    proxies of norm 1e-3 (gradient weights G r q up to 1e6 times alpha / C, beyond fp16)."""
    proxies = F.normalize(_centers(5, 7, twins=[(1, 2)]), dim=1) * 1e-3
    x, y = _clusters(3, _centers(5, 7, twins=[(1, 2)]), 1e-3, 1e-3, seed=8)
    kw = dict(alpha=alpha, margin=margin)
    inputs = [x.requires_grad_(True), proxies.requires_grad_(True)]
    ours = _ours(lambda a, p: proxy_anchor_loss(a, y, p, impl=impl, **kw), inputs, dtype)
    gold = _gold(lambda a, p: proxy_anchor_loss_reference(a, y, p, **kw), inputs, dtype)
    peer = _peer(lambda a, p: proxy_anchor_loss_reference(a, y, p, **kw), inputs, dtype)
    _check(ours, gold, peer, ["loss", "d_embeddings", "d_proxies"], slack=1e-6, rel_slack=1e-3)


@pytest.mark.parametrize("dtype", HALF)
def test_potential_field_extreme_forces(impl, gpu_dtypes, backward_path, dtype):
    """Points of different classes at distances 0.12-0.19 (inside delta: forces alpha d^-(alpha + 2) up to 1e6), rows
    of norm 0.1 (gradient weights W r r up to 1e6, beyond fp16's 65504, while the gradients and the loss fit it)."""
    g = torch.Generator().manual_seed(9)
    proxies = F.normalize(torch.randn(4, 16, generator=g), dim=1)
    proxy_labels = torch.arange(4)
    labels = torch.arange(12) % 4
    near = proxies[(labels + 1) % 4]  # each embedding next to a proxy of another class
    spread = torch.linspace(0.12, 0.19, 12)[:, None]
    x = F.normalize(near + spread * F.normalize(torch.randn(12, 16, generator=g), dim=1), dim=1)
    x, proxies = x * 0.1, proxies * 0.1
    kw = dict(alpha=4.0, delta=0.2)
    inputs = [x.requires_grad_(True), proxies.requires_grad_(True)]
    ours = _ours(lambda a, p: potential_field_loss(a, labels, p, proxy_labels, impl=impl, **kw), inputs, dtype)
    gold = _gold(lambda a, p: potential_field_loss_reference(a, labels, p, proxy_labels, **kw), inputs, dtype)
    peer = _peer(lambda a, p: potential_field_loss_reference(a, labels, p, proxy_labels, **kw), inputs, dtype)
    # the loss in the inputs' dtype: its own rounding (2**-8 relative in bf16) is the slack
    _check([ours[0].float()] + ours[1:], gold, peer, ["loss", "d_embeddings", "d_proxies"], slack=1e-6,
           rel_slack=1e-3)


# ----------------------------------------------------------------------------------------------------------
# Attention: saturated rows
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("reduce_heads", ["mean", None])
def test_attention_probs_saturated_rows(impl, gpu_dtypes, dtype, reduce_heads):
    """Rows whose scores put one key about 30 or more above the rest (probability 1, the others below 1e-13), one
    key about 18 below the maximum (1e-8: below fp16's smallest number), and a row split evenly between two keys;
    the requested columns hold the winners and the tiny ones."""
    g = torch.Generator().manual_seed(11)
    d, lk = 16, 40
    k = F.normalize(torch.randn(1, 2, lk, d, generator=g), dim=-1) * 4.0
    q = 0.05 * torch.randn(1, 4, 3, d, generator=g)
    scale = d ** -0.5
    for h in range(4):  # score = scale * q . k: 60 on key 7 (row 0), 18 apart on keys 3 / 9 (row 1), tie (row 2)
        kv = k[0, h // 2]
        q[0, h, 0] += kv[7] * 60.0 / (scale * 16.0)
        q[0, h, 1] += (kv[3] - kv[9]) * 9.0 / (scale * 16.0)
        q[0, h, 2] += (kv[20] + kv[21]) * 20.0 / (scale * 16.0)
    qpos = torch.tensor([[30, 35, 39]])
    kidx = torch.tensor([[7, 3, 9, 20, 21, 0, 38]])
    inputs = [q, k]
    ours = _ours(lambda a, b: attention_probs(a, b, kidx, query_positions=qpos, reduce_heads=reduce_heads,
                                              impl=impl), inputs, dtype)
    gold = _gold(lambda a, b: attention_probs_reference(a, b, kidx, qpos, reduce_heads=reduce_heads), inputs, dtype)
    peer = _peer(lambda a, b: attention_probs_reference(a, b, kidx, qpos, reduce_heads=reduce_heads), inputs, dtype)
    assert ours[0].dtype == torch.float32 and float(gold[0].max()) > 0.999
    _check(ours, gold, peer, ["probs"], slack=1e-6)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_attention_kl_saturated_rows(impl, dtype, reduction):
    """Student rows saturated (a logit 30 above the rest; logits of magnitude 1e4, fp16's range), near-certain
    teacher rows (mass 1 - 1e-6 on one entry), a masked row; the gradient under a 1024 upstream."""
    g = torch.Generator().manual_seed(12)
    z = torch.randn(4, 24, generator=g)
    z[0, 5] += 30.0
    z[1] = z[1] * 1e4
    z[2, 3] -= 30.0
    a = torch.rand(4, 24, generator=g) * 1e-7
    a[0, 5] = 1.0
    a[1, 17] = 1.0
    a[2, 3] = 1.0
    a[3, 0] = 1.0
    mask = torch.ones(4, 24, dtype=torch.bool)
    mask[3, 12:] = False
    inputs = [z.requires_grad_(True), a]
    ours = _ours(lambda l, t: attention_kl(l, t, mask=mask, reduction=reduction, impl=impl), inputs, dtype, 1024.0)
    gold = _gold(lambda l, t: attention_kl_reference(l, t, mask, reduction), inputs, dtype, 1024.0)
    peer = _peer(lambda l, t: attention_kl_reference(l, t, mask, reduction), inputs, dtype, 1024.0)
    _check(ours, gold, peer, ["kl", "d_logits"], slack=1e-6, rel_slack=1e-6)


# ----------------------------------------------------------------------------------------------------------
# The dtype rules themselves (what a GPU launch gets; the tests above run them)
# ----------------------------------------------------------------------------------------------------------
def test_gradient_weights_never_travel_in_fp16():
    """fp16 inputs: gradient tiles (dot operands of a fused backward, buffers cuBLAS consumes, logprob's dlogits
    chunk) are fp32 on a GPU; bf16 keeps bf16 (fp32's range); the CPU runs fp32."""
    from saga_kernels._triton import tl

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert tl_utils.grad_dot_config(torch.float16, cuda) == (tl.float32, "tf32")
    assert tl_utils.grad_dot_config(torch.bfloat16, cuda) == tl_utils.dot_config(torch.bfloat16, cuda)
    assert tl_utils.grad_dot_config(torch.float32, cuda) == tl_utils.dot_config(torch.float32, cuda)
    assert tl_utils.grad_buffer_dtype(torch.float16, cuda) == torch.float32
    assert tl_utils.grad_buffer_dtype(torch.bfloat16, cuda) == torch.bfloat16
    assert tl_utils.grad_buffer_dtype(torch.bfloat16, cpu) == torch.float32
    for fused_max_d in (supcon_mod.fused_max_d, ms_mod.fused_max_d):  # fp16's fused backward: fp32's limits
        assert fused_max_d(tl_utils.grad_dtype(torch.float16)) == fused_max_d(torch.float32)
