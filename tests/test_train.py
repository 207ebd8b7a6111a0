"""The SAGA trainer on a tiny Qwen3-VL and tiny synthetic data.

A randomly initialized MLLM never writes a parseable verdict, so the tests that need reward
variance replace the verdict parser with a deterministic function of the completion text (and the
item-span finder with "first half = item 1, second half = item 2"); everything else is real.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import saga_kernels
from saga_train import components, rollout, sources
from saga_train import step as step_lib
from saga_train import train as train_lib
from saga_train.__main__ import main
from saga_train.config import ConfigError, make_config
from saga_train.data import stream
from saga_train.model import load_embedder
from saga_train.prompts import pair_prompt, prompt_spec
from saga_train.replay import ReplayOptions, completion_states, forward_prefix, local_counts, replay_group

import fakes

pytestmark = pytest.mark.usefixtures("torch_kernels")

SMALL = dict(image_size=32, synthetic_images_per_class=2, classes_per_batch=4, images_per_class=2, pairs_per_step=2,
             group_size=3, contributing_pairs=1, max_pair_draws=3, max_new_tokens=10, embedding_size=16,
             proxies_per_class=2, progress=False, eval_before=False, max_eval_images=16, steps_per_epoch=2,
             temperature=1.0)





def small(tmp_path, **kw):
    return make_config(**{**SMALL, "run_dir": str(tmp_path / "run"), **kw})


def llm_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("model.visual.")}


def first_group(comps, same=False, need_item_masks=False):
    cfg, ds = comps.cfg, comps.train_set
    spec = prompt_spec(cfg.dataset, ds)
    inputs = rollout.pair_inputs(comps.model, comps.processor, pair_prompt(comps.processor, spec), ds[0][0],
                                 ds[2 if same else 5][0])
    options = rollout.SamplingOptions(group_size=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p,
                                      max_new_tokens=cfg.max_new_tokens, verdict_key=spec.verdict_key,
                                      item_masks=need_item_masks)
    torch.manual_seed(0)
    return rollout.sample_groups(comps.model, comps.processor.tokenizer, [inputs], [same], options)[0]


def first_batch(comps):
    index = stream.epoch_batches(comps.cfg, comps.train_set, 0, 1)[0]
    return stream.collate_batch([comps.train_set[i] for i in index])


def test_grpo_gradient_reaches_tower_and_llm_never_changes(tmp_path, signal):
    # no warm-up: transformers' schedule runs a warm-up's first step at lr 0, and this test takes one step
    comps = components.build_components(small(tmp_path, lambda_dml=0.0, lambda_kl=0.0, warmup_fraction=0.0))
    model = comps.model
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.startswith("model.visual."))
    assert all(p.requires_grad for p in model.model.visual.parameters())
    before_llm = llm_state(model)
    before_tower = [p.detach().clone() for p in model.model.visual.parameters()]
    optimizer, scheduler = components.build_optimizer(comps, total_steps=4)
    plan = step_lib.step_plan(comps)
    groups, stats = step_lib.phase_b(comps, plan, first_batch(comps), 0)
    losses = step_lib.phase_c(comps, plan, groups)
    assert stats.groups_kept >= 1 and losses["loss_grpo"] != 0.0
    tower_grads = [p.grad for p in model.model.visual.parameters()]
    assert all(g is not None for g in tower_grads)
    assert sum(float(g.abs().sum()) for g in tower_grads) > 0
    assert model.model.visual.merger.linear_fc2.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("model.visual."))
    optimizer.step()
    for name, value in llm_state(model).items():
        assert torch.equal(value, before_llm[name]), name
    assert any(not torch.equal(p, q) for p, q in zip(model.model.visual.parameters(), before_tower))


def test_replayed_logprobs_equal_generate(tmp_path):
    comps = components.build_components(small(tmp_path, temperature=0.7, group_size=4, max_new_tokens=12))
    ds, model = comps.train_set, comps.model
    spec = prompt_spec("synthetic", ds)
    inputs = rollout.pair_inputs(model, comps.processor, pair_prompt(comps.processor, spec), ds[0][0], ds[7][0])
    stops = rollout.stop_token_ids(model, comps.processor.tokenizer)
    model.eval()
    torch.manual_seed(3)
    out = model.generate(**inputs, do_sample=True, temperature=0.7, top_p=1.0, top_k=0, max_new_tokens=12,
                         num_return_sequences=4, suppress_tokens=rollout.suppressed_token_ids(model),
                         eos_token_id=stops, pad_token_id=comps.processor.tokenizer.pad_token_id,
                         output_logits=True, return_dict_in_generate=True)
    completion = out.sequences[:, inputs["input_ids"].shape[1]:]
    mask = rollout.completion_mask(completion, stops)
    raw = torch.stack(out.logits, dim=1).float()  # generate's raw logits, same processing as the replay below
    generated = torch.log_softmax(raw / 0.7, dim=-1).gather(-1, completion[..., None])[..., 0]
    with torch.no_grad():  # the shared-prefix replay of phase C
        hidden, _ = completion_states(model, forward_prefix(model, inputs), completion, mask)
        replayed = saga_kernels.linear_logprobs(hidden, model.lm_head.weight, completion, temperature=0.7)
    assert mask.sum() > 4
    torch.testing.assert_close(replayed[mask], generated[mask], rtol=0, atol=2e-5)
    # no vision token was ever sampled
    assert not torch.isin(completion, torch.tensor(rollout.suppressed_token_ids(model))).any()


def test_kl_gradient_reaches_only_the_pooler(tmp_path, signal):
    comps = components.build_components(small(tmp_path, group_size=4, max_new_tokens=16))
    group = first_group(comps, need_item_masks=True)
    assert group.contributes and group.item_token_masks["item 1"].any()
    # make the pooler's query non-zero so that every pooler weight gets a KL gradient
    with torch.no_grad():
        comps.embedder.pooler.query.normal_()
    counts = local_counts([group])
    assert counts.kl_rollouts >= 1
    options = ReplayOptions(lambda_lm=0.0, lambda_kl=1.0, kl_layer=1)
    result = replay_group(comps.model, group, options, counts, comps.embedder.pooler)  # back-propagates
    assert result.kl > 0 and result.grpo == 0.0
    assert comps.embedder.pooler.query.grad.abs().sum() > 0
    assert comps.embedder.pooler.key.weight.grad.abs().sum() > 0
    assert comps.embedder.pooler.proj.weight.grad is None  # z is not part of L_KL
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in comps.model.parameters())


def test_teacher_map_renormalizes_and_averages():
    from saga_train.losses import teacher_map

    maps = torch.rand(2, 5, 3) + 0.1
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    alpha = teacher_map(maps, mask)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(2))
    rows = maps / maps.sum(-1, keepdim=True)
    torch.testing.assert_close(alpha[0], rows[0, :2].mean(0))
    torch.testing.assert_close(alpha[1], rows[1, 4])


def test_advantages_and_masks():
    adv = rollout.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(adv.mean(), torch.tensor(0.0))
    assert adv[0] > 0 > adv[1]
    assert torch.equal(rollout.group_advantages(torch.ones(3)), torch.zeros(3))
    ids = torch.tensor([[5, 9, 7, 9], [5, 6, 7, 8]])
    assert rollout.completion_mask(ids, [9]).tolist() == [[True, True, False, False], [True] * 4]


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_whole_loop_with_all_three_losses(tmp_path, signal):
    cfg = small(tmp_path, max_steps=2, group_size=4, max_new_tokens=16, dml="potential_field")
    result = train_lib.train(cfg, log=lambda *_: None)
    records = [r for r in _read_jsonl(os.path.join(cfg.run_dir, "metrics.jsonl")) if "eval" not in r]
    assert len(records) == 2
    assert all(r["loss_dml"] > 0 for r in records)
    assert any(r["groups_kept"] >= 1 and r["loss_grpo"] != 0 for r in records)
    assert any(r["loss_kl"] > 0 for r in records)
    assert 0 < result["reward_rate"] < 1
    assert {"R@1", "R@4", "NMI"} <= set(result["after"])
    assert set(result["phase_share"]) == {"a", "b", "c", "opt"}
    # the final embedder loads for the retrieval tool and embeds unit vectors
    embedder = load_embedder(os.path.join(cfg.run_dir, "embedder"))
    images = [sources.load_splits(cfg)[1][i][0] for i in range(3)]
    z = embedder.embed_images(images)
    assert z.shape == (3, 16)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))
    state = load_file(os.path.join(cfg.run_dir, "checkpoint.safetensors"))
    saved = {k[len("embedder."):]: v for k, v in state.items() if k.startswith("embedder.")}
    assert all(torch.equal(embedder.state_dict()[k], v) for k, v in saved.items())


def test_embedder_rejects_non_images(tmp_path):
    comps = components.build_components(small(tmp_path))
    with pytest.raises(TypeError, match=r"images\[1\]"):
        comps.embedder.embed_images([comps.test_set[0][0], "not-an-image.png"])


def test_resume_continues_exactly(tmp_path, signal):
    common = dict(max_steps=4, dml="proxy_anchor", eval_every_epoch=False)
    straight = small(tmp_path / "a", **common)
    train_lib.train(straight, log=lambda *_: None)
    halves = small(tmp_path / "b", **common, stop_after=2)
    first = train_lib.train(halves, log=lambda *_: None)
    assert first["final_step"] == 2
    train_lib.train(make_config(halves, resume=True, stop_after=0), log=lambda *_: None)
    a = load_file(os.path.join(straight.run_dir, "checkpoint.safetensors"))
    b = load_file(os.path.join(halves.run_dir, "checkpoint.safetensors"))
    assert set(a) == set(b)
    for key in a:
        if not key.startswith("rng."):
            assert torch.equal(a[key], b[key]), key
    steps_a = [r for r in _read_jsonl(os.path.join(straight.run_dir, "metrics.jsonl")) if "eval" not in r]
    steps_b = [r for r in _read_jsonl(os.path.join(halves.run_dir, "metrics.jsonl")) if "eval" not in r]
    assert [r["loss_dml"] for r in steps_a] == [r["loss_dml"] for r in steps_b]
    assert any(r["groups_kept"] for r in steps_a)  # GRPO was part of the trajectory


def test_resume_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_lib.train(small(tmp_path, resume=True), log=lambda *_: None)
    cfg = small(tmp_path, lambda_lm=0.0, lambda_kl=0.0, max_steps=2, stop_after=1, eval_every_epoch=False)
    train_lib.train(cfg, log=lambda *_: None)
    with pytest.raises(ConfigError, match=r"lr_encoder \(2e-05 -> 0.001\)"):
        train_lib.train(make_config(cfg, resume=True, lr_encoder=1e-3), log=lambda *_: None)


def test_unreadable_image_is_named(tmp_path, capsys):
    from PIL import Image

    for c in range(4):
        (tmp_path / "data" / f"class{c}").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (20, 20), (60 * c, 10 * i, 90)).save(tmp_path / "data" / f"class{c}" / f"{i}.png")
    (tmp_path / "data" / "class3" / "1.png").write_bytes(b"definitely not a png")
    code = main(["--model", "tiny-random", "--dataset", "folder", "--data-root", str(tmp_path / "data"),
                 "--image-size", "32",
                 "--run-dir", str(tmp_path / "run"), "--classes-per-batch", "2", "--images-per-class", "2",
                 "--embedding-size", "8", "--no-progress"])
    assert code == 2
    assert os.path.join("class3", "1.png") in capsys.readouterr().err


def test_lambda_zero_equals_plain_metric_learning(tmp_path):
    cfg = small(tmp_path, lambda_lm=0.0, lambda_kl=0.0, max_steps=3, dml="supcon", eval_every_epoch=False)
    train_lib.train(cfg, log=lambda *_: None)
    trained = load_file(os.path.join(cfg.run_dir, "checkpoint.safetensors"))

    # plain metric learning, written out: embed the batch, SupCon, clip, AdamW, cosine schedule
    comps = components.build_components(cfg)
    optimizer, scheduler = components.build_optimizer(comps, total_steps=3)
    params = comps.trainable_parameters()
    batches = stream.epoch_batches(cfg, comps.train_set, 0, 2) + stream.epoch_batches(cfg, comps.train_set, 1, 2)
    for batch in batches[:3]:
        optimizer.zero_grad(set_to_none=True)
        images = [comps.train_set[i][0] for i in batch]
        labels = torch.tensor([comps.train_set.labels[i] for i in batch])
        z, _, _ = comps.embedder(**comps.embedder.pixel_inputs(images))
        saga_kernels.supcon_loss(z, labels).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
    for key, value in comps.embedder.state_dict().items():
        assert torch.equal(trained[f"embedder.{key}"], value), key


def _ddp_worker(rank, world, port, cfg_dict, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    fakes.install()
    result = train_lib.train(make_config(**cfg_dict), log=lambda *_: None)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"digest": result["parameter_digest"]}, f)
    torch.distributed.destroy_process_group()


def test_two_gloo_ranks_keep_identical_parameters(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = small(tmp_path, max_steps=1, contributing_pairs=2, group_size=4, max_new_tokens=12, eval_every_epoch=False,
                warmup_fraction=0.0)  # one step: without warm-up (transformers' warm-up starts at lr 0)
    # built here first: the digest of the initialization, and the forked children inherit the imports
    init = train_lib.parameter_digest(components.build_components(cfg).trainable_parameters())
    mp.start_processes(_ddp_worker, args=(2, port, cfg.to_dict(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    digests = [json.load(open(tmp_path / f"rank{r}.json"))["digest"] for r in range(2)]
    assert digests[0] == digests[1]
    assert digests[0] != init  # the run did train


def test_local_checkpoint_directory_trains(tmp_path, signal):
    """A saved Qwen3-VL directory (here a tiny one, as the synthetic supervisor is saved) loads by --model DIR."""
    from saga_train.synthetic.answers import vocabulary
    from saga_train.synthetic.tiny import build_processor, build_tiny_qwen3vl, build_tokenizer

    ds = sources.load_splits(small(tmp_path))[0]
    tokenizer = build_tokenizer(vocabulary(prompt_spec("synthetic", ds), ds))
    build_tiny_qwen3vl(tokenizer, image_size=32, seed=5).save_pretrained(tmp_path / "ckpt")
    build_processor(tokenizer, 32).save_pretrained(tmp_path / "ckpt")
    cfg = small(tmp_path, model=str(tmp_path / "ckpt"), max_steps=1, eval_every_epoch=False)
    result = train_lib.train(cfg, log=lambda *_: None)
    assert result["model"] == f"Qwen3-VL from {tmp_path / 'ckpt'}"
    assert result["rollouts"]["groups_kept"] >= 1


def test_poolers():
    from saga_train.pooler import AttentionPooler, MeanPooler

    torch.manual_seed(0)
    x = torch.randn(3, 7, 12)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    attn, mean = AttentionPooler(12, 5), MeanPooler(12, 5)
    mean.proj.load_state_dict(attn.proj.state_dict())
    z_attn, logits = attn(x, mask)
    z_mean, none = mean(x, mask)
    assert none is None and logits.shape == (3, 7)
    torch.testing.assert_close(z_attn, z_mean)  # q = 0 at init: uniform beta over the unmasked patches
    torch.testing.assert_close(z_mean[1], torch.nn.functional.normalize(mean.proj(x[1, :4].mean(0)), dim=-1))
    with torch.no_grad():
        attn.query.normal_()
    z, logits = attn(x, mask)
    beta = torch.softmax(attn.key(x) @ attn.query / 12 ** 0.5 + torch.where(mask, 0.0, float("-inf")), -1)
    torch.testing.assert_close(logits[mask], (attn.key(x) @ attn.query / 12 ** 0.5)[mask])
    torch.testing.assert_close(z, torch.nn.functional.normalize(attn.proj(torch.einsum("bn,bnd->bd", beta, x)), dim=-1))


def test_item_token_masks_select_the_item_values():
    from saga_train.synthetic.answers import vocabulary
    from saga_train.synthetic.tiny import build_tokenizer

    spec = prompt_spec("cub")
    answer = ('{"item 1": {"bill shape": "hooked", "crown color": "red"}, "item 2": "short bill, blue crown", '
              '"differences": "bill shape differ", "same_species": "no"}')
    tokenizer = build_tokenizer(vocabulary(spec) + [answer])
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    masks = rollout.item_token_masks(tokenizer, ids, tokenizer.decode(ids))
    assert tokenizer.decode([i for i, m in zip(ids, masks["item 1"]) if m]).strip() == \
        '{"bill shape": "hooked", "crown color": "red"}'
    assert tokenizer.decode([i for i, m in zip(ids, masks["item 2"]) if m]).strip() == '"short bill, blue crown"'
    none = rollout.item_token_masks(tokenizer, ids[:5], tokenizer.decode(ids[:5]))
    assert not none["item 1"].any() and not none["item 2"].any()


def _image_folder(root, classes=4, per_class=6):
    from PIL import Image

    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (20, 20), (60 * c, 40 * i, 90)).save(root / f"class{c}" / f"{i}.png")
    return root


def test_workers_decode_the_same_batches(tmp_path):
    """Images on disk are decoded in DataLoader workers; the trajectory is the one of in-process decoding."""
    data = _image_folder(tmp_path / "data")
    common = dict(dataset="folder", data_root=str(data), lambda_lm=0.0, lambda_kl=0.0, classes_per_batch=2,
                  max_steps=2, eval_every_epoch=True, dml="supcon")
    in_process = small(tmp_path / "w0", **common, workers=0)
    in_workers = small(tmp_path / "w1", **common, workers=1)
    results = [train_lib.train(cfg, log=lambda *_: None) for cfg in (in_process, in_workers)]
    assert results[0]["after"] == results[1]["after"]
    a, b = (load_file(os.path.join(c.run_dir, "checkpoint.safetensors")) for c in (in_process, in_workers))
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng."))
    # the default (-1): workers for images on disk, none for the in-memory synthetic world
    comps_device = torch.device("cpu")
    train_set = sources.load_splits(in_process)[0]
    cpus = len(os.sched_getaffinity(0))
    assert stream.data_workers(make_config(in_process, workers=-1), train_set, comps_device) == min(2, cpus - 1)
    assert stream.data_workers(small(tmp_path), sources.load_splits(small(tmp_path))[0], comps_device) == 0


def test_real_model_path_never_imports_the_synthetic_world(tmp_path):
    """--model DIR on a dataset on disk: the synthetic world (saga_train.synthetic: world, tiny kit, supervisor) is
    never imported, rollouts and replay included."""
    import subprocess
    import sys

    from saga_train.synthetic.answers import vocabulary
    from saga_train.synthetic.tiny import build_processor, build_tiny_qwen3vl, build_tokenizer

    data = _image_folder(tmp_path / "data")
    spec = prompt_spec("folder")
    tokenizer = build_tokenizer(vocabulary(spec))
    build_tiny_qwen3vl(tokenizer, image_size=32, seed=1).save_pretrained(tmp_path / "ckpt")
    build_processor(tokenizer, 32).save_pretrained(tmp_path / "ckpt")
    args = ["--model", str(tmp_path / "ckpt"), "--dataset", "folder", "--data-root", str(data), "--image-size", "32",
            "--run-dir", str(tmp_path / "run"), "--classes-per-batch", "2", "--images-per-class", "2",
            "--embedding-size", "8", "--no-progress", "--max-steps", "1", "--group-size", "2", "--max-new-tokens", "4",
            "--pairs-per-step", "2", "--no-eval-before", "--no-eval-every-epoch", "--workers", "0"]
    code = ("import sys\nfrom saga_train.__main__ import main\nrc = main(sys.argv[1:])\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[:2] == ['saga_train', 'synthetic'])\n"
            "print('IMPORTED', bad)\nsys.exit(rc or bool(bad))\n")
    env = {**os.environ, "SAGA_IMPL": "torch", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "IMPORTED []" in run.stdout
    record = _read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert record["generate_calls"] >= 1 and record["completions"] >= 2
