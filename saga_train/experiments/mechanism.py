"""What GRPO teaches the tower: damage it, then let GRPO alone repair it, and read the supervisor's readout.

``python -m saga_train.experiments.mechanism [--seeds 0 1 2] [--arms ...] [--set key=value ...]``
(``--merge a/mechanism.json b/mechanism.json`` unites runs made by separate processes, e.g. one per seed).

Per seed (the training seed; the world, its split and the shipped supervisor are fixed, ``ablation.PAPER_REGIME``):

1. Damage: the metric loss alone at a high learning rate (``DAMAGE``: lr 1e-3, ``--damage-steps``) from the
   supervisor's own tower. Retrieval improves while the supervisor's reading of that tower falls (its verdict and
   the attributes it describes): the tower drifts away from what the frozen LLM was taught to read.
2. Recovery, every arm from the damaged tower and pooler (``--init-embedder``), ``--steps`` steps (``RECOVERY``:
   lr 3e-4, K = 4 contributing groups per step):

   - ``verdict_random`` / ``verdict_hard``: GRPO alone (lambda_dml = lambda_kl = 0), the paper's verdict reward,
     the paper's balanced pairs or hard pairs (``data.samplers.sample_hard_pairs``);
   - ``attributes_random`` / ``attributes_hard``: the same with the attribute reward (``rollout.AttributeReward``);
   - ``shuffled``: GRPO alone, verdict reward, balanced pairs, each group's rewards permuted (the same groups and
     gradient sizes, no signal): what GRPO's updates do without the reward's information;
   - ``dml_only``: the metric loss alone, as in the damage: what more steps of DML do.

Per run: the supervisor's readout (``readout.py``) of the final tower on ``--readout-pairs`` fixed held-out pairs
(per pair: verdict right, fraction of the 2A attribute values right), retrieval (R@K, per-query R@1 hits), phase B's
counts by pair kind. The damaged tower's readout is every arm's "before". Paired differences per seed with percentile
bootstrap 95% CIs (``analysis.paired_bootstrap``: pairs / queries resampled): each arm minus the damaged tower
(recovery), each GRPO arm minus ``dml_only`` and minus ``shuffled``. Writes ``mechanism.json`` and ``mechanism.md``
into ``--out``.
"""
import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

from .ablation import heldout_features, output_dirs, read_json_record, read_records, regime_config, tower_readout

DAMAGE = dict(lambda_lm=0.0, lambda_kl=0.0, lr_encoder=1e-3)
RECOVERY = dict(lr_encoder=3e-4, contributing_pairs=4, max_pair_draws=8)
GRPO_ALONE = dict(lambda_dml=0.0, lambda_kl=0.0)
ARMS = {
    "verdict_random": dict(GRPO_ALONE, reward="verdict", pair_sampling="balanced"),
    "verdict_hard": dict(GRPO_ALONE, reward="verdict", pair_sampling="hard"),
    "attributes_random": dict(GRPO_ALONE, reward="attributes", pair_sampling="balanced"),
    "attributes_hard": dict(GRPO_ALONE, reward="attributes", pair_sampling="hard"),
    "shuffled": dict(GRPO_ALONE, reward="verdict", pair_sampling="balanced", shuffle_rewards=True),
    "dml_only": dict(lambda_lm=0.0, lambda_kl=0.0),
}
CONTROLS = ("dml_only", "shuffled")
SCORES = {"verdict": "verdict_right", "attributes": "attributes_right", "R@1": "hits"}


def damage_config(base, seed: int, steps: int, run_root):
    """The damage run of ``seed``: ``base`` + ``DAMAGE``, ``steps`` steps, no evaluation but the last."""
    from saga_train.config import make_config

    return make_config(base, **DAMAGE, seed=seed, max_steps=steps, eval_before=False, eval_every=0,
                       run_dir=str(Path(run_root) / f"damage-seed{seed}"))


def arm_config(base, arm: str, seed: int, steps: int, damaged: str, run_root):
    """The recovery run of (arm, seed) from the damaged embedder directory ``damaged``."""
    from saga_train.config import make_config

    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; arms: {list(ARMS)}")
    return make_config(base, **RECOVERY, **ARMS[arm], seed=seed, max_steps=steps, init_embedder=damaged,
                       eval_before=False, eval_every=0, run_dir=str(Path(run_root) / f"{arm}-seed{seed}"))


def measure(cfg, embedder_dir: str, readout_pairs: int) -> dict:
    """Readout (per pair) and retrieval (per query) of the tower + pooler saved in ``embedder_dir``."""
    from saga_train import sources
    from saga_train.evaluate import evaluate
    from saga_train.model import load_embedder

    from .analysis import query_hits

    out = tower_readout(cfg, embedder_dir, readout_pairs)
    features = heldout_features(load_embedder(embedder_dir), sources.load_splits(cfg)[1])
    out.update(evaluate(features.embedding, features.labels))
    out["hits"] = query_hits(features.embedding, features.labels).astype(int).tolist()
    return out


def run_seed(base, seed: int, arms, *, damage_steps: int, steps: int, readout_pairs: int, run_root, log=print) -> dict:
    """The damage run and every arm of one seed: ``{"damaged": measures, arm: measures + training stats}``."""
    from saga_train import train as trainer

    start = time.perf_counter()
    damage = damage_config(base, seed, damage_steps, run_root)
    trainer.train(damage, log=lambda *_: None)
    damaged = str(Path(damage.run_dir) / "embedder")
    out = {"damaged": measure(damage, damaged, readout_pairs)}
    out["damaged"]["wall_seconds"] = time.perf_counter() - start
    log(f"seed {seed}, damaged: {short(out['damaged'])}")
    for arm in arms:
        start = time.perf_counter()
        cfg = arm_config(base, arm, seed, steps, damaged, run_root)
        result = trainer.train(cfg, log=lambda *_: None)
        m = measure(cfg, str(Path(cfg.run_dir) / "embedder"), readout_pairs)
        if "rollouts" in result:
            m["rollouts"] = result["rollouts"]
            m["reward_rate"] = result["reward_rate"]
        m["wall_seconds"] = time.perf_counter() - start
        out[arm] = m
        log(f"seed {seed}, {arm}: {short(m)}")
    return out


def short(m: dict) -> str:
    r = m["readout"]
    return (f"verdict {r['readout/verdict']:.3f}, attributes {r.get('readout/attributes', float('nan')):.3f}, "
            f"R@1 {m['R@1']:.3f}")


def paired(runs: dict, a: str, b: str, seed: int = 0) -> dict:
    """Per seed and score (``SCORES``): ``paired_bootstrap`` of ``a`` minus ``b`` (same pairs / queries)."""
    from .analysis import paired_bootstrap

    out = {}
    for s, by_arm in runs.items():
        if a in by_arm and b in by_arm:
            out[s] = {name: paired_bootstrap(by_arm[a][key], by_arm[b][key], seed=seed)
                      for name, key in SCORES.items()}
    return out


def comparisons(runs: dict, arms) -> dict:
    """``{"<a> - <b>": paired(...)}``: every arm against the damaged tower, every GRPO arm against each control."""
    out = {f"{arm} - damaged": paired(runs, arm, "damaged") for arm in arms}
    for arm in arms:
        if arm not in CONTROLS:
            for control in CONTROLS:
                if control in arms:
                    out[f"{arm} - {control}"] = paired(runs, arm, control)
    return out


def summarize(runs: dict, arms) -> dict:
    """``{arm: {metric: {"mean", "std", "n"}}}`` over seeds: readout, R@1, reward rate, groups by pair kind."""
    out = {}
    for arm in ("damaged", *arms):
        values = {}
        for by_arm in runs.values():
            m = by_arm.get(arm)
            if m is None:
                continue
            flat = dict(m["readout"], **{"R@1": m["R@1"]})
            if "reward_rate" in m:
                rollouts = m["rollouts"]
                flat["reward_rate"] = m["reward_rate"]
                flat["reward_mean"] = rollouts["reward_total"] / max(rollouts["completions"], 1)
                for kind in ("same", "one_attribute", "different"):  # only of runs that replayed a group
                    if rollouts["groups_kept"]:
                        flat[f"replayed_share/{kind}"] = rollouts[f"groups_kept_{kind}"] / rollouts["groups_kept"]
            for key, value in flat.items():
                values.setdefault(key, []).append(value)
        out[arm] = {k: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}
                    for k, v in values.items()}
    return out


def markdown(record: dict) -> str:
    meta, summary = record["meta"], record["summary"]
    arms = ["damaged", *meta["arms"]]

    def cell(arm, key, digits=3):
        s = summary.get(arm, {}).get(key)
        return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" if s else "–"

    seeds = ", ".join(map(str, meta["seed_list"]))
    lines = [f"# What GRPO teaches: damage -> recovery ({meta['seeds']} seeds: {seeds})",
             "", f"Damage: {meta['damage']}, {meta['damage_steps']} steps from the supervisor's tower. Recovery: "
             f"{meta['recovery']}, {meta['steps']} steps from the damaged tower. Readout: {meta['readout_pairs']} "
             "fixed held-out pairs (half same-class, a quarter one attribute apart, a quarter random classes), greedy. "
             "Mean ± std over seeds. Right verdicts: the fraction of training rollouts with the right verdict; mean "
             "reward: what GRPO maximized (verdict reward in [0, 1], attribute reward in [0, 2]).", "",
             "| arm | verdict | same | one attr. | random | attributes | same-class descriptions agree | R@1 | "
             "right verdicts | mean reward | replayed: same / one attr. / different |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        share = " / ".join(cell(arm, f"replayed_share/{k}", 2) for k in ("same", "one_attribute", "different"))
        lines.append(f"| {arm} | {cell(arm, 'readout/verdict')} | {cell(arm, 'readout/verdict/same', 2)} | "
                     f"{cell(arm, 'readout/verdict/one_attribute', 2)} | {cell(arm, 'readout/verdict/random', 2)} | "
                     f"{cell(arm, 'readout/attributes')} | {cell(arm, 'readout/descriptions_agree/same', 2)} | "
                     f"{cell(arm, 'R@1')} | {cell(arm, 'reward_rate', 2)} | {cell(arm, 'reward_mean', 2)} | "
                     f"{share if 'replayed_share/same' in summary.get(arm, {}) else '–'} |")
    names = meta.get("attributes", [])
    if names:
        lines += ["", "Per-attribute readout (fraction of both items' values described right, mean over seeds):", "",
                  "| arm | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for arm in arms:
            lines.append(f"| {arm} | " + " | ".join(
                f"{summary[arm][f'readout/attribute/{n}']['mean']:.3f}" if f"readout/attribute/{n}" in summary.get(
                    arm, {}) else "–" for n in names) + " |")
    lines += ["", "Paired differences per seed (percentile bootstrap 95% CI, 10,000 resamples over the readout pairs "
                  "or the test queries):", "", "| comparison | seed | verdict | attributes | R@1 |",
              "|---|---|---|---|---|"]
    for name, by_seed in record["paired"].items():
        for seed, d in by_seed.items():
            lines.append(f"| {name} | {seed} | " + " | ".join(
                f"{d[k]['diff']:+.3f} [{d[k]['lo']:+.3f}, {d[k]['hi']:+.3f}]" for k in SCORES) + " |")
    return "\n".join(lines) + "\n"


def build_record(runs: dict, meta: dict) -> dict:
    return {"meta": meta, "runs": runs, "summary": summarize(runs, meta["arms"]),
            "paired": comparisons(runs, meta["arms"])}


def write_record(record: dict, out_dir) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mechanism.json").write_text(json.dumps(record, indent=1))
    (out / "mechanism.md").write_text(markdown(record))


SETTINGS = ("base_config", "arms", "steps", "damage_steps", "readout_pairs")
RUN_KEYS = ("readout", "verdict_right", "hits", "R@1")


def read_record(path) -> dict:
    """A ``mechanism.json`` written by ``write_record``: every seed (an integer) with the damaged run and every arm
    of its meta, each with ``RUN_KEYS``; ValueError naming ``path`` and what is wrong otherwise."""
    what = "a mechanism record (mechanism.json written by this module)"
    record = read_json_record(path, what, ("seed_list",) + SETTINGS)
    for seed, by_arm in record["runs"].items():
        if not seed.lstrip("-").isdigit() or not isinstance(by_arm, dict):
            raise ValueError(f"{path} is not {what}: run {seed!r} is not a seed's runs")
        for arm in ("damaged", *record["meta"]["arms"]):
            run = by_arm.get(arm)
            if not isinstance(run, dict) or any(k not in run for k in RUN_KEYS):
                raise ValueError(f"{path}: seed {seed} has no complete {arm!r} run (needs {', '.join(RUN_KEYS)})")
    return record


def merge_records(records: list) -> dict:
    """One record from several (e.g. one process per seed) made with the same settings."""
    if not records:
        raise ValueError("nothing to merge")
    for r in records[1:]:
        differ = [k for k in SETTINGS if r["meta"][k] != records[0]["meta"][k]]
        if differ:
            raise ValueError(f"cannot merge mechanism records made with different settings: {', '.join(differ)}")
    runs = {}
    for r in records:
        for seed, by_arm in r["runs"].items():
            if seed in runs:
                raise ValueError(f"seed {seed} appears in two records")
            runs[seed] = by_arm
    seeds = sorted(runs, key=int)
    meta = dict(records[0]["meta"], seeds=len(seeds), seed_list=[int(s) for s in seeds])
    return build_record({s: runs[s] for s in seeds}, meta)


def run_mechanism(base, seeds, arms, *, damage_steps: int, steps: int, readout_pairs: int, run_root, out_dir,
                  log=print) -> dict:
    from saga_train.synthetic.world import ATTRIBUTE_NAMES

    runs = {str(seed): run_seed(base, seed, arms, damage_steps=damage_steps, steps=steps,
                                readout_pairs=readout_pairs, run_root=run_root, log=log) for seed in seeds}
    meta = {"seeds": len(seeds), "seed_list": list(seeds), "arms": list(arms), "steps": steps,
            "damage_steps": damage_steps, "readout_pairs": readout_pairs, "damage": DAMAGE, "recovery": RECOVERY,
            "attributes": list(ATTRIBUTE_NAMES), "base_config": dataclasses.asdict(base)}
    record = build_record(runs, meta)
    write_record(record, out_dir)
    return record


def main(argv=None) -> int:
    from saga_train.config import ConfigError
    from saga_train.errors import UserError

    parser = argparse.ArgumentParser(prog="python -m saga_train.experiments.mechanism",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="(default: all)")
    parser.add_argument("--damage-steps", type=int, default=100, help="steps of the damage run (default 100)")
    parser.add_argument("--steps", type=int, default=100, help="steps of each recovery run (default 100)")
    parser.add_argument("--readout-pairs", type=int, default=256, help="held-out readout pairs (default 256)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="trainer Config overrides over ablation.PAPER_REGIME, shared by every run")
    parser.add_argument("--run-root", default="runs/mechanism", help="run directories (default runs/mechanism)")
    parser.add_argument("--out", default="benchmarks/results", help="where mechanism.json / .md go")
    parser.add_argument("--merge", nargs="+", metavar="MECHANISM_JSON", help="instead of running: unite records")
    args = parser.parse_args(argv)
    try:
        if args.merge:
            output_dirs(args.out)
            record = merge_records(read_records(args.merge, read_record))
            write_record(record, args.out)
        else:
            if min(args.steps, args.damage_steps, args.readout_pairs) < 1:
                raise ConfigError("--steps, --damage-steps and --readout-pairs must be >= 1")
            if len(set(args.seeds)) < len(args.seeds) or len(set(args.arms)) < len(args.arms):
                raise ConfigError("--seeds and --arms must not repeat a value")
            output_dirs(args.out, args.run_root)
            record = run_mechanism(regime_config(args.set), args.seeds, args.arms, damage_steps=args.damage_steps,
                                   steps=args.steps, readout_pairs=args.readout_pairs, run_root=args.run_root,
                                   out_dir=args.out)
    except (UserError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(record))
    print(f"written: {Path(args.out) / 'mechanism.json'}, {Path(args.out) / 'mechanism.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
