"""The paper's ablation in the paper's regime, on the synthetic world.

``python -m saga_train.experiments.ablation [--seeds 0 1 2] [--arms ...] [--set key=value ...]``
(``--merge a/ablation.json b/ablation.json`` unites runs made by separate processes, e.g. one per seed).

The regime (``PAPER_REGIME``): the supervisor knows the open pool (every class but the held-out ones: the
shipped synthetic supervisor of world seed 0); SAGA trains on a small training split (40 classes) and is
tested on the 200 held-out classes (5 images each: 1,000 queries). Arms, all from the supervisor's own
vision tower with the same step budget in a seed:

- ``untrained``: no training (the supervisor's tower, the seed's freshly initialized pooler), evaluated.
- ``dml``: the metric loss alone (``lambda_lm = lambda_kl = 0``).
- ``dml_grpo``: + GRPO (``lambda_kl = 0``).
- ``dml_kl``: + attention KL (``lambda_lm = 0``; rollouts still run: they pick the teacher maps).
- ``saga``: every loss.
- ``saga_generic``: every loss, the generic prompt (no role, no attribute list; the supervisor was taught it).
- ``dml_grpo_best`` / ``saga_best``: ``dml_grpo`` / ``saga`` with the pair sampling and reward that taught best in the
  damage -> recovery experiment (``BEST``; ``experiments/mechanism.py``).

A seed is the training seed (pooler init, batches, rollouts); the split and supervisor stay fixed. Per run:
R@K / NMI / MAP@R on the held-out classes, R@1 over training (``eval_every``), per-query R@1 hits,
per-attribute linear probes (``analysis.attribute_probes``) on the embedding and on the tower's mean token, and the
supervisor's readout of the final tower (``tower_readout``: ``--readout-pairs`` fixed held-out pairs).
Writes ``ablation.json``, ``ablation.md`` (arm table, readout table, per-seed paired differences against DML
(``PAIRED``) with bootstrap 95% CIs over the test queries, probe table) and ``ablation-curves.png`` into ``--out``.
"""
import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# the pair sampling and reward that taught the tower most in experiments/mechanism.py (benchmarks/results/mechanism.md)
# (attribute reward, balanced pairs: held-out verdict 0.70 -> 0.87 and attributes 0.76 -> 0.96 from a damaged tower in
# 100 steps of GRPO alone, 3 seeds; hard pairs with it: a little less on every seed)
BEST = {"pair_sampling": "balanced", "reward": "attributes"}
ARMS = {
    "untrained": None,
    "dml": {"lambda_lm": 0.0, "lambda_kl": 0.0},
    "dml_grpo": {"lambda_kl": 0.0},
    "dml_kl": {"lambda_lm": 0.0},
    "saga": {},
    "saga_generic": {"prompt": "generic"},
    "dml_grpo_best": {"lambda_kl": 0.0, **BEST},
    "saga_best": dict(BEST),
}
# the paper's regime at this scale (see the module docstring); --set overrides any of it
PAPER_REGIME = dict(model="synthetic-supervisor", dataset="synthetic", world_seed=0, synthetic_train_classes=40,
                    synthetic_images_per_class=8, synthetic_test_images_per_class=5, eval_every=25,
                    eval_every_epoch=False, progress=False)
METRIC_KEYS = ("R@1", "R@4", "NMI", "MAP@R")
PAIRED = (("saga", "dml"), ("dml_grpo", "dml"), ("saga_best", "dml"), ("dml_grpo_best", "dml"), ("dml_kl", "dml"))
READOUT_PAIRS = 256  # held-out pairs of the final readout of every arm


def arm_config(base, arm: str, seed: int, run_root):
    """The trainer ``Config`` of one (arm, seed): ``base`` + the arm's overrides + seed and run directory."""
    from saga_train.config import make_config

    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; arms: {list(ARMS)}")
    overrides = {} if ARMS[arm] is None else dict(ARMS[arm])
    return make_config(base, seed=seed, run_dir=str(Path(run_root) / f"{arm}-seed{seed}"), **overrides)


@dataclasses.dataclass
class Features:
    embedding: np.ndarray  # [N, D_e] unit embeddings
    tower_mean: np.ndarray  # [N, D] mean of the tower's merged tokens
    labels: np.ndarray  # [N]


def heldout_features(embedder, test_set, batch: int = 64) -> Features:
    """Embeddings and tower mean tokens of every image of ``test_set`` (eval mode, no gradients)."""
    import torch

    z_all, mean_all = [], []
    embedder.eval()
    with torch.no_grad():
        for start in range(0, len(test_set), batch):
            images = [test_set[i][0] for i in range(start, min(start + batch, len(test_set)))]
            z, _, x = embedder(**embedder.pixel_inputs(images))
            z_all.append(z.float().cpu().numpy())
            mean_all.append(x.float().mean(1).cpu().numpy())
    return Features(np.concatenate(z_all), np.concatenate(mean_all), np.asarray(test_set.labels))


def analyse(features: Features, test_set) -> dict:
    """Per-query R@1 hits and attribute probes (embedding, tower mean) of one run's test features."""
    from .analysis import attribute_probes, query_hits

    targets = np.asarray([test_set.combinations[label] for label in features.labels])
    return {"hits": query_hits(features.embedding, features.labels).astype(int).tolist(),
            "probe_embedding": attribute_probes(features.embedding, targets, features.labels),
            "probe_tower_mean": attribute_probes(features.tower_mean, targets, features.labels)}


def r_at_1_curve(run_dir) -> list:
    """``[[step, R@1], ...]`` of a run's evaluations (before, every ``eval_every`` steps, epoch ends)."""
    from .plot import METRICS_FILE, read_curves

    curves = read_curves(Path(run_dir) / METRICS_FILE)
    return [[s, r] for s, r in zip(curves["eval_steps"], curves["r_at_1"])]


def tower_readout(cfg, embedder_dir: str | None, count: int) -> dict:
    """The supervisor's readout (``saga_train.readout``) of the tower + pooler saved in ``embedder_dir`` (None: the
    run's own initial tower) on ``count`` fixed held-out pairs: ``{"readout": its metrics, "verdict_right": [P] 0/1,
    "attributes_right": [P] fraction of the pair's 2A values described right (absent without attributes)}``."""
    from saga_train import components
    from saga_train.config import make_config
    from saga_train.readout import readout_metrics
    from saga_train.train import run_readout

    comps = components.build_components(make_config(cfg, init_embedder=embedder_dir or "", readout_pairs=count))
    answers = run_readout(comps)
    out = {"readout": readout_metrics(answers), "verdict_right": answers.verdict_right.astype(int).tolist()}
    if answers.attribute_right is not None:
        out["attributes_right"] = answers.attribute_right.reshape(len(answers.kinds), -1).mean(1).tolist()
    return out


def run_arm(cfg, arm: str, readout_pairs: int = READOUT_PAIRS) -> dict:
    """Train (or, for ``untrained``, only build) one configuration; its metrics, curve, hits, probes and (with
    ``readout_pairs``) the supervisor's readout of its final tower."""
    from saga_train import components, sources
    from saga_train import train as trainer
    from saga_train.evaluate import evaluate
    from saga_train.model import load_embedder

    start = time.perf_counter()
    if ARMS[arm] is None:
        comps = components.build_components(cfg)
        embedder, test_set, out = comps.embedder, comps.test_set, {}
    else:
        result = trainer.train(cfg, log=lambda *_: None)
        embedder = load_embedder(str(Path(cfg.run_dir) / "embedder"))
        test_set = sources.load_splits(cfg)[1]
        out = {"curve": r_at_1_curve(cfg.run_dir), "seconds_per_step": result["seconds_per_step"],
               "steps": result["steps"]}
        if "reward_rate" in result:  # runs with rollouts
            out["reward_rate"] = result["reward_rate"]
    features = heldout_features(embedder, test_set)
    out.update(evaluate(features.embedding, features.labels))
    out.update(analyse(features, test_set))
    if readout_pairs:
        read = tower_readout(cfg, None if ARMS[arm] is None else str(Path(cfg.run_dir) / "embedder"), readout_pairs)
        out.update(read.pop("readout"), **read)  # the readout's metrics as scalars of the run (summarize)
    out["wall_seconds"] = time.perf_counter() - start
    return out


def summarize(runs: dict) -> dict:
    """``{arm: {metric: {"mean", "std", "n"}}}`` over seeds for the scalar metrics (sample std; 0 for n = 1); NaN
    (a value the run did not have, e.g. the reward rate of a run without rollouts) is left out."""
    out = {}
    for arm, by_seed in runs.items():
        keys = sorted({k for m in by_seed.values() for k, v in m.items()
                       if isinstance(v, (int, float)) and math.isfinite(v)})
        out[arm] = {}
        for key in keys:
            values = [m[key] for m in by_seed.values() if key in m and math.isfinite(m[key])]
            out[arm][key] = {"mean": statistics.fmean(values),
                             "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}
    return out


def paired_differences(runs: dict, pair=PAIRED[0], seed: int = 0, key: str = "hits") -> dict:
    """Per seed: ``paired_bootstrap`` of ``pair[0]`` minus ``pair[1]`` per-item scores ``key`` (``hits``: per-query
    R@1; ``verdict_right`` / ``attributes_right``: per readout pair)."""
    from .analysis import paired_bootstrap

    a, b = (runs.get(arm, {}) for arm in pair)
    return {s: paired_bootstrap(a[s][key], b[s][key], seed=seed) for s in sorted(set(a) & set(b))
            if key in a[s] and key in b[s]}


def all_paired(runs: dict, pairs=PAIRED) -> dict:
    """``{"a - b": {score: {seed: bootstrap}}}`` for every pair of ``pairs`` both present in ``runs``; scores: R@1
    (per query) and, where the runs read the supervisor, its verdict and attributes (per readout pair)."""
    out = {}
    for a, b in pairs:
        if a in runs and b in runs:
            scores = {name: {str(s): d for s, d in paired_differences(runs, (a, b), key=key).items()}
                      for name, key in (("R@1", "hits"), ("verdict", "verdict_right"),
                                        ("attributes", "attributes_right"))}
            out[f"{a} - {b}"] = {name: by_seed for name, by_seed in scores.items() if by_seed}
    return out


def probe_means(runs: dict) -> dict:
    """``{arm: {"probe_embedding": [A], "probe_tower_mean": [A]}}``: per-attribute probe accuracy, mean over seeds."""
    out = {}
    for arm, by_seed in runs.items():
        out[arm] = {key: np.mean([m[key] for m in by_seed.values() if key in m], axis=0).tolist()
                    for key in ("probe_embedding", "probe_tower_mean") if any(key in m for m in by_seed.values())}
    return out


def markdown(record: dict) -> str:
    """The arm table, the paired differences, the probe table and the supervisor's accuracy."""
    summary, meta = record["summary"], record["meta"]

    def cell(stats, key, digits=3):
        s = stats.get(key)
        return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" if s else "–"

    lines = [f"# SAGA ablation on the synthetic world ({meta['seeds']} seeds: "
             f"{', '.join(map(str, meta['seed_list']))})",
             "", meta["note"], "",
             "| arm | R@1 | R@4 | MAP@R | NMI | reward rate | steps | wall s / run |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, stats in summary.items():
        lines.append(f"| {arm} | {cell(stats, 'R@1')} | {cell(stats, 'R@4')} | {cell(stats, 'MAP@R')} | "
                     f"{cell(stats, 'NMI')} | {cell(stats, 'reward_rate', 2)} | {cell(stats, 'steps', 0)} | "
                     f"{cell(stats, 'wall_seconds', 0)} |")
    if any("readout/verdict" in stats for stats in summary.values()):
        lines += ["", "The supervisor's readout of each arm's final tower (greedy, fixed held-out pairs: half "
                      "same-class, a quarter one attribute apart, a quarter random classes):", "",
                  "| arm | verdict | same | one attribute | random | attributes | same-class descriptions agree |",
                  "|---|---|---|---|---|---|---|"]
        for arm, stats in summary.items():
            lines.append(f"| {arm} | {cell(stats, 'readout/verdict')} | {cell(stats, 'readout/verdict/same', 2)} | "
                         f"{cell(stats, 'readout/verdict/one_attribute', 2)} | "
                         f"{cell(stats, 'readout/verdict/random', 2)} | {cell(stats, 'readout/attributes')} | "
                         f"{cell(stats, 'readout/descriptions_agree/same', 2)} |")
    paired = record.get("paired", {})
    if paired:
        lines += ["", "Paired differences per seed (same queries / readout pairs; percentile bootstrap, 10,000 "
                      "resamples; 95% CI in brackets):", "", "| comparison | seed | R@1 | verdict | attributes |",
                  "|---|---|---|---|---|"]
        for name, scores in paired.items():
            for seed in scores.get("R@1", {}):
                lines.append(f"| {name} | {seed} | " + " | ".join(
                    f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]" if (d := scores.get(k, {}).get(seed))
                    else "–" for k in ("R@1", "verdict", "attributes")) + " |")
    probes = record.get("probes", {})
    names = meta.get("attributes", [])
    if probes and names:
        lines += ["", "Linear probes (logistic regression, cross-validated over held-out classes: accuracy on classes "
                      "the probe was not fitted on; mean over seeds). `untrained` is the 'before' of every arm.", "",
                  "| arm | features | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for arm, p in probes.items():
            for key, label in (("probe_embedding", "embedding"), ("probe_tower_mean", "tower mean token")):
                if key in p:
                    lines.append(f"| {arm} | {label} | " + " | ".join(f"{v:.3f}" for v in p[key]) + " |")
    held = (record.get("supervisor") or {}).get("heldout", {})
    if held:
        kinds = held.get("verdict_accuracy_by_kind", {})
        lines += ["", f"Supervisor (greedy, held-out-class pairs): verdict accuracy {held['verdict_accuracy']:.3f} "
                      f"(same / one attribute / random: "
                      + " / ".join(f"{kinds.get(k, float('nan')):.2f}" for k in ("same", "one_attribute", "random"))
                      + f"), attribute accuracy {held['attribute_accuracy']:.3f}."]
    return "\n".join(lines) + "\n"


def plot_curves(runs: dict, out_path) -> Path:
    """R@1 over training steps, one line per (arm, seed) run, one colour per arm: on [0, 1] (left) and, the same
    curves, on a y range that starts at the lowest value rounded down to 0.05 (right, titled as a zoom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saga_train.atomic import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lowest = 1.0
    for ax in axes:
        for k, (arm, by_seed) in enumerate(runs.items()):
            for n, (seed, m) in enumerate(sorted(by_seed.items())):
                colour, label = colours[k % len(colours)], arm if n == 0 else None
                if m.get("curve"):
                    steps, values = zip(*m["curve"])
                    ax.plot(steps, values, "o-", ms=3, color=colour, alpha=0.8, label=label)
                    lowest = min(lowest, *values)
                elif "R@1" in m:
                    ax.axhline(m["R@1"], color=colour, ls="--", lw=1, label=label)
                    lowest = min(lowest, m["R@1"])
        ax.set_xlabel("step")
        ax.set_ylabel("R@1 (held-out classes)")
    axes[0].set_ylim(0, 1)
    axes[0].set_title("R@1 on [0, 1]")
    floor = math.floor(lowest * 20) / 20
    axes[1].set_ylim(floor, 1)
    axes[1].set_title(f"zoom: the same curves, y from {floor:.2f}")
    axes[1].legend(loc="lower right")
    fig.tight_layout()
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out_path


def build_record(runs: dict, meta: dict, supervisor: dict) -> dict:
    """The full record: runs, summary, paired differences, probe means."""
    return {"meta": meta, "supervisor": supervisor, "runs": runs, "summary": summarize(runs),
            "paired": all_paired(runs), "probes": probe_means(runs)}


def run_ablation(base, seeds, arms, run_root, out_dir, log=print) -> dict:
    """Every (arm, seed); writes ``ablation.json``, ``ablation.md`` and ``ablation-curves.png`` into ``out_dir``."""
    from saga_train.synthetic.store import read_marker
    from saga_train.synthetic.supervisor import SupervisorConfig, shipped_or_cached
    from saga_train.synthetic.world import ATTRIBUTE_NAMES

    supervisor_path = None  # the synthetic supervisor, only when the arms use it (else its metrics are not reported)
    if base.model == "synthetic-supervisor":
        supervisor_path = shipped_or_cached(SupervisorConfig(seed=base.world_seed, image_size=base.image_size,
                                                             test_classes=base.synthetic_test_classes), log=log)
    runs = {arm: {} for arm in arms}
    for seed in seeds:
        for arm in arms:
            log(f"seed {seed}, arm {arm} ...")
            runs[arm][str(seed)] = run_arm(arm_config(base, arm, seed, run_root), arm)
            m = runs[arm][str(seed)]
            log(f"seed {seed}, arm {arm}: " + ", ".join(f"{k}={m[k]:.3f}" for k in METRIC_KEYS + ("wall_seconds",)
                                                         if k in m))
    meta = {"seeds": len(seeds), "seed_list": list(seeds), "arms": list(arms), "paired": [list(p) for p in PAIRED],
            "best": BEST,
            "attributes": list(ATTRIBUTE_NAMES), "base_config": dataclasses.asdict(base),
            "supervisor_path": str(supervisor_path) if supervisor_path else base.model,
            "note": "Same supervisor tower init and step budget in every arm of a seed; metrics on the held-out "
                    "classes after training."}
    record = build_record(runs, meta, read_marker(supervisor_path)["metrics"] if supervisor_path else {})
    write_record(record, out_dir)
    return record


def read_json_record(path, what: str, meta_keys) -> dict:
    """The JSON object of an experiment record at ``path`` with ``"meta"`` (holding ``meta_keys``) and ``"runs"``
    objects; ValueError naming ``path`` and ``what`` it should be otherwise."""
    try:
        record = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e})") from e
    if not (isinstance(record, dict) and isinstance(record.get("meta"), dict) and isinstance(record.get("runs"), dict)):
        raise ValueError(f"{path} is not {what}: no 'meta' and 'runs' objects")
    missing = [k for k in meta_keys if k not in record["meta"]]
    if missing:
        raise ValueError(f"{path} is not {what}: its meta lacks {', '.join(missing)}")
    return record


def read_records(paths, read) -> list:
    """``read(path)`` of every path (``--merge``); a UserError naming the file for any way one is not a record."""
    from saga_train.errors import UserError

    records = []
    for path in paths:
        try:
            records.append(read(path))
        except (UserError, OSError, ValueError, TypeError) as e:  # e.g. not UTF-8: name the file when e does not
            raise UserError(str(e) if str(path) in str(e) else f"{path}: {e}") from e
    return records


def read_record(path) -> dict:
    """An ``ablation.json`` written by ``write_record``; ValueError naming ``path`` when it is not one."""
    return read_json_record(path, "an ablation record (ablation.json written by this module)",
                            ("base_config", "seed_list", "note", "arms"))


def output_dirs(*paths) -> None:
    """Create the directories an experiment writes into BEFORE it runs; UserError naming one that cannot be."""
    from saga_train.errors import UserError

    for path in paths:
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{path} cannot be an output directory: {e.strerror or e}") from e


def merge_records(records: list) -> dict:
    """One ablation record from several (e.g. one process per seed): runs united, statistics recomputed.
    The records must share their base configuration."""
    if not records:
        raise ValueError("nothing to merge")
    base = records[0]["meta"]["base_config"]
    for r in records[1:]:
        if r["meta"]["base_config"] != base:
            raise ValueError("cannot merge ablation records made with different base configurations")
    runs, seeds, arms = {}, [], []
    for r in records:
        for arm, by_seed in r["runs"].items():
            arms += [arm] if arm not in arms else []
            for seed, metrics in by_seed.items():
                if seed in runs.get(arm, {}):
                    raise ValueError(f"seed {seed} of arm {arm} appears in two records")
                runs.setdefault(arm, {})[seed] = metrics
        seeds += [s for s in r["meta"]["seed_list"] if s not in seeds]
    meta = {**records[0]["meta"], "seeds": len(seeds), "seed_list": seeds, "arms": arms}
    return build_record(runs, meta, records[0].get("supervisor") or {})


def write_record(record: dict, out_dir) -> None:
    """``ablation.json``, ``ablation.md`` and ``ablation-curves.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(record, indent=1))
    (out / "ablation.md").write_text(markdown(record))
    plot_curves(record["runs"], out / "ablation-curves.png")


def parse_value(text: str):
    """A ``--set`` value: JSON when it parses (``200``, ``0.5``, ``true``), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def regime_config(settings):
    """``PAPER_REGIME`` with the ``--set KEY=VALUE`` items ``settings`` over it (``parse_value``); ConfigError for an
    item without ``=`` or a bad key / value."""
    from saga_train.config import ConfigError, make_config

    overrides = dict(PAPER_REGIME)
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = parse_value(value)
    return make_config(**overrides)


def main(argv=None) -> int:
    from saga_train.errors import UserError

    parser = argparse.ArgumentParser(prog="python -m saga_train.experiments.ablation",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="(default: all)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="trainer Config overrides over PAPER_REGIME, shared by every arm (e.g. max_steps=200)")
    parser.add_argument("--run-root", default="runs/ablation", help="run directories (default runs/ablation)")
    parser.add_argument("--out", default="benchmarks/results",
                        help="where the tables and curves go (default benchmarks/results, relative to the cwd)")
    parser.add_argument("--merge", nargs="+", metavar="ABLATION_JSON",
                        help="instead of running: unite ablation.json files (e.g. one process per seed) into --out")
    args = parser.parse_args(argv)
    if args.merge:
        try:
            output_dirs(args.out)
            record = merge_records(read_records(args.merge, read_record))
        except (UserError, OSError, ValueError) as e:
            print(f"error: --merge: {e}", file=sys.stderr)
            return 2
        write_record(record, args.out)
        print(markdown(record))
        return 0
    try:
        if len(set(args.seeds)) < len(args.seeds) or len(set(args.arms)) < len(args.arms):
            raise UserError("--seeds and --arms must not repeat a value")
        output_dirs(args.out, args.run_root)
        record = run_ablation(regime_config(args.set), args.seeds, args.arms, args.run_root, args.out)
    except (UserError, ValueError) as e:  # a setting, a path, a missing or damaged file (e.g. metrics.jsonl)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(record))
    print(f"written: {Path(args.out) / 'ablation.json'}, {Path(args.out) / 'ablation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
