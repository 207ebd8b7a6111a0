"""One SAGA training step at Qwen3-VL-8B shapes (issue 8, item 3): saga kernels on vs the plain transformers path.

Model: a Qwen3-VL with RANDOM weights built from a config. "real" (GPU): the 8B shapes of METHOD.md, built
directly on the GPU in bf16, the trainable tower then cast to fp32 and run under bf16 autocast (as
saga_train.train runs it); "small" (CPU): a tiny config. Activation checkpointing on the LLM is on (on CUDA
through the trainer's ``apply_cuda_speedups``, which also applies Liger-Kernel's Qwen3-VL patches when installed).
Inputs are random: pixel values of 224 x 224 images ("real"), prompt ids around the two images' placeholder
tokens, G = 8 completions of 1,024 tokens ("real"; sampling, phase B, is not timed), rewards alternating 1 / 0,
item spans for the r = 1 rollouts. Each benchmark is one phase, forward + backward, gradients reset per call:
  A  the micro-batch (64 images "real") through tower + attention pooler, Potential Field loss (100 classes x 15)
  C  one group replayed: tower -> frozen LLM, lambda_lm L_GRPO + lambda_kl L_KL at the KL layer (26 "real")
Providers:
  saga   the trainer's code: saga_train.losses.replay_group (final hidden states -> saga_kernels.linear_grpo_loss;
         AttentionProbe maps -> saga_kernels.attention_kl; SDPA attention); saga_kernels.PotentialFieldLoss
  plain  the same wiring (saga_train.losses.replay_forward), but eager attention whose weights are kept for every
         layer, as output_attentions=True keeps them, and read at the KL layer; full logits from the LM head +
         log_softmax + gather; the KL and the Potential Field energy written out over materialized matrices
A provider that runs out of memory is recorded, not skipped: extra_info["oom"] holds the message, peak_bytes is
None and summarize.py prints OOM. extra_info["peak_bytes"]: peak extra memory of one call (benchmarks/_memory.py).
"""
import contextlib
import dataclasses
import gc
import importlib.util

import pytest
import torch
from _memory import peak_memory
from conftest import DEVICE, SIZE, record

from saga_train.config import PRESETS, Config
from saga_train.losses import build_metric_loss, replay_forward, replay_group, teacher_map
from saga_train.model import Embedder, freeze_language_model, resolve_kl_layer
from saga_train.pooler import build_pooler
from saga_train.prompts import ITEM_KEYS
from saga_train.rollout import Group, group_advantages
from saga_train.tiny import mrope_sections
from saga_train.train import apply_cuda_speedups, autocast

# The shapes: Qwen3-VL-8B-Instruct (METHOD.md) and a tiny CPU stand-in.
MODEL = {
    "real": dict(vocab=151936, hidden=4096, intermediate=12288, layers=36, heads=32, kv_heads=8, head_dim=128,
                 rope_theta=5_000_000.0, v_depth=27, v_hidden=1152, v_intermediate=4304, v_heads=16, patch=16,
                 v_positions=2304, deepstack=[8, 16, 24], special=dict(vision_start_token_id=151652, vision_end_token_id=151653,
                                                     image_token_id=151655, video_token_id=151656)),
    "small": dict(vocab=256, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16,
                  rope_theta=10_000.0, v_depth=2, v_hidden=32, v_intermediate=64, v_heads=2, patch=8,
                  v_positions=64, deepstack=[0], special=dict(vision_start_token_id=250, vision_end_token_id=251,
                                              image_token_id=252, video_token_id=253)),
}
# The step: the paper preset of saga_train.config; on a CPU, small enough for a few seconds per call.
STEP = {
    "real": dict(PRESETS["paper"], num_classes=100, prompt_before=16, prompt_after=200),
    "small": dict(PRESETS["paper"], image_size=64, classes_per_batch=4, images_per_class=4, group_size=4,
                  max_new_tokens=48, kl_layer=-1, embedding_size=64, proxies_per_class=3, num_classes=8,
                  prompt_before=4, prompt_after=12),
}
MERGE = 2  # Qwen3-VL's spatial merge: 2 x 2 patches -> one LLM token
TEMPORAL_PATCH = 2


def _config(size):
    from transformers import Qwen3VLConfig

    m = MODEL[size]
    text = dict(vocab_size=m["vocab"], hidden_size=m["hidden"], intermediate_size=m["intermediate"],
                num_hidden_layers=m["layers"], num_attention_heads=m["heads"], num_key_value_heads=m["kv_heads"],
                head_dim=m["head_dim"], max_position_embeddings=262144, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": m["rope_theta"],
                                 "mrope_section": mrope_sections(m["head_dim"]), "mrope_interleaved": True})
    vision = dict(depth=m["v_depth"], hidden_size=m["v_hidden"], intermediate_size=m["v_intermediate"],
                  num_heads=m["v_heads"], patch_size=m["patch"], spatial_merge_size=MERGE,
                  temporal_patch_size=TEMPORAL_PATCH, out_hidden_size=m["hidden"],
                  num_position_embeddings=m["v_positions"],
                  deepstack_visual_indexes=m["deepstack"])
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **m["special"])


def _build_model(size, cfg, device):
    """Random-weight Qwen3-VL wired as saga_train.train.resolve_model wires a checkpoint."""
    from transformers import Qwen3VLForConditionalGeneration

    bf16 = device.type == "cuda" and cfg.bf16
    torch.manual_seed(0)
    with torch.device(device):  # 16 GB of 8B weights are created (and initialized) on the GPU directly
        model = Qwen3VLForConditionalGeneration._from_config(
            _config(size), attn_implementation="sdpa", dtype=torch.bfloat16 if bf16 else torch.float32)
    if bf16:
        model.model.visual.float()  # trainable weights fp32, compute under bf16 autocast
    freeze_language_model(model)
    liger = "off (CPU)"
    if device.type == "cuda":
        liger = "applied" if importlib.util.find_spec("liger_kernel") else "not installed"
        try:
            apply_cuda_speedups(model, cfg)  # Liger patches (when installed) + activation checkpointing
        except Exception as exc:  # noqa: BLE001 -- reported in extra_info; the step is still measured without them
            liger = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
            apply_cuda_speedups(model, dataclasses.replace(cfg, liger=False))
    else:  # the trainer checkpoints only on CUDA; the benchmark's step does it everywhere
        model.model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, liger


def _pixels(n_images, size, generator, device):
    """Random patchified pixel values [n * grid^2, 3 * 2 * patch^2] and grid_thw [n, 3] of square images."""
    patch = MODEL[size]["patch"]
    grid = STEP[size]["image_size"] // patch
    values = torch.randn(n_images * grid * grid, 3 * TEMPORAL_PATCH * patch * patch, generator=generator)
    thw = torch.tensor([[1, grid, grid]] * n_images)
    return values.to(device), thw.to(device)


def _group(size, cfg, generator, device) -> Group:
    """One pair's G random completions in the shape phase B hands to phase C."""
    m, s = MODEL[size], STEP[size]
    sp = m["special"]
    pixel_values, thw = _pixels(2, size, generator, device)
    per_image = (s["image_size"] // m["patch"] // MERGE) ** 2
    text_ids = lambda n: torch.randint(0, sp["vision_start_token_id"] - 16, (n,), generator=generator)  # noqa: E731
    image = torch.tensor([sp["vision_start_token_id"]] + [sp["image_token_id"]] * per_image + [sp["vision_end_token_id"]])
    prompt = torch.cat([text_ids(s["prompt_before"]), image, image, text_ids(s["prompt_after"])])[None]
    g, t = cfg.group_size, cfg.max_new_tokens
    lengths = t - torch.arange(g) * (t // (4 * g))  # completions end at different steps
    steps = torch.arange(t)
    mask = steps[None] < lengths[:, None]
    rewards = (torch.arange(g) % 2 == 0).float()
    span = max(1, t // 8)
    item_masks = {item: (steps[None] >= start) & (steps[None] < start + span) & mask & (rewards[:, None] == 1)
                  for item, start in zip(ITEM_KEYS, (t // 16, t // 4))}
    inputs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt),
              "mm_token_type_ids": (prompt == sp["image_token_id"]).int(),
              "pixel_values": pixel_values, "image_grid_thw": thw}
    return Group(same=True, inputs={k: v.to(device) for k, v in inputs.items()},
                 completion_ids=text_ids(g * t).view(g, t).to(device), completion_mask=mask.to(device),
                 texts=[""] * g, verdicts=[True] * g, rewards=rewards, advantages=group_advantages(rewards),
                 item_token_masks={k: v.to(device) for k, v in item_masks.items()})


class Setup:
    """Everything one step needs, built once per module (the 8B model takes a while and ~19 GB)."""

    def __init__(self, size, device=DEVICE, bf16=True):
        s = STEP[size]
        self.cfg = Config(bf16=bf16, **{k: v for k, v in s.items() if k in Config.__dataclass_fields__})
        self.device = device
        self.model, self.liger = _build_model(size, self.cfg, device)
        hidden = self.model.config.text_config.hidden_size
        torch.manual_seed(1)
        self.pooler = build_pooler("attention", hidden, self.cfg.embedding_size).to(device)
        self.metric_loss = build_metric_loss("potential_field", s["num_classes"], self.cfg.embedding_size,
                                             self.cfg.proxies_per_class).to(device)
        self.embedder = Embedder(self.model.model.visual, self.pooler, None, self.cfg.image_size, "attention")
        self.kl_layer = resolve_kl_layer(self.cfg.kl_layer, self.model.config.text_config.num_hidden_layers)
        gen = torch.Generator().manual_seed(2)
        self.batch_pixels, self.batch_thw = _pixels(self.cfg.batch_size, size, gen, device)
        self.batch_labels = (torch.randperm(s["num_classes"], generator=gen)[: self.cfg.classes_per_batch]
                             .repeat_interleave(self.cfg.images_per_class).to(device))
        self.group = _group(size, self.cfg, gen, device)
        self.params = ([p for p in self.model.parameters() if p.requires_grad] + list(self.pooler.parameters())
                       + list(self.metric_loss.parameters()))

    def zero_grad(self):
        for p in self.params:
            p.grad = None


# ------------------------------------------------------------------------------------- the plain path
def _pf_plain(z, labels, proxies, proxy_labels, alpha, delta, min_distance=1e-2):
    """Potential Field energy (METHOD.md) over the materialized (N + P)^2 distance matrix."""
    a = torch.cat([torch.nn.functional.normalize(z, dim=1), torch.nn.functional.normalize(proxies.float(), dim=1)])
    cls = torch.cat([labels, proxy_labels])
    d = (2 - 2 * a @ a.T).clamp(min=min_distance**2).sqrt()
    same = cls[:, None] == cls[None, :]
    psi = torch.where(same, -d.clamp(min=delta).pow(-alpha), d.clamp(max=delta).pow(-alpha))
    psi = psi.masked_fill(torch.eye(a.shape[0], dtype=torch.bool, device=a.device), 0)
    return psi.sum() / (a.shape[0] * (a.shape[0] - 1))


class _AttentionRecorder:
    """Every text layer's attention weights ``weights[layer]`` ([B, H, L, L]) while ``recording``."""

    def __init__(self):
        self.weights, self.recording = {}, True

    def hook(self, layer):
        def keep(module, args, output):
            if self.recording:
                self.weights[layer] = output[1]
        return keep


@contextlib.contextmanager
def _eager_attention(model):
    """Text attention switched to eager, its weights recorded for every layer as ``output_attentions=True``
    keeps them. Keep the block open through the backward: checkpoint recomputation must see the same attention."""
    config = model.config.get_text_config(decoder=True)
    recorder = _AttentionRecorder()
    handles = [layer.self_attn.register_forward_hook(recorder.hook(i))
               for i, layer in enumerate(model.model.language_model.layers)]
    original, config._attn_implementation = config._attn_implementation, "eager"
    try:
        yield recorder
    finally:
        config._attn_implementation = original
        for h in handles:
            h.remove()


def _plain_replay(model, group, recorder, *, temperature, kl_layer, lambda_lm, lambda_kl, pooler, kl_weight):
    """``lambda_lm L_GRPO + lambda_kl kl_weight L_KL`` of one group (token_weight 1), the plain way.

    L_GRPO: ``-sum_t m A exp(lp - sg(lp)) / sum m`` with lp from full fp32 logits (dapo, ratio 1);
    L_KL: ``sum_rows sum_j t_j (log t_j - log_softmax(pooler logits)_j)``, t = teacher_map of the eager weights.
    """
    g, t = group.completion_ids.shape
    p = group.inputs["input_ids"].shape[1]
    image_pos = (group.inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(-1)
    keys = dict(zip(("a", "b"), image_pos.chunk(2)))
    hidden, (x_a, x_b), _ = replay_forward(model, group, None)
    recorder.recording = False
    attn = recorder.weights.pop(kl_layer)
    recorder.weights.clear()  # the other layers' maps are no longer needed
    steps = torch.arange(t, device=hidden.device)
    qpos = torch.where(group.completion_mask, p + steps, p)  # [G, T]: replay_forward's probe rows
    rows = attn[torch.arange(g, device=attn.device)[:, None], :, qpos].float().mean(2)  # [G, T, L]
    maps = {name: rows[..., cols].detach() for name, cols in keys.items()}
    del attn, rows
    logits = model.lm_head(hidden).float() / temperature  # [G, T, V]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, group.completion_ids.unsqueeze(-1)).squeeze(-1)
    keep = group.completion_mask
    ratio = torch.exp(logp - logp.detach())
    grpo = -(ratio * group.advantages.to(logp.device)[:, None])[keep].sum() / keep.sum()
    kl_rows = group.rewards.to(keep.device) == 1
    kl = torch.zeros((), device=logp.device)
    for name, item, x in (("a", ITEM_KEYS[0], x_a), ("b", ITEM_KEYS[1], x_b)):
        tokens = group.item_token_masks[item] & keep
        sel = kl_rows & tokens.any(-1)
        if lambda_kl > 0 and sel.any():
            target = teacher_map(maps[name][sel], tokens[sel])
            target = target / target.sum(-1, keepdim=True)
            log_q = torch.log_softmax(pooler.logits(x.detach()[None]).expand(target.shape[0], -1), dim=-1)
            kl = kl + torch.where(target > 0, target * (target.clamp_min(1e-30).log() - log_q), 0.0).sum()
    return lambda_lm * grpo + lambda_kl * kl_weight * kl


# ------------------------------------------------------------------------------------- the two phases
def _step_fn(setup, phase, provider):
    """A closure running one phase forward + backward; returns the detached loss."""
    cfg, model, group, device = setup.cfg, setup.model, setup.group, setup.device
    kl_count = int(((group.rewards.to(device) == 1)
                    & torch.stack([m.any(-1) for m in group.item_token_masks.values()]).any(0)).sum())
    common = dict(temperature=cfg.temperature, kl_layer=setup.kl_layer, lambda_lm=cfg.lambda_lm,
                  lambda_kl=cfg.lambda_kl, pooler=setup.pooler, kl_weight=1.0 / kl_count)
    loss_mod = setup.metric_loss

    def phase_a():
        with autocast(device, cfg):
            z, _, _ = setup.embedder(setup.batch_pixels, setup.batch_thw)
        if provider == "saga":
            loss = loss_mod(z.float(), setup.batch_labels)
        else:
            loss = _pf_plain(z.float(), setup.batch_labels, loss_mod.proxies, loss_mod.proxy_labels,
                             loss_mod.alpha, loss_mod.delta)
        (cfg.lambda_dml * loss).backward()
        return loss.detach()

    def phase_c():
        model.train()
        if provider == "saga":
            with autocast(device, cfg):
                loss = replay_group(model, group, token_weight=1.0, **common).loss
            loss.backward()
        else:
            with _eager_attention(model) as recorder:
                with autocast(device, cfg):
                    loss = _plain_replay(model, group, recorder, **common)
                loss.backward()
        return loss.detach()

    run = phase_a if phase == "A" else phase_c

    def step():
        setup.zero_grad()
        loss = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss

    return step


def _oom_errors():
    return (torch.cuda.OutOfMemoryError, MemoryError) if DEVICE.type == "cuda" else (MemoryError,)


def _free(setup):
    setup.zero_grad()
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def setup():
    s = Setup(SIZE)
    yield s
    del s
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


@pytest.mark.parametrize("phase", ["A", "C"])
@pytest.mark.parametrize("provider", ["saga", "plain"])
def test_step_phase(benchmark, setup, provider, phase):
    cfg, m = setup.cfg, MODEL[SIZE]
    info = dict(provider=provider, phase=phase, size=SIZE, G=cfg.group_size, T=cfg.max_new_tokens,
                P=setup.group.inputs["input_ids"].shape[1], image_size=cfg.image_size,
                batch_images=cfg.batch_size, hidden=m["hidden"], layers=m["layers"], vocab=m["vocab"],
                kl_layer=setup.kl_layer, grad_checkpointing=True, liger=setup.liger,
                model_dtype=str(next(setup.model.model.language_model.parameters()).dtype))
    step = _step_fn(setup, phase, provider)
    oom = None
    _free(setup)
    try:
        loss = step()  # warm-up (kernel compilation, allocator)
        tower_reached = any(p.grad is not None and bool(p.grad.abs().sum() > 0)
                            for p in setup.model.model.visual.parameters())
        peak, how = peak_memory(step, DEVICE)
    except _oom_errors() as exc:
        oom = str(exc).splitlines()[0][:200]
    if oom is not None:  # handled outside the except block, whose traceback would keep the step's tensors alive
        _free(setup)
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)
        record(benchmark, oom=oom, peak_bytes=None, peak_method=None, **info)
        return
    # e.g. a transformers that ignores how replay_forward hands over the image features: the LLM then never
    # sees the tower, and the time would be that of a different (and wrong) step
    assert tower_reached, f"phase {phase} ({provider}): no gradient reached the vision tower"
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=0)
    _free(setup)
    record(benchmark, oom=None, peak_bytes=peak, peak_method=how, loss=float(loss), **info)


def test_providers_agree():
    """saga and plain compute the same losses and gradients (tiny model, fp32): tower, pooler and proxies."""
    s = Setup("small", bf16=False)
    tower = {id(p) for p in s.model.model.visual.parameters()}
    pooler = {id(p) for p in s.pooler.parameters()}
    for phase in ("A", "C"):
        results = {}
        for provider in ("saga", "plain"):
            loss = _step_fn(s, phase, provider)()
            results[provider] = (loss, [None if p.grad is None else p.grad.clone() for p in s.params])
        (loss_s, grads_s), (loss_p, grads_p) = results["saga"], results["plain"]
        torch.testing.assert_close(loss_s, loss_p, rtol=1e-4, atol=1e-6)
        for p, gs, gp in zip(s.params, grads_s, grads_p):
            assert (gs is None) == (gp is None)
            if gs is not None:  # fp32 summation-order noise, relative to the tensor's largest entry
                assert (gs - gp).abs().max() <= 1e-4 * gs.abs().max(), (phase, tuple(p.shape))
        reached = {kind for p, g in zip(s.params, grads_s) if g is not None and g.abs().sum() > 0
                   for kind, ids in (("tower", tower), ("pooler", pooler)) if id(p) in ids}
        assert reached == {"tower", "pooler"}, (phase, reached)  # C: GRPO -> tower, KL -> pooler only
