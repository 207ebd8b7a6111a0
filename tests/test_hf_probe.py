"""AttentionProbe on a tiny random Qwen3-VL (MRoPE, q/k norms, GQA, two images, left padding) vs eager
``output_attentions``: the SDPA model's probed maps equal the eager maps' head mean at the image columns.

Tolerance rule (tests/utils.py): gold = the float64 reference on the very query/key states the probe hands to
``attention_probs`` (recorded by wrapping it), peer = transformers' eager attention maps in fp32."""
import pytest
import torch

from utils import assert_rule

transformers = pytest.importorskip("transformers")
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration  # noqa: E402

import saga_kernels.integrations.hf as hf  # noqa: E402
from saga_kernels._checks import input_checks  # noqa: E402
from saga_kernels.integrations.hf import AttentionProbe  # noqa: E402
from saga_kernels.reference import attention_probs_reference  # noqa: E402

PAD, IMAGE, VIDEO, V_START, V_END = 0, 60, 61, 62, 63
GRIDS = [(1, 4, 6), (1, 4, 4)]  # (t, h, w) patches of image a and image b; 2x2 merge -> 6 and 4 tokens
PATCH, MERGE, TEMPORAL = 4, 2, 2


def _config():
    text = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=512, pad_token_id=PAD,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                 "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, out_hidden_size=64,
                  num_position_embeddings=64, deepstack_visual_indexes=[0])
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                         vision_start_token_id=V_START, vision_end_token_id=V_END)


def _model(attn, state=None):
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration._from_config(_config(), attn_implementation=attn, dtype=torch.float32)
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def _inputs():
    """Two left-padded rows: text, image a, text, image b, text (different text lengths per row)."""
    g = torch.Generator().manual_seed(1)
    tokens = [g_h * g_w // MERGE**2 for _, g_h, g_w in GRIDS]

    def row(pre, mid, post):
        words = lambda k: torch.randint(1, 60, (k,), generator=g).tolist()  # noqa: E731
        return (words(pre) + [V_START] + [IMAGE] * tokens[0] + [V_END] + words(mid)
                + [V_START] + [IMAGE] * tokens[1] + [V_END] + words(post))

    rows = [row(3, 2, 9), row(6, 4, 11)]
    length = max(map(len, rows))
    input_ids = torch.full((2, length), PAD)
    attention_mask = torch.zeros(2, length, dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, length - len(r):] = torch.tensor(r)
        attention_mask[b, length - len(r):] = 1
    patch_dim = 3 * TEMPORAL * PATCH * PATCH
    n_patches = sum(t * h * w for t, h, w in GRIDS)
    pixel_values = torch.randn(2 * n_patches, patch_dim, generator=g)
    image_grid_thw = torch.tensor(GRIDS * 2)

    image_pos = [(input_ids[b] == IMAGE).nonzero().flatten() for b in range(2)]
    key_index = {"a": torch.stack([p[:tokens[0]] for p in image_pos]),
                 "b": torch.stack([p[tokens[0]:] for p in image_pos])}
    # query rows: the last 5 tokens, and the first text token after image a (rows anywhere in the sequence)
    after_a = key_index["a"][:, -1:] + 2
    query_positions = torch.cat([after_a, torch.arange(length - 5, length).expand(2, 5)], dim=1)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                  image_grid_thw=image_grid_thw, mm_token_type_ids=(input_ids == IMAGE).long())  # 1 = image token
    return inputs, query_positions, key_index


@pytest.fixture(scope="module")
def setup():
    sdpa = _model("sdpa")
    eager = _model("eager", sdpa.state_dict())
    inputs, qpos, key_index = _inputs()
    with torch.no_grad():
        plain = sdpa(**inputs).logits
        gold = eager(**inputs, output_attentions=True)
    return sdpa, eager, inputs, qpos, key_index, plain, gold


SLACK = 1e-7  # probabilities are <= 1: fp32 rounding of the softmax is a few 1e-8


def _record_gold(monkeypatch, probe, key_index):
    """Wrap the probe's attention_probs: every call also computes the float64 reference on its inputs.
    Returns {layer: {name: gold map}}, refilled by every forward pass (layers run in order; the last pass wins,
    as for ``probe.maps``)."""
    gold, calls = {}, []
    real = hf.attention_probs

    def recording(q, k, kidx, *, query_positions, key_padding_mask, scale):
        full = attention_probs_reference(q.double(), k.double(), kidx, query_positions, key_padding_mask, scale)
        calls.append(full)
        layer = sorted(probe.layers)[(len(calls) - 1) % len(probe.layers)]
        gold[layer] = dict(zip(key_index, full.split([v.shape[1] for v in key_index.values()], dim=-1)))
        return real(q, k, kidx, query_positions=query_positions, key_padding_mask=key_padding_mask, scale=scale)

    monkeypatch.setattr(hf, "attention_probs", recording)
    return gold


def _eager_maps(gold, layer, qpos, key_index):
    attn = gold.attentions[layer].mean(dim=1)  # [B, L, L], head mean
    rows = attn.gather(1, qpos[:, :, None].expand(-1, -1, attn.shape[-1]))
    return {name: rows.gather(2, idx[:, None, :].expand(-1, qpos.shape[1], -1)) for name, idx in key_index.items()}


@pytest.mark.parametrize("which", ["sdpa", "eager"])
def test_probe_matches_eager_attentions_and_keeps_logits(setup, which, monkeypatch):
    sdpa, eager, inputs, qpos, key_index, plain, gold = setup
    model = sdpa if which == "sdpa" else eager
    probe = AttentionProbe(model, layers=[0, 2])
    gold64 = _record_gold(monkeypatch, probe, key_index)
    with torch.no_grad(), probe.capture(query_positions=qpos, key_index=key_index):
        logits = model(**inputs).logits
    assert torch.equal(logits, plain if which == "sdpa" else gold.logits)  # outputs untouched
    assert model.config.text_config._attn_implementation == which  # restored on exit
    for layer in (0, 2):
        want = _eager_maps(gold, layer, qpos, key_index)
        for name in ("a", "b"):
            got = probe.maps[layer][name]
            assert got.dtype == torch.float32 and got.shape == want[name].shape
            visible = got[:, 1:] if name == "b" else got  # query row 0 sits between image a and image b
            assert visible.min() > 0
            if name == "b":
                assert (got[:, 0] == 0).all()  # image b is in row 0's future
            assert_rule(got, gold64[layer][name], want[name], slack=SLACK, what=f"layer {layer} map {name}")


def test_logits_identical_to_unprobed_model(setup):
    sdpa, _, inputs, qpos, key_index, plain, _ = setup
    probe = AttentionProbe(sdpa, layers=[1])
    with probe.capture(query_positions=qpos, key_index=key_index):  # grad enabled, as when training through it
        logits = sdpa(**inputs).logits
    assert torch.equal(logits.detach(), plain)
    assert not probe.maps[1]["a"].requires_grad  # detached teacher maps
    logits.square().mean().backward()  # the model's own graph is intact
    assert sdpa.model.language_model.layers[1].self_attn.q_proj.weight.grad is not None
    sdpa.zero_grad(set_to_none=True)


def test_explicit_padding_mask_and_padding_matters(setup, monkeypatch):
    sdpa, _, inputs, qpos, key_index, _, gold = setup
    probe = AttentionProbe(sdpa, layers=[1])
    gold64 = _record_gold(monkeypatch, probe, key_index)
    with torch.no_grad(), probe.capture(qpos, key_index, key_padding_mask=inputs["attention_mask"].bool()):
        sdpa(**inputs)
    want = _eager_maps(gold, 1, qpos, key_index)
    assert_rule(probe.maps[1]["b"], gold64[1]["b"], want["b"], slack=SLACK)
    no_pad = torch.ones_like(inputs["attention_mask"], dtype=torch.bool)
    with torch.no_grad(), probe.capture(qpos, key_index, key_padding_mask=no_pad):
        sdpa(**inputs)
    assert not torch.allclose(probe.maps[1]["b"][0], want["b"][0], rtol=1e-3, atol=1e-4)  # row 0 is padded


def test_restores_on_error_and_bad_arguments(setup):
    sdpa, _, inputs, qpos, key_index, _, _ = setup
    with pytest.raises(ValueError, match="layers \\[7\\]"):
        AttentionProbe(sdpa, layers=[7])
    probe = AttentionProbe(sdpa, layers=[0])
    with pytest.raises(ValueError, match="query_positions must lie in"):
        with torch.no_grad(), probe.capture(qpos + 100, key_index):
            sdpa(**inputs)
    assert sdpa.config.text_config._attn_implementation == "sdpa"
    with pytest.raises(TypeError, match="key_index must be a non-empty dict"):
        with probe.capture(qpos, key_index["a"]):
            pass
    with pytest.raises(RuntimeError, match="did not run"):
        with probe.capture(qpos, key_index):
            pass
    with input_checks("async"):  # on device without a host sync (on the CPU torch._assert_async raises at once)
        with pytest.raises(RuntimeError, match="query_positions must lie in"):
            with torch.no_grad(), probe.capture(qpos + 100, key_index):
                sdpa(**inputs)
    assert sdpa.config.text_config._attn_implementation == "sdpa"


def test_importing_saga_kernels_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, saga_kernels; sys.exit(1 if 'transformers' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_both_impls_inside_the_probe(setup, monkeypatch):
    sdpa, _, inputs, qpos, key_index, _, gold = setup
    probe = AttentionProbe(sdpa, layers=[2])
    maps = {}
    gold64 = _record_gold(monkeypatch, probe, key_index)
    for impl in ("torch", "triton"):
        monkeypatch.setenv("SAGA_IMPL", impl)
        with torch.no_grad(), probe.capture(qpos, key_index):
            sdpa(**inputs)
        maps[impl] = probe.maps[2]
    want = _eager_maps(gold, 2, qpos, key_index)
    for name in ("a", "b"):
        for impl in ("torch", "triton"):
            assert_rule(maps[impl][name], gold64[2][name], want[name], slack=SLACK, what=f"{impl} map {name}")
        torch.testing.assert_close(maps["triton"][name], maps["torch"][name], rtol=1e-5, atol=1e-7)
