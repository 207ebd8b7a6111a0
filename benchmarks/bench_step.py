"""One SAGA training step, phase by phase: the trainer's path against the plain one (pytest-benchmark).

``pytest benchmarks/bench_step.py --benchmark-only`` (issues 8 and 13): a Qwen3-VL with RANDOM weights built from
a config. "real" (GPU): the 8B shapes of METHOD.md, built directly on the GPU in bf16, the trainable tower then
cast to fp32 and run under bf16 autocast (as the trainer runs it); "small" (CPU): a tiny config. Activation
checkpointing on the LLM is on (on CUDA through the trainer's ``apply_cuda_speedups``, which also applies
Liger-Kernel's Qwen3-VL patches when installed). Inputs are random: pixel values of 224 x 224 images ("real"),
prompt ids around the two images' placeholder tokens, G = 8 completions of 1,024 tokens ("real"), rewards
alternating 1 / 0, item spans for the r = 1 rollouts. Each benchmark is one phase, gradients reset per call:
  A  the micro-batch (64 images "real") through tower + attention pooler, Potential Field loss (100 classes x 15)
  C  one group replayed with gradients: lambda_lm L_GRPO + lambda_kl L_KL at the KL layer (26 "real")
  B  sampling P pairs x G completions (no gradients; "real": 8 x 8, 64 new tokens so the GPU stage stays short)
Providers:
  A  saga       the trainer's phase A (saga_kernels.PotentialFieldLoss)
     plain      the Potential Field energy written out over the materialized distance matrix
  C  saga       saga_train.replay.replay_group: the prefix (images + prompt) forwarded ONCE, the G completions on
                its key/value cache; saga_kernels.linear_grpo_loss on the final hidden states, AttentionProbe +
                saga_kernels.attention_kl
     full       saga_train.reference.full_replay, the path replay.py replaced and its test oracle: the G full
                sequences (prompt + completion) through the model, eager attention, full logits
  B  saga       saga_train.rollout.sample_groups: all P pairs in ONE generate call (P x G sequences)
     per_pair   the same sampling with one generate call per pair (G sequences each), as phase B did before
A provider that runs out of memory is recorded, not skipped (``conftest.measure``). C records the tokens it
forwarded through the LLM, B the sequences per generate call. The trainer's own setup, old and new paths side by
side on the CPU: ``benchmarks/step_side_by_side.py``.
"""
import dataclasses
import gc
import importlib.util

import pytest
import torch

from saga_train import replay, rollout
from saga_train.components import apply_cuda_speedups, autocast
from saga_train.config import PRESETS, Config
from saga_train.losses import build_metric_loss
from saga_train.model import Embedder, freeze_language_model, resolve_kl_layer
from saga_train.pooler import build_pooler
from saga_train.prompts import ITEM_KEYS
from saga_train.reference import full_replay

from conftest import DEVICE, SIZE, measure

# The shapes: Qwen3-VL-8B-Instruct (METHOD.md) and a tiny CPU stand-in.
MODEL = {
    "real": dict(vocab=151936, hidden=4096, intermediate=12288, layers=36, heads=32, kv_heads=8, head_dim=128,
                 rope_theta=5_000_000.0, v_depth=27, v_hidden=1152, v_intermediate=4304, v_heads=16, patch=16,
                 v_positions=2304, deepstack=[8, 16, 24], eos=151645, pad=151643,
                 special=dict(vision_start_token_id=151652, vision_end_token_id=151653, image_token_id=151655,
                              video_token_id=151656)),
    "small": dict(vocab=256, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16,
                  rope_theta=10_000.0, v_depth=2, v_hidden=32, v_intermediate=64, v_heads=2, patch=8,
                  v_positions=64, deepstack=[0], eos=254, pad=255,
                  special=dict(vision_start_token_id=250, vision_end_token_id=251, image_token_id=252,
                               video_token_id=253)),
}
# The step: the paper preset of saga_train.config; on a CPU, small enough for a few seconds per call.
STEP = {
    "real": dict(PRESETS["paper"], num_classes=100, prompt_before=16, prompt_after=200, sample_tokens=64),
    "small": dict(PRESETS["paper"], image_size=64, classes_per_batch=4, images_per_class=4, group_size=4,
                  pairs_per_step=4, max_new_tokens=48, kl_layer=-1, embedding_size=64, proxies_per_class=3,
                  num_classes=8, prompt_before=4, prompt_after=12, sample_tokens=48),
}
MERGE = 2  # Qwen3-VL's spatial merge: 2 x 2 patches -> one LLM token
TEMPORAL_PATCH = 2


def _config(size):
    from transformers import Qwen3VLConfig

    from saga_train.synthetic.tiny import mrope_sections

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


def _pair_inputs(size, generator, device) -> dict:
    """One pair's prompt (random text ids around the two images' placeholders) as the processor would give it."""
    m, s = MODEL[size], STEP[size]
    sp = m["special"]
    pixel_values, thw = _pixels(2, size, generator, device)
    per_image = (s["image_size"] // m["patch"] // MERGE) ** 2
    image = torch.tensor([sp["vision_start_token_id"]] + [sp["image_token_id"]] * per_image
                         + [sp["vision_end_token_id"]])
    prompt = torch.cat([_text_ids(size, s["prompt_before"], generator), image, image,
                        _text_ids(size, s["prompt_after"], generator)])[None]
    inputs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt),
              "mm_token_type_ids": (prompt == sp["image_token_id"]).int(), "pixel_values": pixel_values,
              "image_grid_thw": thw}
    return {k: v.to(device) for k, v in inputs.items()}


def _text_ids(size, n, generator):
    return torch.randint(0, MODEL[size]["special"]["vision_start_token_id"] - 16, (n,), generator=generator)


def _group(size, cfg, generator, device) -> rollout.Group:
    """One pair's G random completions in the shape phase B hands to phase C."""
    inputs = _pair_inputs(size, generator, device)
    g, t = cfg.group_size, cfg.max_new_tokens
    lengths = t - torch.arange(g) * (t // (4 * g))  # completions end at different steps
    steps = torch.arange(t)
    mask = steps[None] < lengths[:, None]
    rewards = (torch.arange(g) % 2 == 0).float()
    span = max(1, t // 8)
    item_masks = {item: (steps[None] >= start) & (steps[None] < start + span) & mask & (rewards[:, None] == 1)
                  for item, start in zip(ITEM_KEYS, (t // 16, t // 4))}
    ids = _text_ids(size, g * t, generator).view(g, t).to(device)
    return rollout.Group(same=True, inputs=inputs, completion_ids=ids, completion_mask=mask.to(device),
                         texts=[""] * g, verdicts=[True] * g, rewards=rewards,
                         advantages=rollout.group_advantages(rewards), temperature=cfg.temperature,
                         item_token_masks={k: v.to(device) for k, v in item_masks.items()})


class _Tokenizer:
    """What rollout.sample_groups needs of a tokenizer, for a random-weight model without a vocabulary."""

    def __init__(self, size):
        self.eos_token_id, self.pad_token_id, self.unk_token_id = MODEL[size]["eos"], MODEL[size]["pad"], -1

    def convert_tokens_to_ids(self, token):
        return self.unk_token_id

    def decode(self, ids, skip_special_tokens=True):
        return ""


class Setup:
    """Everything one step needs, built once per module (the 8B model takes a while and ~19 GB)."""

    def __init__(self, size, device=None, bf16=True):
        device = device or DEVICE
        s = STEP[size]
        self.size = size
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
        self.pairs = [_pair_inputs(size, gen, device) for _ in range(self.cfg.pairs_per_step)]
        self.params = ([p for p in self.model.parameters() if p.requires_grad] + list(self.pooler.parameters())
                       + list(self.metric_loss.parameters()))

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def _pf_plain(z, labels, proxies, proxy_labels, alpha, delta, min_distance=1e-2):
    """Potential Field energy (METHOD.md) over the materialized (N + P)^2 distance matrix."""
    a = torch.cat([torch.nn.functional.normalize(z, dim=1), torch.nn.functional.normalize(proxies.float(), dim=1)])
    cls = torch.cat([labels, proxy_labels])
    d = (2 - 2 * a @ a.T).clamp(min=min_distance**2).sqrt()
    same = cls[:, None] == cls[None, :]
    psi = torch.where(same, -d.clamp(min=delta).pow(-alpha), d.clamp(max=delta).pow(-alpha))
    psi = psi.masked_fill(torch.eye(a.shape[0], dtype=torch.bool, device=a.device), 0)
    return psi.sum() / (a.shape[0] * (a.shape[0] - 1))


# ------------------------------------------------------------------------------------- pytest: the phases
def _step_fn(setup, phase, provider):
    """A closure running one phase (forward + backward for A and C); returns the detached loss (None for B)."""
    cfg, model, group, device = setup.cfg, setup.model, setup.group, setup.device
    counts = replay.local_counts([group])
    options = replay.ReplayOptions(lambda_lm=cfg.lambda_lm, lambda_kl=cfg.lambda_kl, kl_layer=setup.kl_layer,
                                   replay_tokens=cfg.replay_tokens)
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

    facts = {}  # what a phase reports besides its loss (C: tokens forwarded through the LLM)

    def phase_c():
        model.train()
        if provider == "full":
            with autocast(device, cfg):
                loss, _, _ = full_replay(model, [group], setup.pooler, counts, kl_layer=setup.kl_layer,
                                         lambda_lm=cfg.lambda_lm, lambda_kl=cfg.lambda_kl)  # back-propagated
            facts["tokens_forwarded"] = group.completion_ids.numel() + group.inputs["input_ids"].numel() * len(
                group.completion_ids)
            return loss.detach()
        with autocast(device, cfg):
            r = replay.replay_group(model, group, options, counts, setup.pooler)
        facts["tokens_forwarded"] = r.tokens
        return torch.tensor(cfg.lambda_lm * r.grpo + cfg.lambda_kl * r.kl)

    sampling = rollout.SamplingOptions(group_size=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p,
                                       max_new_tokens=STEP[setup.size]["sample_tokens"], verdict_key="same")
    tokenizer = _Tokenizer(setup.size)

    def phase_b():
        model.eval()
        with autocast(device, cfg):
            if provider == "saga":
                rollout.sample_groups(model, tokenizer, setup.pairs, [True] * len(setup.pairs), sampling)
            else:
                for pair in setup.pairs:
                    rollout.sample_groups(model, tokenizer, [pair], [True], sampling)
        return None

    run = {"A": phase_a, "B": phase_b, "C": phase_c}[phase]

    def step():
        setup.zero_grad()
        torch.manual_seed(0)
        loss = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss

    step.facts = facts
    return step


def _free(setup):
    setup.zero_grad()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def setup():
    s = Setup(SIZE)
    yield s
    del s
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _bench(benchmark, setup, provider, phase, **extra):
    cfg, m = setup.cfg, MODEL[setup.size]
    info = dict(provider=provider, phase=phase, size=setup.size, G=cfg.group_size, T=cfg.max_new_tokens,
                P=setup.group.inputs["input_ids"].shape[1], image_size=cfg.image_size,
                batch_images=cfg.batch_size, hidden=m["hidden"], layers=m["layers"], vocab=m["vocab"],
                kl_layer=setup.kl_layer, grad_checkpointing=True, liger=setup.liger,
                model_dtype=str(next(setup.model.model.language_model.parameters()).dtype), **extra)
    step = _step_fn(setup, phase, provider)

    def tower_reached():  # e.g. a transformers that ignores how the replay hands over the image features: the LLM
        # then never sees the tower, and the time would be that of a different (and wrong) step
        return phase == "B" or any(p.grad is not None and bool(p.grad.abs().sum() > 0)
                                   for p in setup.model.model.visual.parameters())

    measure(benchmark, step, device=setup.device, rounds=1 if phase == "B" and setup.size == "real" else 3,
            warmup=phase != "B",  # B's memory call is its warm-up (8B decoding takes a while)
            reset=lambda: _free(setup), check=(tower_reached, f"phase {phase} ({provider}): no gradient reached "
                                                              "the vision tower"), facts=step.facts, **info)


@pytest.mark.parametrize("provider", ["saga", "plain"])
def test_phase_a(benchmark, setup, provider):
    _bench(benchmark, setup, provider, "A")


@pytest.mark.parametrize("provider", ["saga", "full"])
def test_phase_c(benchmark, setup, provider):
    _bench(benchmark, setup, provider, "C")


@pytest.mark.parametrize("provider", ["saga", "per_pair"])
def test_phase_b(benchmark, setup, provider):
    n, G = len(setup.pairs), setup.cfg.group_size
    _bench(benchmark, setup, provider, "B", pairs=n, completions=n * G,
           sequences_per_call=n * G if provider == "saga" else G, sample_tokens=STEP[setup.size]["sample_tokens"])


def test_providers_agree():
    """Phase C's two paths and phase A's two compute the same losses and gradients (tiny model, fp32):
    tower, pooler and proxies; C's GRPO reaches the tower, its KL only the pooler."""
    s = Setup("small", device=torch.device("cpu"), bf16=False)
    tower = {id(p) for p in s.model.model.visual.parameters()}
    pooler = {id(p) for p in s.pooler.parameters()}
    for phase, providers in (("A", ("saga", "plain")), ("C", ("saga", "full"))):
        results = {}
        for provider in providers:
            loss = _step_fn(s, phase, provider)()
            results[provider] = (loss, [None if p.grad is None else p.grad.clone() for p in s.params])
        loss_s, grads_s = results["saga"]
        for provider in providers[1:]:
            loss_p, grads_p = results[provider]
            torch.testing.assert_close(loss_s, loss_p, rtol=1e-4, atol=1e-6)
            for p, gs, gp in zip(s.params, grads_s, grads_p):
                assert (gs is None) == (gp is None), (phase, provider)
                if gs is not None:  # fp32 summation-order noise, relative to the tensor's largest entry
                    assert (gs - gp).abs().max() <= 1e-4 * gs.abs().max(), (phase, provider, tuple(p.shape))
        reached = {kind for p, g in zip(s.params, grads_s) if g is not None and g.abs().sum() > 0
                   for kind, ids in (("tower", tower), ("pooler", pooler)) if id(p) in ids}
        assert reached == {"tower", "pooler"}, (phase, reached)
