"""Plot a SAGA run: reward rate and R@1 over training, from the run's ``metrics.jsonl``.

``python -m saga_train.experiments.plot RUN_DIR [--out FILE.png]`` (default ``RUN_DIR/training.png``).
Step records give ``rewarded / completions`` (plotted per step and as a running mean); evaluation
records (those with an ``"eval"`` key) give R@1 at their step.
"""
import argparse
import json
import sys
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def read_curves(metrics_path, window: int = 10) -> dict:
    """``{"steps", "reward", "reward_mean", "eval_steps", "r_at_1"}`` lists from a metrics.jsonl file.

    ``reward_mean`` is the completion-weighted reward rate over the last ``window`` steps.
    """
    steps, rewarded, completions, eval_steps, r_at_1 = [], [], [], [], []
    for line in Path(metrics_path).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "eval" in record:
            if "R@1" in record:
                eval_steps.append(record.get("step", 0))
                r_at_1.append(record["R@1"])
        elif record.get("completions"):
            steps.append(record["step"])
            rewarded.append(record.get("rewarded", 0))
            completions.append(record["completions"])
    reward = [r / c for r, c in zip(rewarded, completions)]
    reward_mean = [sum(rewarded[max(0, i - window + 1):i + 1]) / sum(completions[max(0, i - window + 1):i + 1])
                   for i in range(len(steps))]
    return {"steps": steps, "reward": reward, "reward_mean": reward_mean, "eval_steps": eval_steps,
            "r_at_1": r_at_1}


def plot_run(run_dir, out=None) -> Path:
    """Write the two-panel PNG (reward rate; R@1) for ``run_dir``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}")
    curves = read_curves(metrics)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    if curves["steps"]:
        top.plot(curves["steps"], curves["reward"], ".", alpha=0.4, label="per step")
        top.plot(curves["steps"], curves["reward_mean"], "-", label="running mean (10 steps)")
        top.legend(loc="lower right")
    else:
        top.text(0.5, 0.5, "no rollouts in this run", ha="center", va="center", transform=top.transAxes)
    top.set_ylabel("reward rate")
    top.set_ylim(-0.02, 1.02)
    bottom.plot(curves["eval_steps"], curves["r_at_1"], "o-")
    bottom.set_ylabel("R@1 (held-out classes)")
    bottom.set_xlabel("step")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "training.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m saga_train.experiments.plot", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    try:
        print(plot_run(args.run_dir, args.out))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
