"""The paper's ablation at small scale: synthetic world, synthetic supervisor, several seeds.

``python -m saga_train.experiments.ablation [--seeds 0 1 2] [--arms ...] [--set key=value ...]``
(``--merge a/ablation.json b/ablation.json`` unites runs made by separate processes, e.g. one per seed).

Arms (all start from the supervisor's own vision tower, same budget per seed):

- ``tower_mean_pool``: no training; the supervisor's tower with mean pooling, evaluated.
- ``pf``: Potential Field only (``lambda_lm = lambda_kl = 0``).
- ``pf_grpo``: PF + GRPO (``lambda_kl = 0``).
- ``pf_kl``: PF + attention KL (``lambda_lm = 0``; rollouts still run, they pick the teacher maps).
- ``saga``: PF + GRPO + KL.
- ``saga_generic``: full SAGA with the generic prompt (no role, no attribute list).

A seed fixes the dataset split too, so each seed gets its own supervisor
(``ensure_supervisor(SupervisorConfig(seed=s))``, trained on first use) whose held-out classes are
that seed's test classes. Writes ``ablation.json`` and ``ablation.md`` (R@1, R@4, NMI: mean +- sample
std over seeds, plus reward rate and wall time) with the supervisors' held-out accuracy, and
``training.png`` (reward rate and R@1 over training) into each ``saga`` run directory.
"""
import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

ARMS = {
    "tower_mean_pool": None,
    "pf": {"lambda_lm": 0.0, "lambda_kl": 0.0},
    "pf_grpo": {"lambda_kl": 0.0},
    "pf_kl": {"lambda_lm": 0.0},
    "saga": {},
    "saga_generic": {"prompt": "generic"},
}
METRIC_KEYS = ("R@1", "R@4", "NMI")


def arm_config(base, arm: str, seed: int, model_dir, run_root):
    """The trainer ``Config`` of one (arm, seed): ``base`` + the arm's overrides + model, seed, run dir."""
    from saga_train.config import make_config

    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; arms: {list(ARMS)}")
    # the untrained arm is evaluated only; its mean pooler is the baselines' (an empty dict is "full SAGA")
    no_training = {"pooler": "mean", "lambda_lm": 0.0, "lambda_kl": 0.0}
    overrides = dict(no_training if ARMS[arm] is None else ARMS[arm])
    return make_config(base, model=str(model_dir), seed=seed, run_dir=str(Path(run_root) / f"{arm}-seed{seed}"),
                       progress=False, **overrides)


def run_arm(cfg, arm: str) -> dict:
    """Train (or, for ``tower_mean_pool``, only evaluate) one configuration; its final metrics."""
    from saga_train import train as trainer

    start = time.perf_counter()
    if ARMS[arm] is None:
        metrics = trainer.evaluate_embedder(trainer.build_components(cfg))
        return {**{k: metrics[k] for k in METRIC_KEYS}, "wall_seconds": time.perf_counter() - start}
    result = trainer.train(cfg, log=lambda *_: None)
    after = result.get("after") or {}
    return {**{k: after.get(k, float("nan")) for k in METRIC_KEYS}, "R@1 before": result["before"]["R@1"],
            "reward_rate": result.get("reward_rate", float("nan")), "wall_seconds": result["wall_seconds"]}


def summarize(runs: dict) -> dict:
    """``{arm: {metric: {"mean", "std", "n"}}}`` from ``{arm: {seed: metrics}}`` (sample std; 0 for n = 1)."""
    out = {}
    for arm, by_seed in runs.items():
        keys = sorted({k for m in by_seed.values() for k in m})
        out[arm] = {}
        for key in keys:
            values = [m[key] for m in by_seed.values() if key in m]
            out[arm][key] = {"mean": statistics.fmean(values),
                             "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}
    return out


def markdown(summary: dict, supervisors: dict, meta: dict) -> str:
    """The results table (mean +- std over seeds) and the supervisors' held-out accuracy."""
    def cell(stats, key, digits=3):
        s = stats.get(key)
        return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" if s else "–"

    lines = [f"# SAGA ablation on the synthetic world ({meta['seeds']} seeds: {', '.join(map(str, meta['seed_list']))})",
             "", meta["note"], "",
             "| arm | R@1 | R@4 | NMI | reward rate | wall s / run |", "|---|---|---|---|---|---|"]
    for arm, stats in summary.items():
        lines.append(f"| {arm} | {cell(stats, 'R@1')} | {cell(stats, 'R@4')} | {cell(stats, 'NMI')} | "
                     f"{cell(stats, 'reward_rate', 2)} | {cell(stats, 'wall_seconds', 0)} |")
    lines += ["", "Supervisor (per seed, greedy decoding on held-out-class pairs):", "",
              "| seed | verdict acc. | attribute acc. | same / one-attr. / random verdict |", "|---|---|---|---|"]
    for seed, m in supervisors.items():
        held = m.get("heldout", {})
        kinds = held.get("verdict_accuracy_by_kind", {})
        lines.append(f"| {seed} | {held.get('verdict_accuracy', float('nan')):.3f} | "
                     f"{held.get('attribute_accuracy', float('nan')):.3f} | "
                     + " / ".join(f"{kinds.get(k, float('nan')):.2f}" for k in ("same", "one_attribute", "random"))
                     + " |")
    return "\n".join(lines) + "\n"


def run_ablation(base, seeds, arms, run_root, out_dir, supervisor_cfg=None, log=print) -> dict:
    """Every (arm, seed); writes ``ablation.json`` and ``ablation.md`` into ``out_dir``; returns the record."""
    from saga_train.experiments.plot import plot_run
    from saga_train.synthetic.supervisor import SupervisorConfig, ensure_supervisor, read_marker

    supervisor_cfg = supervisor_cfg or SupervisorConfig()
    runs, supervisors = {arm: {} for arm in arms}, {}
    for seed in seeds:
        path = ensure_supervisor(dataclasses.replace(supervisor_cfg, seed=seed, image_size=base.image_size))
        supervisors[seed] = read_marker(path)["metrics"]
        for arm in arms:
            log(f"seed {seed}, arm {arm} ...")
            cfg = arm_config(base, arm, seed, path, run_root)
            runs[arm][seed] = run_arm(cfg, arm)
            if arm == "saga":
                plot_run(cfg.run_dir)  # reward rate and R@1 over training, into the run dir
            log(f"seed {seed}, arm {arm}: " + ", ".join(f"{k}={v:.3f}" for k, v in runs[arm][seed].items()))
    summary = summarize(runs)
    meta = {"seeds": len(seeds), "seed_list": list(seeds), "arms": list(arms),
            "base_config": dataclasses.asdict(base), "supervisor_config": dataclasses.asdict(supervisor_cfg),
            "note": "Same supervisor tower init and step budget in every arm of a seed; "
                    "R@K/NMI on the held-out test classes after training."}
    record = {"meta": meta, "runs": {a: {str(s): m for s, m in r.items()} for a, r in runs.items()},
              "summary": summary, "supervisors": {str(s): m for s, m in supervisors.items()}}
    write_record(record, out_dir)
    return record


def merge_records(records: list) -> dict:
    """One ablation record from several (e.g. one process per seed): runs and supervisors united, the
    summary recomputed. The records must share their base configuration."""
    if not records:
        raise ValueError("nothing to merge")
    base = records[0]["meta"]["base_config"]
    for r in records[1:]:
        if r["meta"]["base_config"] != base:
            raise ValueError("cannot merge ablation records made with different base configurations")
    runs, supervisors, seeds, arms = {}, {}, [], []
    for r in records:
        for arm, by_seed in r["runs"].items():
            arms += [arm] if arm not in arms else []
            for seed, metrics in by_seed.items():
                if seed in runs.get(arm, {}):
                    raise ValueError(f"seed {seed} of arm {arm} appears in two records")
                runs.setdefault(arm, {})[seed] = metrics
        supervisors.update(r["supervisors"])
        seeds += [s for s in r["meta"]["seed_list"] if s not in seeds]
    meta = {**records[0]["meta"], "seeds": len(seeds), "seed_list": seeds, "arms": arms}
    return {"meta": meta, "runs": runs, "summary": summarize(runs), "supervisors": supervisors}


def write_record(record: dict, out_dir) -> None:
    """``ablation.json`` + ``ablation.md`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(record, indent=2))
    (out / "ablation.md").write_text(markdown(record["summary"], record["supervisors"], record["meta"]))


def parse_value(text: str):
    """A ``--set`` value: JSON when it parses (``200``, ``0.5``, ``true``), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv=None) -> int:
    from saga_train.config import ConfigError, Config, make_config

    parser = argparse.ArgumentParser(prog="python -m saga_train.experiments.ablation", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="trainer Config overrides shared by every arm (e.g. max_steps=200)")
    parser.add_argument("--run-root", default="runs/ablation")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--merge", nargs="+", metavar="ABLATION_JSON",
                        help="instead of running: unite ablation.json files (e.g. one process per seed) into --out")
    args = parser.parse_args(argv)
    if args.merge:
        try:
            record = merge_records([json.loads(Path(p).read_text()) for p in args.merge])
        except (OSError, ValueError, KeyError) as e:
            print(f"error: --merge: {e}", file=sys.stderr)
            return 2
        write_record(record, args.out)
        print(markdown(record["summary"], record["supervisors"], record["meta"]))
        return 0
    try:
        overrides = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
            overrides[key] = parse_value(value)
        base = make_config(Config(), **overrides)
        record = run_ablation(base, args.seeds, args.arms, args.run_root, args.out)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(record["summary"], record["supervisors"], record["meta"]))
    print(f"written: {Path(args.out) / 'ablation.json'}, {Path(args.out) / 'ablation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
