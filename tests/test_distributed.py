"""Multi-process training (saga_train.distributed) on gloo CPU ranks: the same steps as one process.

The ranks are forked processes on a free port (as tests/test_train.py::test_two_gloo_ranks_keep_identical_parameters),
a tiny random Qwen3-VL, 4 classes x 2 images per batch. Rewards come from a deterministic function of the
completion text (a random MLLM never writes a verdict), as in tests/test_train.py.

Tolerance of the weight comparisons: the ranks embed 4 or 3 images per tower call instead of 8 and sum the
gradients in another order, so the gradients differ from one process's by fp32 round-off. AdamW turns a
gradient difference dg into an update difference of up to lr * dg / eps (eps = 1e-8: x2,000 at lr 2e-5) on
elements whose gradient is near zero, so after 2 steps the weights differ by up to 3.6e-7 (DML losses) and
8.5e-7 (GRPO on 3 ranks) here, about 3 fp32 ulps of a weight of 1.0. ATOL = 4e-6; the per-rank L_DML that
issue 15 reported (each rank only its own classes as negatives and proxies) differed by 4e-4.
"""
import json
import os
import socket

import pytest
import torch
import torch.distributed.fsdp  # noqa: F401 -- imported once here, not in every forked rank
import torch.multiprocessing as mp
from safetensors.torch import load_file

from saga_train import checkpoints, components, rollout
from saga_train import distributed as dist_lib
from saga_train import step as step_lib
from saga_train import train as train_lib
from saga_train.config import make_config
from saga_train.data.samplers import ClassBalancedBatchSampler

import fakes

pytestmark = pytest.mark.usefixtures("torch_kernels")

ATOL = 4e-6

SMALL = dict(model="tiny-random", image_size=32, synthetic_images_per_class=2, classes_per_batch=4, images_per_class=2,
             embedding_size=16, proxies_per_class=2, progress=False, eval_before=False, eval_every_epoch=False,
             steps_per_epoch=2, max_steps=2, seed=3, lambda_lm=0.0, lambda_kl=0.0)
DML = ("supcon", "multi_similarity", "proxy_anchor", "potential_field")
# GRPO + L_KL + PF: K = 2 contributing pairs from draws of 3 (on 3 ranks one rank replays nothing each step),
# completions of up to 12 tokens replayed in micro-batches of at most 8 tokens
GRPO = dict(dml="potential_field", lambda_lm=1.0, lambda_kl=1.0, group_size=4, max_new_tokens=12, pairs_per_step=3,
            contributing_pairs=2, max_pair_draws=6, replay_tokens=8, temperature=1.0)





def runs(root, world: int) -> dict:
    """name -> config dict of every run a world size trains (the sharded one on 2 ranks only)."""
    out = {name: dict(SMALL, dml=name) for name in DML}
    out["grpo"] = dict(SMALL, **GRPO)
    if world == 2:
        out["grpo_shard"] = dict(SMALL, **GRPO, shard_llm=True)
        out["grpo_shard_ckpt"] = dict(SMALL, **GRPO, shard_llm=True)  # + activation checkpointing in the LLM
    return {name: dict(cfg, run_dir=str(root / f"w{world}" / name)) for name, cfg in out.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, configs, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    fakes.install()
    replayed = []  # groups this rank replays, per step
    phase_c, build = step_lib.phase_c, train_lib.build_components

    def counting_phase_c(comps, plan, groups):
        replayed.append(len(groups))
        return phase_c(comps, plan, groups)

    def build_components(cfg, dist=None, **kwargs):
        comps = build(cfg, dist, **kwargs)
        if cfg.run_dir.endswith("_ckpt"):  # what --grad-checkpointing does on CUDA
            comps.model.model.language_model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        return comps

    step_lib.phase_c, train_lib.build_components = counting_phase_c, build_components
    report = {}
    for name, cfg in configs.items():
        replayed.clear()
        result = train_lib.train(make_config(**cfg), log=lambda *_: None)
        report[name] = {"digest": result["parameter_digest"], "replayed": list(replayed),
                        "llm_bytes": result["llm_parameter_bytes"]}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    torch.distributed.destroy_process_group()


def run_ranks(world: int, configs: dict, out_dir) -> list:
    mp.start_processes(_worker, args=(world, free_port(), configs, str(out_dir)), nprocs=world, join=True,
                       start_method="fork")
    return [json.load(open(out_dir / f"rank{r}.json")) for r in range(world)]


def trained(cfg: dict) -> dict:
    state = load_file(os.path.join(cfg["run_dir"], checkpoints.CHECKPOINT))
    return {k: v for k, v in state.items() if k.startswith(("embedder.", "metric."))}


def assert_same_weights(a: dict, b: dict, what: str) -> None:
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=ATOL, msg=lambda m: f"{what}: {key}: {m}")


def test_n_ranks_train_the_weights_of_one_process(tmp_path, signal):
    """supcon / MS / PA / PF and GRPO + L_KL, 2 steps: 1 process = 2 ranks = 3 ranks (8 images: 4/4 and 3/3/2,
    a class split over ranks); on 3 ranks with K = 2 some rank replays no group at every step and nothing hangs;
    --shard-llm (FSDP2 over the decoder layers, with and without activation checkpointing) on 2 ranks trains
    the weights of the unsharded run, generation and the KV-cache replay included, with half of the decoder
    weights on each rank."""
    single = runs(tmp_path, 1)
    for cfg in single.values():
        train_lib.train(make_config(**cfg), log=lambda *_: None)
    for world in (2, 3):
        configs = runs(tmp_path, world)
        out = tmp_path / f"w{world}"
        out.mkdir(exist_ok=True)
        reports = run_ranks(world, configs, out)
        for name, cfg in configs.items():
            assert len({r[name]["digest"] for r in reports}) == 1, f"{name}: ranks disagree"  # exactly
            assert_same_weights(trained(cfg), trained(single[name.split("_shard")[0]]), f"{name} on {world} ranks")
        replayed = [r["grpo"]["replayed"] for r in reports]
        assert all(sum(step) == 2 for step in zip(*replayed)), replayed  # K groups a step over all ranks
        if world == 3:
            assert all(min(step) == 0 for step in zip(*replayed)), replayed  # a rank without a group, every step
    # --shard-llm: bitwise the unsharded 2-rank run; half the decoder weights per rank
    for name in ("grpo_shard", "grpo_shard_ckpt"):
        sharded, plain = trained(runs(tmp_path, 2)[name]), trained(runs(tmp_path, 2)["grpo"])
        assert all(torch.equal(sharded[k], plain[k]) for k in plain), name
    memory = [r["grpo_shard"]["llm_bytes"] for r in reports_of(tmp_path, 2)]
    total = memory[0]["decoder_layers_total"]
    assert sum(m["decoder_layers"] for m in memory) == total
    assert all(abs(m["decoder_layers"] - total / 2) <= 0.01 * total for m in memory)
    assert all(r["grpo"]["llm_bytes"]["decoder_layers"] == total for r in reports_of(tmp_path, 2))


def reports_of(root, world: int) -> list:
    return [json.load(open(root / f"w{world}" / f"rank{r}.json")) for r in range(world)]


# ------------------------------------------------------------------------------------------ building blocks
def _gather_worker(rank, world, port, out_dir):
    """Rows from a shared linear map of each rank's slice (rank 1 of 3: no rows), PF loss with proxies on the
    gathered batch, GradientSync; writes the averaged gradients."""
    import saga_kernels

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    info = dist_lib.init_distributed("cpu")
    torch.manual_seed(0)
    x, labels = torch.randn(5, 6), torch.tensor([0, 0, 1, 2, 2])
    layer, loss_fn = torch.nn.Linear(6, 4), saga_kernels.PotentialFieldLoss(3, 4, proxies_per_class=2)
    mine = {0: slice(0, 3), 1: slice(3, 3), 2: slice(3, 5)}[rank]
    z, y = dist_lib.gather_rows(layer(x[mine]), labels[mine], info)
    assert torch.equal(y, labels)
    loss_fn(z, y).backward()
    unused = torch.nn.Parameter(torch.ones(3))  # no gradient on any rank: stays None (AdamW skips it)
    params = [*layer.parameters(), unused, *loss_fn.parameters()]
    dist_lib.GradientSync(params, info, bucket_bytes=64)()  # tiny buckets: several all-reduces
    assert unused.grad is None
    torch.save([p.grad for p in params if p is not unused], os.path.join(out_dir, f"grads{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_gathered_loss_and_gradient_sync_give_the_single_process_gradient(tmp_path):
    """The scaling of distributed.gather_rows (+ the average of GradientSync), a rank with no rows included."""
    import saga_kernels

    torch.manual_seed(0)
    x, labels = torch.randn(5, 6), torch.tensor([0, 0, 1, 2, 2])
    layer, loss_fn = torch.nn.Linear(6, 4), saga_kernels.PotentialFieldLoss(3, 4, proxies_per_class=2)
    loss_fn(layer(x), labels).backward()
    gold = [p.grad for p in [*layer.parameters(), *loss_fn.parameters()]]
    mp.start_processes(_gather_worker, args=(3, free_port(), str(tmp_path)), nprocs=3, join=True, start_method="fork")
    for rank in range(3):
        for got, want in zip(torch.load(tmp_path / f"grads{rank}.pt"), gold):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_batch_slices_cover_the_batch():
    for size in (1, 7, 8):
        for world in (1, 2, 3, 9):
            slices = [dist_lib.batch_slice(size, dist_lib.DistInfo(r, world)) for r in range(world)]
            assert [i for s in slices for i in range(size)[s]] == list(range(size))
            assert max(s.stop - s.start for s in slices) - min(s.stop - s.start for s in slices) <= 1
    # the default batch: classes come in runs of images_per_class, so 3 ranks split a class
    batch = next(iter(ClassBalancedBatchSampler([c for c in range(4) for _ in range(2)], 4, 2)))
    assert [len(batch[dist_lib.batch_slice(8, dist_lib.DistInfo(r, 3))]) for r in range(3)] == [3, 3, 2]


def test_seeded_sampling_is_the_tempered_top_p_distribution():
    """SeededSampling (Gumbel-max with one generator per sequence) samples softmax(top_p(logits / T))."""
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    temperature, top_p, n = 0.7, 0.9, 20_000
    sampler = rollout.SeededSampling(range(n), temperature, top_p, "cpu")
    scores = sampler(None, logits.expand(n, -1))
    assert torch.isfinite(scores).sum(-1).eq(1).all()  # one finite score: generate's own draw has no choice
    counts = torch.bincount(scores.argmax(-1), minlength=12).double() / n
    probs = torch.softmax(logits[0].double() / temperature, -1)
    ascending, order = probs.sort()
    kept = torch.zeros(12, dtype=torch.bool)
    kept[order] = ascending.cumsum(0) > 1 - top_p
    want = torch.where(kept, probs, 0.0) / probs[kept].sum()
    assert counts[~kept].sum() == 0
    assert (counts - want).abs().max() < 4 * (want * (1 - want) / n).sqrt().max()


def test_a_pairs_completions_do_not_depend_on_the_other_pairs_of_the_call(tmp_path):
    comps = components.build_components(make_config(**dict(SMALL, **GRPO, run_dir=str(tmp_path / "run"))))
    plan = step_lib.step_plan(comps)
    ds = comps.train_set
    inputs = [rollout.pair_inputs(comps.model, comps.processor, plan.prompt, ds[i][0], ds[j][0])
              for i, j in ((0, 1), (2, 5), (3, 6))]
    tokenizer = comps.processor.tokenizer
    together = rollout.sample_groups(comps.model, tokenizer, inputs, [True, False, False], plan.sampling,
                                     seeds=[7, 8, 9])
    alone = [rollout.sample_groups(comps.model, tokenizer, [x], [s], plan.sampling, seeds=[seed])[0]
             for x, s, seed in zip(inputs, [True, False, False], [7, 8, 9])]
    assert [g.texts for g in together] == [g.texts for g in alone]
    assert len({t for g in together for t in g.texts}) > 3  # the completions are not all alike


def _sharded_generation_worker(rank, world, port, cfg, out_dir):
    import dataclasses

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    comps = components.build_components(make_config(**cfg), dist_lib.init_distributed("cpu"))
    plan = step_lib.step_plan(comps)
    assert plan.lockstep
    texts = _sample(comps, plan, rank, dataclasses.replace(plan.sampling, max_new_tokens=2 if rank == 0 else 10))
    with open(os.path.join(out_dir, f"texts{rank}.json"), "w") as f:
        json.dump(texts, f)
    torch.distributed.destroy_process_group()


def _sample(comps, plan, rank, options):
    ds = comps.train_set
    inputs = rollout.pair_inputs(comps.model, comps.processor, plan.prompt, ds[rank][0], ds[5][0])
    return rollout.sample_groups(comps.model, comps.processor.tokenizer, [inputs], [False], options,
                                 seeds=[rank], synced_gpus=plan.lockstep)[0].texts


def test_generation_on_sharded_layers_when_ranks_stop_at_different_steps(tmp_path):
    """--shard-llm: every decode step all-gathers each layer, so a rank whose sequences are done keeps stepping
    (synced_gpus) until the others are; each rank samples what the unsharded model samples."""
    import dataclasses

    cfg = dict(SMALL, **GRPO, shard_llm=True, run_dir=str(tmp_path / "run"))
    comps = components.build_components(make_config(**dict(cfg, shard_llm=False)))  # first: the ranks inherit imports
    plan = step_lib.step_plan(comps)
    want = [_sample(comps, plan, rank, dataclasses.replace(plan.sampling, max_new_tokens=tokens))
            for rank, tokens in ((0, 2), (1, 10))]
    mp.start_processes(_sharded_generation_worker, args=(2, free_port(), cfg, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    assert [json.load(open(tmp_path / f"texts{rank}.json")) for rank in range(2)] == want


def test_micro_batches_split_to_the_count_of_the_busiest_rank():
    """Lockstep replay: a group is split into as many micro-batches as another rank needs, within the budget."""
    from saga_train.replay import micro_batches

    lengths = torch.tensor([5, 3, 9, 1, 4])
    for budget in (0, 9, 12):
        natural = micro_batches(lengths, budget)
        for count in range(len(natural), len(lengths) + 1):
            batches = micro_batches(lengths, budget, count)
            assert len(batches) == count and sorted(torch.cat(batches).tolist()) == list(range(5))
            assert budget == 0 or all(len(b) * int(lengths[b].max()) <= max(budget, int(lengths[b].max()))
                                      for b in batches)
    with pytest.raises(ValueError, match="count=6"):
        micro_batches(lengths, 0, 6)
