"""Fused linear -> token log-probs -> GRPO loss, forward + backward, frozen and trainable LM head.

Every provider computes the same thing: per-token log-probs of the targets under
softmax(hidden @ W.T), then the (negligible) dapo GRPO loss with no old log-probs, then backward.
  saga            saga_kernels.linear_grpo_loss (Triton on CUDA; the chunked torch fallback on a CPU): a
                  frozen head takes the Jacobian path (4NHV), a trained one the recompute path (8NHV)
  saga_recompute  the recompute path (6NHV frozen: the design before the Jacobian path), asked for through a
                  differentiable entropy the loss does not use, measured side by side
  torch           eager: materialized logits + log_softmax + gather, then saga_kernels.grpo_loss
  liger           liger_kernel's LigerFusedLinearGRPOLoss (beta = 0, no reference model)
  cce             cut-cross-entropy: -linear_cross_entropy(e, c, targets, reduction="none") (CUDA only)
extra_info: peak extra memory of one call, the matmul flop floor (4 N H V frozen: the forward forms the
Jacobian; 8 N H V trainable), the flops the provider's algorithm does, and the throughput of the median
time against the floor.

``test_trl_call_pattern``: TRL's fused head (trl.kernels.ChunkedLogProbFunction, as ``add_fused_lm_head`` calls it:
prompt rows compacted out on CUDA, every row scored elsewhere) against saga's, in TRL's GRPO call pattern: B
sequences of prompt + completion tokens with the prompt labels -100, log-probs and entropy asked for, the entropy
read (metrics, entropy mask) or differentiated (entropy bonus), the head frozen or trained. extra_info adds, on a
CPU, the matmul flops of one call counted at dispatch, per N_live H V (on CUDA saga's products run inside Triton
kernels, which a dispatch mode does not see: no count there).
"""
import pytest
import torch

from saga_kernels import grpo_loss, linear_grpo_loss, linear_logprobs
from saga_kernels._dispatch import resolve_impl

from _memory import peak_memory
from conftest import DEVICE, SIZE, measure, record, synchronized
from utils import MatmulFlops

SHAPES = {  # (sequences B, tokens per sequence T, H, V, dtype)
    "real": (8, 1024, 4096, 151936, torch.bfloat16),
    "small": (4, 128, 128, 8191, torch.float32),
}
PROVIDERS = ["saga", "saga_recompute", "torch", "liger", "cce"]
# matmul flops per N H V of each provider's algorithm (frozen head, trained head)
FLOPS_DONE = {"saga": (4, 8), "saga_recompute": (6, 8), "torch": (6, 8), "liger": (6, 8), "cce": (6, 8)}


def _inputs(b, t, h, v, dtype, trainable, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    hidden = torch.randn(b, t, h, device=DEVICE, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h, device=DEVICE, generator=g) * h ** -0.5).to(dtype).requires_grad_(trainable)
    ids = torch.randint(0, v, (b, t), device=DEVICE, generator=g)
    mask = torch.ones(b, t, device=DEVICE, dtype=torch.long)
    adv = torch.randn(b, device=DEVICE, generator=g)
    return hidden, weight, ids, mask, adv


def _eager_logprobs(hidden, weight, ids):
    logits = (hidden @ weight.t()).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def _step_fn(provider, hidden, weight, ids, mask, adv):
    """A closure running forward + backward once (grads are reset so memory stays flat)."""
    if provider == "saga":
        def loss_fn():
            return linear_grpo_loss(hidden, weight, ids, mask, adv)[0]
    elif provider == "saga_recompute":  # path 3, asked for through a differentiable entropy the loss does not use
        def loss_fn():
            logp = linear_logprobs(hidden, weight, ids, return_entropy=True)[0]
            return grpo_loss(logp, mask, adv)[0]
    elif provider == "torch":
        def loss_fn():
            return grpo_loss(_eager_logprobs(hidden, weight, ids), mask, adv)[0]
    elif provider == "liger":
        liger = pytest.importorskip("liger_kernel.chunked_loss")
        module = liger.LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo",
                                                compiled=DEVICE.type == "cuda")

        def loss_fn():
            return module(hidden, weight, ids, mask, adv)[0]
    else:
        if DEVICE.type != "cuda":
            pytest.skip("cut-cross-entropy's kernel needs CUDA")
        cce = pytest.importorskip("cut_cross_entropy")

        def loss_fn():
            logp = -cce.linear_cross_entropy(hidden, weight, ids, reduction="none")
            return grpo_loss(logp, mask, adv)[0]

    def step():
        hidden.grad = None
        weight.grad = None
        loss_fn().backward()

    return synchronized(step)


@pytest.mark.parametrize("head", ["frozen", "trainable"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_logprob_fwd_bwd(benchmark, provider, head):
    b, t, h, v, dtype = SHAPES[SIZE]
    hidden, weight, ids, mask, adv = _inputs(b, t, h, v, dtype, head == "trainable")
    step = _step_fn(provider, hidden, weight, ids, mask, adv)
    n = b * t
    trained = head == "trainable"
    floor = (8 if trained else 4) * n * h * v
    if measure(benchmark, step, rounds=5 if SIZE == "small" else 10, warmup_rounds=1, provider=provider, head=head,
               N=n, H=h, V=v, dtype=str(dtype), flop_floor=floor, flops_done=FLOPS_DONE[provider][trained] * n * h * v,
               saga_impl=resolve_impl(None, hidden) if provider.startswith("saga") else None) is not None:
        benchmark.extra_info["tflops"] = floor / benchmark.stats.stats.median / 1e12


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU checks of issues 2 and 12 (torch fallback)")
def test_cpu_jacobian_vs_recompute_and_memory(benchmark):
    """N = 2048, H = 256, V = 151936, fp32, frozen head, torch fallback: fwd + bwd of the Jacobian path
    (4NHV) against the recompute path (6NHV, the design before it), interleaved over 3 rounds (min of
    each); the Jacobian path must be >= 25% faster, and its peak memory < 1/4 of eager's."""
    import time

    hidden, weight, ids, mask, adv = _inputs(1, 2048, 256, 151936, torch.float32, trainable=False)
    eager_peak, how = peak_memory(_step_fn("torch", hidden, weight, ids, mask, adv), DEVICE)
    steps = {p: _step_fn(p, hidden, weight, ids, mask, adv) for p in ("saga", "saga_recompute")}
    saga_peak, _ = peak_memory(steps["saga"], DEVICE)
    times = {p: [] for p in steps}
    for _ in range(3):
        for p, step in steps.items():
            start = time.perf_counter()
            step()
            times[p].append(time.perf_counter() - start)
    benchmark.pedantic(steps["saga"], rounds=1, iterations=1)
    ratio = min(times["saga"]) / min(times["saga_recompute"])
    record(benchmark, provider="saga", head="frozen", N=2048, H=256, V=151936, dtype="float32",
           peak_bytes=saga_peak, eager_peak_bytes=eager_peak, peak_method=how, saga_impl=resolve_impl(None, hidden),
           jacobian_s=times["saga"], recompute_s=times["saga_recompute"], time_ratio=ratio)
    print(f"\nCPU check: Jacobian path {min(times['saga']):.2f} s vs recompute path "
          f"{min(times['saga_recompute']):.2f} s (ratio {ratio:.2f}); peak {saga_peak / 2**20:.0f} MiB vs eager "
          f"{eager_peak / 2**20:.0f} MiB ({saga_peak / eager_peak:.3f})")
    assert ratio <= 0.75
    assert saga_peak < eager_peak / 4


TRL_SHAPES = {  # (sequences B, prompt tokens, completion tokens, H, V, dtype): N_live = 8192 at real size
    "real": (8, 256, 1024, 4096, 151936, torch.bfloat16),
    "small": (4, 32, 96, 128, 8191, torch.float32),
}


def _trl_inputs(b, prompt, completion, h, v, dtype, trained, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    hidden = torch.randn(b, prompt + completion, h, device=DEVICE, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h, device=DEVICE, generator=g) * h ** -0.5).to(dtype).requires_grad_(trained)
    labels = torch.randint(0, v, (b, prompt + completion), device=DEVICE, generator=g)
    labels[:, :prompt] = -100
    return hidden, weight, labels


def _trl_head_step(provider, hidden, weight, labels, entropy):
    """One forward + backward of TRL's policy-loss shape: -mean log-prob over the completion tokens, minus an entropy
    bonus when ``entropy == "differentiated"``; ``"read"`` computes the entropy without back-propagating it."""
    mask = labels != -100
    n_live = mask.sum()
    bonus = entropy == "differentiated"
    if provider == "saga":
        def heads():
            return linear_logprobs(hidden, weight, labels, return_entropy=True if bonus else "detached")
    else:
        chunked = pytest.importorskip("trl.kernels.chunked_logprob")
        compact = chunked._use_triton(hidden.device)  # exactly what add_fused_lm_head decides

        def heads():
            h = hidden[mask] if compact else hidden.reshape(-1, hidden.shape[-1])
            y = labels[mask] if compact else labels.clamp(min=0).reshape(-1)
            lp, ent, *_ = chunked.ChunkedLogProbFunction.apply(h, weight, None, y, 1.0, 32768, None, 1.0,
                                                               ("log_probs", "entropy"))
            if compact:
                return (x.new_zeros(mask.shape).masked_scatter(mask, x) for x in (lp, ent))
            return (x.view(mask.shape).masked_fill(~mask, 0) for x in (lp, ent))

    def step():
        hidden.grad = None
        weight.grad = None
        lp, ent = heads()
        loss = -lp.sum() / n_live
        if bonus:
            loss = loss - 0.01 * ent.sum() / n_live
        loss.backward()

    return synchronized(step)


@pytest.mark.parametrize("entropy", ["read", "differentiated"])
@pytest.mark.parametrize("head", ["frozen", "trained"])
@pytest.mark.parametrize("provider", ["saga", "trl"])
def test_trl_call_pattern(benchmark, provider, head, entropy):
    b, prompt, completion, h, v, dtype = TRL_SHAPES[SIZE]
    hidden, weight, labels = _trl_inputs(b, prompt, completion, h, v, dtype, head == "trained")
    step = _trl_head_step(provider, hidden, weight, labels, entropy)
    step()  # warm-up, then one call counted
    with MatmulFlops() as counter:  # the step is the head alone: every product counts
        step()
    n_live = b * completion
    trained = head == "trained"
    floor = (8 if trained else 4) * n_live * h * v
    if measure(benchmark, step, rounds=5 if SIZE == "small" else 10, warmup_rounds=1, provider=provider, head=head,
               entropy=entropy, N_live=n_live, N_all=b * (prompt + completion), H=h, V=v, dtype=str(dtype),
               flop_floor=floor, flops_counted=counter.flops if DEVICE.type == "cpu" else None,
               flops_per_NliveHV=counter.flops / (n_live * h * v) if DEVICE.type == "cpu" else None,
               saga_impl=resolve_impl(None, hidden) if provider == "saga" else None) is not None:
        benchmark.extra_info["tflops"] = floor / benchmark.stats.stats.median / 1e12
