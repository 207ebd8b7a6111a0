"""torch.compile(fullgraph=True) over linear_logprobs, linear_grpo_loss and grpo_loss: one graph (no break), the
same values and gradients as eager. The kernels are torch.library ops (fake + autograd implementations), the
value checks are off while tracing, so nothing data-dependent reaches the tracer. The compiled graph calls the
same ops as eager on the same inputs, so the values and gradients are compared bitwise; inductor's own C++ for the
torch path by the tolerance rule (tests/utils.py) against the float64 reference."""
import pytest
import torch

from saga_kernels import grpo_loss, linear_grpo_loss, linear_logprobs
from saga_kernels.reference import linear_logprobs_reference

from utils import assert_rule

N, H, V = 37, 24, 301


def _inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::5] = -100
    return hidden, weight, bias, targets


def _grads(fn, hidden, weight, bias, targets, train_head, **kw):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(train_head)
    b = bias.clone().requires_grad_(train_head)
    out = fn(h, w, targets, b, **kw)
    lp, ent = out if isinstance(out, tuple) else (out, None)
    obj = (lp * torch.linspace(-1, 1, N)).sum() + (ent.sum() if ent is not None and ent.requires_grad else 0)
    obj.backward()
    return [lp.detach()] + ([ent.detach()] if ent is not None else []) + [h.grad] + (
        [w.grad, b.grad] if train_head else [])


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("train_head,entropy,scale,cap", [
    (False, False, 1.0, None),  # path 2 (Jacobian)
    (False, "detached", 0.5, None),  # path 2 with the entropy read
    (False, True, 1.0, 3.0),  # path 3: differentiated entropy, softcap
    (True, False, 1.3, None),  # path 3: trained head
])
def test_linear_logprobs_compiles_fullgraph(impl, backend, train_head, entropy, scale, cap):
    if backend == "inductor" and (impl == "triton" or train_head or entropy):
        pytest.skip("inductor (C++ codegen, slow on 2 cores) once per path family is enough")
    torch._dynamo.reset()
    hidden, weight, bias, targets = _inputs()

    def fn(h, w, t, b):
        return linear_logprobs(h, w, t, bias=b, temperature=0.8, return_entropy=entropy, logit_scale=scale,
                               softcap=cap, impl=impl)

    eager = _grads(fn, hidden, weight, bias, targets, train_head)
    compiled = _grads(torch.compile(fn, fullgraph=True, backend=backend), hidden, weight, bias, targets, train_head)
    if backend == "aot_eager":  # the graph calls the same ops as eager: bitwise
        for got, want in zip(compiled, eager):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        return
    # inductor writes its own C++ for the torch path, vectorized for the CPU it finds (AVX512 under
    # ATEN_CPU_CAPABILITY=avx2 too), so its sums run in another order than ATen's: the tolerance rule
    gold = _grads(lambda h, w, t, b: linear_logprobs_reference(h, w, t, bias=b, temperature=0.8, logit_scale=scale,
                                                               softcap=cap),
                  hidden.double(), weight.double(), bias.double(), targets, train_head)
    for k, (got, want, g) in enumerate(zip(compiled, eager, gold)):
        assert_rule(got, g, want, rel_slack=1e-6, what=f"output {k}")


def test_no_grad_forward_compiles(impl):
    torch._dynamo.reset()
    hidden, weight, bias, targets = _inputs(seed=1)
    fn = torch.compile(lambda h, w, t: linear_logprobs(h, w, t, return_entropy=True, impl=impl), fullgraph=True,
                       backend="aot_eager")
    with torch.no_grad():
        got = fn(hidden, weight, targets)
        want = linear_logprobs(hidden, weight, targets, return_entropy=True, impl=impl)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_grpo_losses_compile_fullgraph(impl):
    """linear_grpo_loss with old / ref log-probs, beta, TRL's bias-corrected KL, per-token advantages and
    weights; grpo_loss alone on the same log-probs."""
    torch._dynamo.reset()
    b, t = 3, 9
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(b, t, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.3
    ids = torch.randint(0, V, (b, t), generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.3).long()
    adv = torch.randn(b, t, generator=g)
    weights = torch.rand(b, t, generator=g) + 0.5
    old = -torch.rand(b, t, generator=g) * 3
    ref = old + 0.1 * torch.randn(b, t, generator=g)

    def fused(h, w):
        return linear_grpo_loss(h, w, ids, mask, adv, old_logprobs=old, ref_logprobs=ref, beta=0.04,
                                use_bias_correction_kl=True, token_weights=weights, loss_type="grpo", impl=impl)

    def plain(lp):
        return grpo_loss(lp, mask, adv, old_logprobs=old, ref_logprobs=ref, beta=0.04, use_bias_correction_kl=True,
                         token_weights=weights, loss_type="dapo", num_items_in_batch=torch.tensor(20.0))

    results = []
    for fn_fused, fn_plain in ((fused, plain), (torch.compile(fused, fullgraph=True, backend="aot_eager"),
                                                torch.compile(plain, fullgraph=True, backend="aot_eager"))):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss, stats = fn_fused(h, w)
        loss.backward()
        lp = old.clone().requires_grad_(True)
        loss2, _ = fn_plain(lp)
        loss2.backward()
        results.append([loss.detach(), h.grad, w.grad, stats["kl"], loss2.detach(), lp.grad])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_weight_context_is_refused_under_compile():
    torch._dynamo.reset()
    hidden, weight, _, targets = _inputs()
    fn = torch.compile(lambda h: linear_logprobs(h, weight, targets, weight_context=lambda: None, impl="torch"),
                       fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="weight_context is not supported under torch.compile"):
        fn(hidden.requires_grad_(True))


def test_dynamic_shapes_compile(impl):
    """``dynamic=True`` turns the Python numbers into symbols: the scalar checks stand aside while tracing, and one
    graph serves two batch sizes."""
    torch._dynamo.reset()
    hidden, weight, bias, targets = _inputs(seed=3)

    def fn(h, w, t):
        lp = linear_logprobs(h, w, t, temperature=0.7, logit_scale=0.9, softcap=4.0, impl=impl)
        loss, _ = grpo_loss(lp[None], (t != -100)[None].long(), torch.ones(1), beta=0.0)
        return loss

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (N, N - 6):
        h1, h2 = hidden[:n].clone().requires_grad_(True), hidden[:n].clone().requires_grad_(True)
        want = fn(h1, weight, targets[:n])
        want.backward()
        got = compiled(h2, weight, targets[:n])
        got.backward()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(h2.grad, h1.grad, rtol=0, atol=0)
