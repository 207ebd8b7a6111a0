"""Phase C's shared-prefix replay (saga_train.replay) against the full replay written the plain transformers way
(``saga_train.reference.full_replay``: every rollout its own sequence, full logits, eager attention weights).
Gold = the oracle in float64, peer = the oracle in fp32 (tests/utils.py rule).
"""
import numpy as np
import pytest
import torch
from PIL import Image

from saga_train import replay, rollout
from saga_train.model import suppressed_token_ids
from saga_train.pooler import AttentionPooler
from saga_train.prompts import ITEM_KEYS, pair_prompt, prompt_spec
from saga_train.reference import full_replay
from saga_train.synthetic.answers import vocabulary
from saga_train.synthetic.tiny import build_processor, build_tiny_qwen3vl, build_tokenizer

from utils import assert_rule

pytestmark = pytest.mark.usefixtures("torch_kernels")

IMAGE_SIZE = 32  # 16 patches -> 4 LLM tokens per image
TEMPERATURE = 0.7
KL_LAYER = 1



def tiny(seed=0):
    spec = prompt_spec("cub")
    tokenizer = build_tokenizer(vocabulary(spec))
    processor = build_processor(tokenizer, IMAGE_SIZE)
    model = build_tiny_qwen3vl(tokenizer, image_size=IMAGE_SIZE, text_layers=2, seed=seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.model.visual.parameters():
        p.requires_grad_(True)
    return model, processor, spec


def random_image(rng):
    return Image.fromarray(rng.integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))


def make_group(model, processor, prompt, rng, lengths, rewards, gen):
    """A group with random completions of the given lengths (EOS last, pad after), item spans on r = 1 rows."""
    inputs = rollout.pair_inputs(model, processor, prompt, random_image(rng), random_image(rng))
    tokenizer = processor.tokenizer
    G, T = len(lengths), max(lengths)
    special = set(suppressed_token_ids(model)) | {tokenizer.eos_token_id, tokenizer.pad_token_id}
    vocab = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    ids = vocab[torch.randint(len(vocab), (G, T), generator=gen)]
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    for g, n in enumerate(lengths):
        ids[g, n - 1] = tokenizer.eos_token_id
        ids[g, n:] = tokenizer.pad_token_id
    rewards = torch.tensor(rewards, dtype=torch.float32)
    items = {}
    for k, item in enumerate(ITEM_KEYS):
        m = torch.zeros(G, T, dtype=torch.bool)
        for g, n in enumerate(lengths):
            if rewards[g] == 1:
                m[g, k * (n // 2): (k + 1) * (n // 2) + (k * (n % 2))] = True  # first half item 1, rest item 2
        items[item] = m & mask
    return rollout.Group(same=True, inputs=inputs, completion_ids=ids, completion_mask=mask, texts=[""] * G,
                         verdicts=[True] * G, rewards=rewards, advantages=rollout.group_advantages(rewards),
                         temperature=TEMPERATURE, item_token_masks=items)


def grads(modules):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for m in modules for p in m.parameters() if p.requires_grad]


def zero(modules):
    for m in modules:
        for p in m.parameters():
            p.grad = None


@pytest.fixture(scope="module")
def world():
    """The tiny Qwen3-VL, a pooler with a non-zero query, and three groups: prompts of two lengths
    (so the oracle batch is left-padded), completions of different lengths, item tokens on r = 1 rows."""
    torch.manual_seed(0)
    model, processor, spec = tiny()
    pooler = AttentionPooler(model.config.text_config.hidden_size, 8)
    with torch.no_grad():
        pooler.query.normal_()
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    long_prompt, short_prompt = pair_prompt(processor, spec, "dataset"), pair_prompt(processor, spec, "generic")
    groups = [make_group(model, processor, long_prompt, rng, [9, 4, 7], [1, 0, 1], gen),
              make_group(model, processor, short_prompt, rng, [6, 6, 2, 5], [0, 1, 1, 0], gen),
              make_group(model, processor, long_prompt, rng, [3, 8], [1, 0], gen)]
    assert len({g.inputs["input_ids"].shape[1] for g in groups}) == 2
    counts = replay.local_counts(groups)
    return model, pooler, groups, counts


def new_replay(model, pooler, groups, counts, replay_tokens=0, lambda_lm=1.0, lambda_kl=1.0):
    options = replay.ReplayOptions(lambda_lm=lambda_lm, lambda_kl=lambda_kl, kl_layer=KL_LAYER,
                                   replay_tokens=replay_tokens)
    model.train()
    return [replay.replay_group(model, group, options, counts, pooler) for group in groups]


def test_shared_prefix_replay_equals_full_replay(world):
    """Same L_GRPO, same L_KL, same tower and pooler gradients as the full replay (fp32 round-off)."""
    model, pooler, groups, counts = world
    modules = (model.model.visual, pooler)
    assert counts.kl_rollouts == 5 and counts.completion_tokens == sum(int(g.completion_mask.sum()) for g in groups)

    zero(modules)
    results = new_replay(model, pooler, groups, counts)
    ours_grads = grads(modules)
    ours_grpo = sum(r.grpo for r in results)
    ours_kl = sum(r.kl for r in results)

    # gold: float64, one batch per group (transformers' eager attention turns fully padded rows into NaN in
    # float64); peer: fp32, all groups in one left-padded batch
    reference = {}
    for name, dtype, one_batch in (("gold", torch.float64, False), ("peer", torch.float32, True)):
        model.to(dtype)
        pooler.to(dtype)
        zero(modules)
        total, grpo, kl = full_replay(model, [_as(g, dtype) for g in groups], pooler, counts,
                                      kl_layer=KL_LAYER, one_batch=one_batch)  # back-propagated
        reference[name] = (float(grpo.detach()) / counts.completion_tokens, float(kl.detach()) / counts.kl_rollouts,
                           grads(modules))
    model.float()
    pooler.float()

    (g_grpo, g_kl, g_grads), (p_grpo, p_kl, p_grads) = reference["gold"], reference["peer"]
    assert g_kl > 0 and abs(g_grpo) > 0
    assert abs(ours_grpo - g_grpo) <= abs(p_grpo - g_grpo) + 1e-6 * max(abs(g_grpo), 1e-3)
    assert abs(ours_kl - g_kl) <= abs(p_kl - g_kl) + 1e-6 * g_kl
    assert abs(p_kl - g_kl) <= 1e-4 * g_kl  # the left-padded plain replay is itself right
    n_tower = sum(1 for p in model.model.visual.parameters() if p.requires_grad)
    assert any(g.abs().sum() > 0 for g in ours_grads[:n_tower]) and any(g.abs().sum() > 0 for g in ours_grads[n_tower:])
    for k, (ours, gold, peer) in enumerate(zip(ours_grads, g_grads, p_grads)):
        assert_rule(ours, gold, peer, rel_slack=1e-5, what=f"{'tower' if k < n_tower else 'pooler'} grad {k}")


def _as(group, dtype):
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in group.inputs.items()}
    return rollout.Group(**{**vars(group), "inputs": inputs})


def gold_replay(model, pooler, groups, counts):
    """(L_GRPO, L_KL, grads) of the oracle in float64, one batch per group (transformers' eager attention turns
    fully padded rows into NaN in float64)."""
    modules = (model.model.visual, pooler)
    model.double()
    pooler.double()
    try:
        zero(modules)
        _, grpo, kl = full_replay(model, [_as(g, torch.float64) for g in groups], pooler, counts, kl_layer=KL_LAYER,
                                  one_batch=False)
        return float(grpo) / counts.completion_tokens, float(kl) / counts.kl_rollouts, grads(modules)
    finally:
        model.float()
        pooler.float()
        zero(modules)


def assert_same_sums(ours, peer, gold, what):
    """Two fp32 orders of the same sums (micro-batches, checkpointing), judged by the tolerance rule both ways:
    each no further from the float64 gold than the other plus 1e-5 of its size (fp32 round-off, whatever vector
    width ATen picks: a hand-set |ours - peer| bound failed on AVX512 by 2%)."""
    for k, (a, b, g) in enumerate(zip(ours, peer, gold)):
        assert_rule(a, g, b, rel_slack=1e-5, what=f"{what} {k}")
        assert_rule(b, g, a, rel_slack=1e-5, what=f"{what} {k} (the other way)")


def test_micro_batches_give_identical_gradients(world):
    """A token budget splits each group's completions; the gradients (and losses) stay the same."""
    model, pooler, groups, counts = world
    modules = (model.model.visual, pooler)
    zero(modules)
    whole = new_replay(model, pooler, groups, counts)
    expected = grads(modules)
    zero(modules)
    split = new_replay(model, pooler, groups, counts, replay_tokens=12)
    got = grads(modules)
    zero(modules)
    assert [r.micro_batches for r in whole] == [1, 1, 1]
    assert [r.micro_batches for r in split] == [3, 2, 2]  # group 0: 9 | 7 | 4 tokens; group 1: 2x6 | 5 + 2
    g_grpo, g_kl, g_grads = gold_replay(model, pooler, groups, counts)
    for name, gold in (("grpo", g_grpo), ("kl", g_kl)):
        ours, peer = (torch.tensor(sum(getattr(r, name) for r in rs)) for rs in (split, whole))
        assert_same_sums([ours], [peer], [torch.tensor(gold)], name)
    assert any(g.abs().sum() > 0 for g in expected)
    assert_same_sums(got, expected, g_grads, "grad")


def test_micro_batch_plan():
    lengths = torch.tensor([3, 9, 4, 7])
    assert [b.tolist() for b in replay.micro_batches(lengths, 0)] == [[0, 1, 2, 3]]
    assert [b.tolist() for b in replay.micro_batches(lengths, 16)] == [[1], [3, 2], [0]]  # 9 | 2x7 | 3
    assert [b.tolist() for b in replay.micro_batches(lengths, 1)] == [[1], [3], [2], [0]]  # one row at least


def test_tokens_forwarded_once_per_prefix(world):
    """P + sum of (rows x (longest - 1)) tokens, unless L_KL reads the last token's attention."""
    model, pooler, groups, counts = world
    results = new_replay(model, pooler, groups, counts, lambda_kl=0.0)
    for group, result in zip(groups, results):
        P, (G, T) = group.inputs["input_ids"].shape[1], group.completion_ids.shape
        assert result.tokens == P + G * (T - 1) < G * (P + T)
    zero((model.model.visual, pooler))


def test_gradient_checkpointing_keeps_the_caches(world):
    """Under transformers' gradient checkpointing (the trainer's CUDA default) the result is unchanged."""
    model, pooler, groups, counts = world
    modules = (model.model.visual, pooler)
    zero(modules)
    new_replay(model, pooler, groups[:2], counts)
    expected = grads(modules)
    lm = model.model.language_model
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        zero(modules)
        new_replay(model, pooler, groups[:2], counts)
    finally:
        lm.gradient_checkpointing_disable()
    got = grads(modules)
    assert not any("_can_checkpoint_with_cache" in vars(layer) for layer in lm.layers)
    assert_same_sums(got, expected, gold_replay(model, pooler, groups[:2], counts)[2], "grad")


@pytest.mark.parametrize("kwargs", [{"use_reentrant": True}, {}], ids=["use_reentrant", "torch-default"])
def test_reentrant_checkpointing_is_refused(world, kwargs):
    """Reentrant checkpointing does not track the prefix keys/values inside the cache (the tower's gradient came
    out 87-93% off, silently): the replay refuses it, naming the fix."""
    model, pooler, groups, counts = world
    lm = model.model.language_model
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for layer in lm.layers:  # transformers fills in use_reentrant=False when none is given: take torch's default
        if not kwargs:
            layer._gradient_checkpointing_func = torch.utils.checkpoint.checkpoint
    try:
        with pytest.raises(ValueError, match="reentrant.*use_reentrant': False"):
            new_replay(model, pooler, groups[:1], counts)
    finally:
        lm.gradient_checkpointing_disable()
    zero((model.model.visual, pooler))


def test_replay_logprobs_equal_left_padded_generate():
    """Sample two pairs whose prompts differ in length in one left-padded generate call; the replay's
    log-probs of the sampled tokens equal generate's (same MRoPE positions, same image features)."""
    model, processor, spec = tiny(seed=3)
    rng = np.random.default_rng(1)
    prompts = [pair_prompt(processor, spec, "dataset"), pair_prompt(processor, spec, "generic")]
    pairs = [rollout.pair_inputs(model, processor, p, random_image(rng), random_image(rng)) for p in prompts]
    tokenizer = processor.tokenizer
    stops = rollout.stop_token_ids(model, tokenizer)
    batch = rollout.left_pad(pairs, tokenizer.pad_token_id)
    assert (batch["attention_mask"][1] == 0).any()  # the short prompt is padded on the left
    model.eval()
    torch.manual_seed(3)
    with torch.no_grad(), rollout.encode_images_once(model.model, batch["pixel_values"], batch["image_grid_thw"], 2, 3):
        out = model.generate(**batch, do_sample=True, temperature=TEMPERATURE, top_p=1.0, top_k=0, max_new_tokens=10,
                             num_return_sequences=3, suppress_tokens=rollout.suppressed_token_ids(model),
                             eos_token_id=stops, pad_token_id=tokenizer.pad_token_id, output_logits=True,
                             return_dict_in_generate=True)
    completion = out.sequences[:, batch["input_ids"].shape[1]:]
    mask = rollout.completion_mask(completion, stops)
    generated = torch.log_softmax(torch.stack(out.logits, 1).float() / TEMPERATURE, -1)
    generated = generated.gather(-1, completion[..., None])[..., 0]
    for p, inputs in enumerate(pairs):
        rows = slice(3 * p, 3 * p + 3)
        with torch.no_grad():
            prefix = replay.forward_prefix(model, inputs)
            hidden, _ = replay.completion_states(model, prefix, completion[rows], mask[rows])
        replayed = torch.log_softmax(model.lm_head(hidden).float() / TEMPERATURE, -1)
        replayed = replayed.gather(-1, completion[rows, :, None])[..., 0]
        assert mask[rows].sum() > 3
        torch.testing.assert_close(replayed[mask[rows]], generated[rows][mask[rows]], rtol=0, atol=2e-5)


def test_checkpointed_layers_without_the_cache_switch_are_refused():
    """A transformers whose checkpointed layers cannot be told to keep a cache gets a clear error, not a replay
    that silently drops the prefix."""

    class Layer(torch.nn.Module):  # no _can_checkpoint_with_cache on the class
        gradient_checkpointing = True

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Layer(), Layer()])

    with pytest.raises(RuntimeError, match="no-grad-checkpointing"):
        with replay.caches_under_checkpointing(LM()):
            pass
