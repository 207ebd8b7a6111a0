"""saga_kernels.integrations.trl inside the real TRL (the [test] extra pins trl==1.16.0), on tiny models built
from configs: a Qwen3 (untied and tied embeddings) and a Qwen3-VL with images.

On the SAME inputs (one generation batch of TRL's GRPOTrainer: completions, rewards, advantages, old and
reference log-probs) and the same weights, TRL's own fused head and ``add_saga_lm_head`` give the same loss
(within 1e-6) and the same gradient of every parameter (within 1e-5 relative, norm-wise) over the loss types,
beta 0 / 0.04 with and without TRL's bias-corrected KL, token and sequence importance sampling, one and two
iterations, the entropy read or differentiated, trained / frozen / tied heads and both implementations; three
training steps of SagaGRPOTrainer and GRPOTrainer end with the same weights; the vocabulary-sized matmul flops
of one policy loss + backward are counted.
"""
import contextlib
import copy

import numpy as np
import pytest
import torch
import trl
from datasets import Dataset
from packaging.version import Version
from PIL import Image
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import FusedCausalLMOutput, add_fused_lm_head

import saga_kernels.integrations.trl as saga_trl
import saga_kernels.logprob as logprob_mod
from saga_kernels.integrations.trl import SagaGRPOTrainer, add_saga_lm_head
from saga_kernels.reference import linear_logprobs_reference
from saga_train.synthetic.tiny import build_processor, build_tiny_qwen3vl, build_tokenizer

from utils import MatmulFlops, assert_rule

WORDS = "the a bird red blue green small large wing tail beak yes no same different describe image".split()
PROMPTS = ["the red bird", "a small blue wing", "the large tail", "green beak same"]
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]


def reward(completions, **_):
    """A deterministic reward with variance inside a group (random completions of a random model)."""
    return [float(sum(map(ord, str(c))) % 7) for c in completions]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(WORDS)


def _save(model, processing, path):
    model.save_pretrained(path)
    processing.save_pretrained(path)
    return str(path)


def _qwen3(tokenizer, *, tied=False, **extra):
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=tied, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Qwen3ForCausalLM(config)


@pytest.fixture(scope="module")
def model_dirs(tokenizer, tmp_path_factory):
    """name -> (saved model directory, processing class, dataset)."""
    root = tmp_path_factory.mktemp("trl-models")
    text = Dataset.from_dict({"prompt": PROMPTS * 4})
    processor = build_processor(tokenizer, image_size=32)
    vlm = build_tiny_qwen3vl(tokenizer, text_hidden=32, text_layers=2, heads=2, kv_heads=1, vision_hidden=16,
                             vision_depth=2, vision_heads=2, image_size=32)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}]
    vision = Dataset.from_dict({"prompt": [prompt] * 4, "image": images})
    return {
        "qwen3": (_save(_qwen3(tokenizer), tokenizer, root / "qwen3"), tokenizer, text),
        "qwen3-tied": (_save(_qwen3(tokenizer, tied=True), tokenizer, root / "qwen3-tied"), tokenizer, text),
        "qwen3vl": (_save(vlm, processor, root / "qwen3vl"), processor, vision),
    }


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                max_completion_length=8, report_to="none", logging_steps=1, save_strategy="no", use_cpu=True,
                bf16=False, seed=0, learning_rate=1e-3, beta=0.04, num_iterations=2, max_steps=3)
    base.update(kw)
    return GRPOConfig(**base)


def _trainer(cls, model_dirs, name, tmp_path, **kw):
    path, processing, dataset = model_dirs[name]
    extra = {"saga_impl": kw.pop("saga_impl")} if "saga_impl" in kw else {}
    return cls(model=path, reward_funcs=reward, args=_config(tmp_path, **kw), train_dataset=dataset,
               processing_class=processing, **extra)


def _generation_batch(trainer, moved=False):
    """One training batch as TRL's training step sees it (completions, advantages, old and ref log-probs). With
    ``moved`` the old and reference log-probs are shifted by noise, as if the policy had trained since: ratios
    off 1 (clipping acts) and a non-zero KL."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    if moved:
        g = torch.Generator().manual_seed(1)
        for key in ("old_per_token_logps", "ref_per_token_logps"):
            inputs[key] = inputs[key] + 0.3 * torch.randn(inputs[key].shape, generator=g)
    return inputs


def _loss_and_grads(trainer, model, inputs):
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(ours, theirs, what):
    assert abs(float(ours[0]) - float(theirs[0])) <= 1e-6, f"{what}: loss {float(ours[0])} vs {float(theirs[0])}"
    assert ours[1].keys() == theirs[1].keys(), f"{what}: gradients of different parameters"
    for name, want in theirs[1].items():
        err = float((ours[1][name] - want).norm())
        assert err <= 1e-5 * float(want.norm()) + 1e-12, f"{what}: d {name} off by {err / float(want.norm()):.2e}"


# the configurations compared on one generation batch: (loss_type, beta, bias-corrected KL, IS level, iterations,
# entropy bonus / mask)
CONFIGS = [(lt, beta, corr, level, iters, "none")
           for lt in LOSS_TYPES for beta, corr in ((0.0, True), (0.04, True), (0.04, False))
           for level in ("token", "sequence") for iters in (1, 2)]
CONFIGS += [("dapo", 0.04, True, "token", 2, "bonus"), ("grpo", 0.0, True, "token", 1, "mask")]
QUICK = [c for c in CONFIGS if c[0] == "dapo" and c[3] == "token"] + CONFIGS[-2:]  # the triton interpreter's share


def _apply(trainer, inputs, loss_type, beta, corrected, level, iters, entropy):
    trainer.loss_type, trainer.beta, trainer.importance_sampling_level = loss_type, beta, level
    trainer.args.use_bias_correction_kl = corrected
    trainer.entropy_coef = 0.01 if entropy == "bonus" else 0.0
    trainer._entropy_bonus_enabled = entropy == "bonus"
    trainer.top_entropy_quantile = 0.5 if entropy == "mask" else 1.0
    return inputs if iters == 2 else {k: v for k, v in inputs.items() if k != "old_per_token_logps"}


@pytest.mark.slow
@pytest.mark.parametrize("name,head", [("qwen3", "trained"), ("qwen3", "frozen"), ("qwen3-tied", "tied"),
                                       ("qwen3vl", "trained")])
def test_same_loss_and_gradients_as_trls_head(model_dirs, tmp_path, impl, name, head):
    trainer = _trainer(GRPOTrainer, model_dirs, name, tmp_path)
    inputs = _generation_batch(trainer, moved=True)
    assert inputs["completion_mask"].sum() > 0 and inputs["advantages"].abs().sum() > 0
    path = model_dirs[name][0]
    cls = type(trainer.model)
    models = {}
    for key in ("trl", "detached", "differentiable"):
        model = cls.from_pretrained(path).train()
        if head == "frozen":
            model.get_output_embeddings().weight.requires_grad_(False)
        if key == "trl":
            add_fused_lm_head(model, temperature=trainer.temperature, outputs=("log_probs", "entropy"))
        else:
            add_saga_lm_head(model, temperature=trainer.temperature, outputs=("log_probs", "entropy"), impl=impl,
                             entropy=key)
        models[key] = model
    if head == "tied":
        assert models["trl"].lm_head.weight is models["trl"].model.embed_tokens.weight
    losses = set()
    for config in CONFIGS if impl == "torch" else QUICK:
        batch = _apply(trainer, inputs, *config)
        theirs = _loss_and_grads(trainer, models["trl"], batch)
        ours = _loss_and_grads(trainer, models["differentiable" if config[-1] == "bonus" else "detached"], batch)
        _assert_same(ours, theirs, f"{name} {head} {config}")
        if head == "frozen":
            assert "lm_head.weight" not in ours[1]
        losses.add(round(float(theirs[0]), 9))
    assert len(losses) > (8 if impl == "torch" else 2)  # the options did change the loss


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("saga_impl", ["torch", "triton"])
def test_three_training_steps_give_the_same_weights(model_dirs, tmp_path, saga_impl):
    """SagaGRPOTrainer is a drop-in for GRPOTrainer: same generations, rewards and updates (beta 0.04 with TRL's
    bias-corrected KL, two iterations, dapo), so the same weights after 3 steps; its policy and its reference
    model run saga's head, the entropy (read for metrics only) detached."""
    theirs = _trainer(GRPOTrainer, model_dirs, "qwen3", tmp_path / "trl")
    theirs.train()
    ours = _trainer(SagaGRPOTrainer, model_dirs, "qwen3", tmp_path / "saga", saga_impl=saga_impl)
    assert ours.saga_entropy_mode() == "detached"
    for model in (ours.model, ours.ref_model):
        assert model.forward.__func__.__code__.co_name == "_saga_forward"
    ours.train()
    want, got = _weights(theirs.model), _weights(ours.model)
    initial = _weights(AutoModelForCausalLM.from_pretrained(model_dirs["qwen3"][0]))
    for name, w in want.items():
        assert not torch.equal(w, initial[name]) or "norm" in name  # training moved the weights
        # within 1e-4 of how far training moved them: Adam divides by sqrt(v), which turns the 1e-7-relative
        # gradient differences of entries whose gradient is near 0 into larger relative step differences
        err = float((got[name] - w).norm())
        assert err <= 1e-4 * float((w - initial[name]).norm()) + 1e-7, f"{name}: {err:.2e}"
    for key in ("loss", "reward", "kl", "entropy"):
        a = [r[key] for r in theirs.state.log_history if key in r]
        b = [r[key] for r in ours.state.log_history if key in r]
        assert len(a) == len(b) >= 2 and np.allclose(a, b, rtol=1e-5, atol=1e-7), (key, a, b)


def test_entropy_bonus_makes_the_trainer_differentiate_the_entropy(model_dirs, tmp_path):
    trainer = _trainer(SagaGRPOTrainer, model_dirs, "qwen3", tmp_path, entropy_coef=0.01, beta=0.0,
                       num_iterations=1)
    assert trainer.saga_entropy_mode() == "differentiable"


def _head_flops(trainer, model, inputs, vocab):
    with MatmulFlops(vocab) as counter:
        _loss_and_grads(trainer, model, inputs)
    return counter.flops


@pytest.mark.parametrize("head,entropy,floor", [("frozen", "detached", 4), ("trained", "detached", 8),
                                                ("frozen", "differentiable", 6)])
def test_vocabulary_matmul_flops_meet_the_floor(model_dirs, tmp_path, tokenizer, head, entropy, floor):
    """One policy loss + backward inside TRL's call pattern (prompt tokens are -100): saga's head costs floor x
    N_live H V (4 frozen with the entropy read, 8 trained; 6 when the entropy is differentiated) where TRL's
    own head on this CPU scores every position (6 / 8 x N_all H V)."""
    trainer = _trainer(GRPOTrainer, model_dirs, "qwen3", tmp_path)
    inputs = _apply(trainer, _generation_batch(trainer), "dapo", 0.0, True, "token", 1,
                    "bonus" if entropy == "differentiable" else "none")
    vocab, hidden = len(tokenizer), 32
    # the products of the head are the ones with a V-sized side: V is unlike every other size here, and smaller
    # than the torch fallback's vocabulary chunk (so no product of the head is split along V)
    assert vocab not in (16, 32, 64) and vocab not in inputs["completion_ids"].shape
    assert vocab <= logprob_mod._TORCH_VOCAB_PER_CHUNK
    n_live = int(inputs["completion_mask"].sum())
    n_all = inputs["completion_ids"].shape[0] * (inputs["prompt_ids"].shape[1] + inputs["completion_ids"].shape[1] - 1)
    counts = {}
    for key in ("saga", "trl"):
        model = Qwen3ForCausalLM.from_pretrained(model_dirs["qwen3"][0]).train()
        model.lm_head.weight.requires_grad_(head == "trained")
        if key == "saga":
            add_saga_lm_head(model, outputs=("log_probs", "entropy"), impl="torch", entropy=entropy)
        else:
            add_fused_lm_head(model, outputs=("log_probs", "entropy"))
        counts[key] = _head_flops(trainer, model, inputs, vocab) / (hidden * vocab)
    print(f"\n{head} head, entropy {entropy}: saga {counts['saga'] / n_live:.2f} x N_live H V, TRL "
          f"{counts['trl'] / n_live:.2f} x N_live H V (N_live {n_live}, N_all {n_all})")
    assert counts["saga"] == floor * n_live
    # TRL's head recomputes (6 N H V, 8 trained) over the live rows (1.15) or, from 1.16 on a device without
    # Triton, over every position
    trl_rows = n_live if Version(trl.__version__) < Version("1.16") else n_all
    assert counts["trl"] == (8 if head == "trained" else 6) * trl_rows


# ----------------------------------------------------------------------------------------------------
# The contract in detail: outputs, shift_labels, num_items_in_batch, generate, logit scale / softcap, MoE,
# autocast, FSDP2 and ZeRO-3 heads, refusals
# ----------------------------------------------------------------------------------------------------
def _pair(tokenizer, outputs=("log_probs", "entropy"), entropy="differentiable", **extra):
    theirs, ours = _qwen3(tokenizer, **extra), _qwen3(tokenizer, **extra)
    add_fused_lm_head(theirs, temperature=0.7, outputs=outputs)
    add_saga_lm_head(ours, temperature=0.7, outputs=outputs, entropy=entropy)
    return theirs, ours


def _batch(tokenizer, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(tokenizer), (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100  # a prompt
    return ids, mask, labels


def _run(model, ids, mask, **kw):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, fused_lm_head=True, **kw)
    (out.loss + (out.entropy.sum() if out.entropy is not None and out.entropy.requires_grad else 0)).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare_with_trl(ours_model, theirs_model, ids, mask, **call):
    """Ours against TRL's head by the tolerance rule (tests/utils.py): gold = TRL's head on a float64 copy of the
    model, peer = TRL's head in fp32; every field and gradient no further from the gold than the peer's plus 1e-5
    of its size (fp32 round-off of a sum over the vocabulary, whatever vector width ATen picks)."""
    gold_model = copy.deepcopy(theirs_model).double()
    (o, og), (t, tg), (g, gg) = (_run(m, ids, mask, **call) for m in (ours_model, theirs_model, gold_model))
    assert isinstance(o, FusedCausalLMOutput)
    for field in ("loss", "log_probs", "entropy", "label_mask", "aux_loss"):
        a, b, gold = getattr(o, field), getattr(t, field), getattr(g, field)
        assert (a is None) == (b is None), field
        if a is not None and a.dtype == torch.bool:
            assert torch.equal(a, b), field
        elif a is not None:
            assert_rule(a, gold, b, rel_slack=1e-5, what=field)
    for field in ("log_sum_sq_probs", "mean_logits", "is_top1"):
        assert getattr(o, field) is None
    assert og.keys() == tg.keys()
    for name in tg:
        assert_rule(og[name], gg[name], tg[name], rel_slack=1e-5, what=name)


@pytest.mark.parametrize("kw", [dict(), dict(num_items_in_batch=torch.tensor(17.0)), dict(shift=True)])
def test_contract_fields_match_trl(tokenizer, kw):
    theirs, ours = _pair(tokenizer)
    ids, mask, labels = _batch(tokenizer)
    call = dict(shift_labels=labels[:, 1:]) if kw.pop("shift", False) else dict(labels=labels)
    call.update(kw)
    ids_in, mask_in = (ids[:, :-1], mask[:, :-1]) if "shift_labels" in call else (ids, mask)
    _compare_with_trl(ours, theirs, ids_in, mask_in, **call)


def test_entropy_detached_is_the_same_value_without_gradient(tokenizer):
    theirs, ours = _pair(tokenizer, entropy="detached")
    ids, mask, labels = _batch(tokenizer, seed=1)
    out = ours(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    want = theirs(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert not out.entropy.requires_grad and out.log_probs.requires_grad
    torch.testing.assert_close(out.entropy, want.entropy.detach(), rtol=1e-5, atol=1e-6)
    ours_only_lp = _pair(tokenizer, outputs=("log_probs",))[1]
    assert ours_only_lp(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).entropy is None


def test_generate_and_plain_forward_are_untouched(tokenizer):
    plain = _qwen3(tokenizer)
    patched = _qwen3(tokenizer)
    add_saga_lm_head(patched)
    ids, mask, labels = _batch(tokenizer, seed=2)
    a = plain(input_ids=ids, attention_mask=mask, labels=labels)
    b = patched(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=0)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(patched.generate(ids[1:], **kw), plain.generate(ids[1:], **kw))


@pytest.mark.parametrize("fields", [dict(final_logit_softcapping=2.0), dict(logits_scaling=4.0),
                                    dict(logit_scale=0.5, final_logit_softcapping=3.0)])
def test_logit_scale_and_softcap_follow_trl(tokenizer, fields):
    """The config fields TRL's head reads (Gemma 2's softcap, Granite's logits_scaling, Cohere's logit_scale)."""
    theirs, ours = _pair(tokenizer, **fields)
    ids, mask, labels = _batch(tokenizer, seed=3)
    _compare_with_trl(ours, theirs, ids, mask, labels=labels)


@pytest.mark.parametrize("fields,match", [(dict(final_logit_softcapping=0.0), "config.final_logit_softcapping"),
                                          (dict(logits_scaling=0.0), "config.logits_scaling"),
                                          (dict(logit_scale=float("nan")), "config.logit_scale")])
def test_bad_logit_fields_are_refused_naming_the_field(tokenizer, fields, match):
    with pytest.raises(ValueError, match=match):
        add_saga_lm_head(_qwen3(tokenizer, **fields))


def test_moe_router_aux_loss_follows_trl(tokenizer):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                            num_experts=4, num_experts_per_tok=2, output_router_logits=True,
                            router_aux_loss_coef=0.01, pad_token_id=tokenizer.pad_token_id)
    config._experts_implementation = "eager"  # torch._grouped_mm has no float64 (the gold)
    models = []
    for add in (add_fused_lm_head, add_saga_lm_head):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = Qwen3MoeForCausalLM(config)
        add(model, outputs=("log_probs", "entropy"))
        models.append(model)
    ids, mask, labels = _batch(tokenizer, seed=4)
    assert _run(models[1], ids, mask, labels=labels)[0].aux_loss is not None
    _compare_with_trl(models[1], models[0], ids, mask, labels=labels)


def test_autocast_bf16_is_closer_to_float64_than_trls_head(tokenizer):
    """Under CPU autocast (TRL's bf16=True default) both heads run the projection on bf16 hidden states; TRL's also
    rounds the head and the logits to bf16, saga's keeps the fp32 head and fp32 logits: its error against the
    float64 head of the same bf16 hidden states is no larger."""
    theirs, ours = _pair(tokenizer)
    ids, mask, labels = _batch(tokenizer, seed=5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = ours.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1].to(torch.bfloat16)
        got = ours(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        want = theirs(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    gold = linear_logprobs_reference(hidden.double(), ours.lm_head.weight.double(), labels[:, 1:], temperature=0.7)
    err_ours = float((got.log_probs.double() - gold).abs().max())
    err_trl = float((want.log_probs.double() - gold).abs().max())
    assert err_ours <= err_trl + 1e-6, (err_ours, err_trl)


def test_fsdp2_sharded_head_is_gathered(tokenizer, tmp_path):
    """An FSDP2-sharded model (one gloo rank: the head is a DTensor): the head is gathered for the call and the
    gradients reach the sharded parameters, as with TRL's head."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        results = []
        for add in (add_fused_lm_head, add_saga_lm_head):
            model = _qwen3(tokenizer)
            fully_shard(model)
            assert isinstance(model.lm_head.weight, torch.distributed.tensor.DTensor)
            add(model, temperature=0.7, outputs=("log_probs", "entropy"))
            ids, mask, labels = _batch(tokenizer, seed=6)
            out, _ = _run(model, ids, mask, labels=labels)
            results.append((out, {n: p.grad.full_tensor() for n, p in model.named_parameters()}))
        (o, og), (t, tg) = results[1], results[0]
        torch.testing.assert_close(o.loss, t.loss, rtol=1e-5, atol=1e-6)
        for name in tg:
            torch.testing.assert_close(og[name], tg[name], rtol=1e-4, atol=1e-7, msg=name)
    finally:
        dist.destroy_process_group()


def test_zero3_head_is_gathered_in_forward_and_backward(tokenizer, monkeypatch):
    """Under DeepSpeed ZeRO-3 (simulated: TRL's gather context is counted) the head is gathered around the forward
    and again around the backward, which re-reads it when the entropy is differentiated."""
    entered = []

    @contextlib.contextmanager
    def gather(*params):
        entered.append(len(params))
        yield

    monkeypatch.setattr(saga_trl, "is_deepspeed_zero3_enabled", lambda: True)
    monkeypatch.setattr(saga_trl, "maybe_gather_lm_head_ctx", gather)
    _, ours = _pair(tokenizer)
    ids, mask, labels = _batch(tokenizer, seed=7)
    _run(ours, ids, mask, labels=labels)
    assert len(entered) == 2


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(outputs=("log_probs", "mean_logits")), ValueError, "cannot compute 'mean_logits'"),
    (dict(outputs=("log_probs", "is_top1", "log_sum_sq_probs")), ValueError, "'is_top1', 'log_sum_sq_probs'"),
    (dict(outputs=("logits",)), ValueError, "not fields of TRL's FusedCausalLMOutput"),
    (dict(outputs="log_probs"), TypeError, "outputs must be a tuple"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(entropy="sometimes"), ValueError, "entropy must be one of"),
])
def test_refusals(tokenizer, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        add_saga_lm_head(_qwen3(tokenizer), **kwargs)


def test_fused_call_without_labels_is_refused(tokenizer):
    _, ours = _pair(tokenizer)
    ids, mask, _ = _batch(tokenizer)
    with pytest.raises(ValueError, match="needs labels"):
        ours(input_ids=ids, attention_mask=mask, fused_lm_head=True)


def test_mixin_refuses_a_trainer_asking_for_outputs_it_cannot_compute(model_dirs, tmp_path):
    """TRL's SFTTrainer asks its head for is_top1: the mixed-in trainer says so at construction."""
    from trl import SFTConfig, SFTTrainer

    class SagaSFT(saga_trl.SagaLMHeadMixin, SFTTrainer):
        pass

    path, tokenizer, _ = model_dirs["qwen3"]
    data = Dataset.from_dict({"text": PROMPTS})
    with pytest.raises(ValueError, match="cannot compute 'is_top1'"):
        SagaSFT(model=path, args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none"),
                train_dataset=data, processing_class=tokenizer)


def test_mixin_needs_a_trl_trainer():
    class NotATrainer(saga_trl.SagaLMHeadMixin, object):
        pass

    with pytest.raises(TypeError, match="must be mixed into a TRL trainer"):
        NotATrainer()


def test_copy_of_patched_model_is_independent(tokenizer):
    """TRL deep-copies models (reference models); a copy of a patched model keeps the head on its own weights."""
    _, ours = _pair(tokenizer)
    clone = copy.deepcopy(ours)
    with torch.no_grad():
        clone.lm_head.weight.mul_(2.0)
    ids, mask, labels = _batch(tokenizer, seed=8)
    a = ours(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs
    b = clone(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs
    assert not torch.allclose(a, b)
    plain = ours(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(clone(input_ids=ids, attention_mask=mask).logits, 2.0 * plain)
