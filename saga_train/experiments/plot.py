"""Plot a SAGA run from its ``metrics.jsonl``: held-out R@1, reward rate and each loss over training.

``python -m saga_train.experiments.plot RUN_DIR [--out FILE.png]`` (default ``RUN_DIR/training.png``).
Evaluation records (those with an ``"eval"`` key) give R@1 at their step and, where the run read the supervisor
(``--readout-pairs``), its readout: verdict accuracy by pair kind and attribute accuracy (readout.py); step records
give the reward rate ``rewarded / completions`` and the losses ``loss_dml``, ``loss_grpo``, ``loss_kl`` (each per
step and as a running mean; L_GRPO and L_KL only of steps that replayed a group, ``groups_kept > 0``). Axes are
honest: R@1, the readout and the reward rate on [0, 1], every loss on its own full range.
"""
import argparse
import json
import sys
from pathlib import Path

from saga_train.atomic import atomic_path
from saga_train.errors import ConfigError, DamagedFileError, MissingFileError, UserError
from saga_train.files import is_kind, read_bytes
from saga_train.readout import PREFIX as READOUT

METRICS_FILE = "metrics.jsonl"
LOSSES = {"loss_dml": "L_DML", "loss_grpo": "L_GRPO", "loss_kl": "L_KL"}


def running_mean(values: list, window: int) -> list:
    """Mean of the last ``window`` values at each position."""
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def _record(line: bytes):
    """The JSON object on one line of a metrics file; ValueError (the reason) when it is not one."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text, byte {e.start + 1}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{e.msg}: column {e.colno}") from e
    if not isinstance(record, dict):
        raise ValueError(f"a JSON {type(record).__name__}, not an object")
    return record


NUMBERS = ("R@1", "completions", "rewarded", "groups_kept") + tuple(LOSSES)


def _check_types(record: dict, where: str) -> None:
    """The values the plot reads are numbers (``step`` an integer, required where a value is plotted)."""
    for key in NUMBERS + tuple(k for k in record if k.startswith(READOUT)):
        if key in record and not is_kind(record[key], (int, float)):
            raise DamagedFileError(f"{where}: {key!r} must be a number, got {record[key]!r}")
    if "step" in record and not is_kind(record["step"], int):
        raise DamagedFileError(f"{where}: 'step' must be an integer, got {record['step']!r}")
    if "eval" not in record and "step" not in record and any(key in record for key in ("completions", *LOSSES)):
        raise DamagedFileError(f"{where}: a step record without 'step'")


def read_curves(metrics_path, window: int = 10) -> dict:
    """Lists from a metrics.jsonl file: ``steps``, ``reward``, ``reward_mean`` (completion-weighted over the last
    ``window`` steps with rollouts), ``eval_steps``, ``r_at_1``, ``readout`` (per readout key without its
    ``readout/`` prefix, e.g. ``verdict/same``, ``{"steps", "values"}`` of the evaluations), per loss key of
    ``LOSSES`` present in the records ``{"steps", "values", "mean"}`` under ``curves["losses"][key]``, and
    ``logged``: the loss keys any step record had. An incomplete LAST line (a run killed while writing it) is
    skipped with a warning; any other line
    that is not a JSON object (torn, garbage, not UTF-8), a value the plot reads that is not a number, or a file
    without any record raises ``DamagedFileError`` (a ValueError) naming the file and the line."""
    steps, rewarded, completions, eval_steps, r_at_1 = [], [], [], [], []
    losses = {key: {"steps": [], "values": []} for key in LOSSES}
    readout = {}
    logged = set()
    raw = read_bytes(metrics_path, allow_empty=True)
    lines = [(n, line) for n, line in enumerate(raw.split(b"\n"), 1) if line.strip()]
    records = []
    for k, (n, line) in enumerate(lines):
        try:
            records.append((n, _record(line)))
        except ValueError as e:
            if k == len(lines) - 1:  # a run killed while writing its last line: plot what came before
                print(f"warning: {metrics_path}:{n}: incomplete last line skipped", file=sys.stderr)
                break
            raise DamagedFileError(f"{metrics_path}:{n} is not a JSON record ({e}); only a torn last line is "
                                   "skipped") from e
    if not records:
        raise DamagedFileError(f"{metrics_path}: " + ("the file is empty" if not lines else "no complete record"))
    for n, record in records:
        _check_types(record, f"{metrics_path}:{n}")
        logged.update(key for key in LOSSES if key in record)
        if "eval" in record:
            if "R@1" in record:
                eval_steps.append(record.get("step", 0))
                r_at_1.append(record["R@1"])
            for key in (k for k in record if k.startswith(READOUT)):
                curve = readout.setdefault(key[len(READOUT):], {"steps": [], "values": []})
                curve["steps"].append(record.get("step", 0))
                curve["values"].append(record[key])
            continue
        replayed = record.get("groups_kept", 1) > 0  # L_GRPO / L_KL of a step that replayed nothing: not a value
        for key, curve in losses.items():
            if key in record and (replayed or key == "loss_dml"):
                curve["steps"].append(record["step"])
                curve["values"].append(record[key])
        if record.get("completions"):
            steps.append(record["step"])
            rewarded.append(record.get("rewarded", 0))
            completions.append(record["completions"])
    reward = [r / c for r, c in zip(rewarded, completions)]
    reward_mean = [sum(rewarded[max(0, i - window + 1):i + 1]) / sum(completions[max(0, i - window + 1):i + 1])
                   for i in range(len(steps))]
    for curve in losses.values():
        curve["mean"] = running_mean(curve["values"], window)
    return {"steps": steps, "reward": reward, "reward_mean": reward_mean, "eval_steps": eval_steps,
            "r_at_1": r_at_1, "losses": {k: c for k, c in losses.items() if c["steps"]}, "logged": sorted(logged),
            "readout": readout}


def plot_run(run_dir, out=None) -> Path:
    """Write the PNG (R@1; reward rate; L_DML; L_GRPO; L_KL; the supervisor's readout) for ``run_dir``; returns its
    path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        raise MissingFileError(f"no {METRICS_FILE} in {run_dir}")
    curves = read_curves(metrics)
    fig, axes = plt.subplots(3, 2, figsize=(10, 9), sharex=True)
    r1, reward, *loss_axes = axes.flat
    r1.plot(curves["eval_steps"], curves["r_at_1"], "o-")
    for step, value in zip(curves["eval_steps"], curves["r_at_1"]):
        r1.annotate(f"{value:.3f}", (step, value), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    r1.set_ylim(0, 1)
    r1.set_ylabel("R@1 (held-out classes)")
    if curves["steps"]:
        reward.plot(curves["steps"], curves["reward"], ".", alpha=0.4, label="per step")
        reward.plot(curves["steps"], curves["reward_mean"], "-", label="running mean (10 steps)")
        reward.legend(loc="lower right")
    else:
        reward.text(0.5, 0.5, "no rollouts in this run", ha="center", va="center", transform=reward.transAxes)
    reward.set_ylim(-0.02, 1.02)
    reward.set_ylabel("reward rate")
    for ax, (key, name) in zip(loss_axes, LOSSES.items()):
        curve = curves["losses"].get(key)
        if curve:
            ax.plot(curve["steps"], curve["values"], ".", alpha=0.4, label="per step")
            ax.plot(curve["steps"], curve["mean"], "-", label="running mean (10 steps)")
            ax.legend(loc="upper right")
        else:
            why = "no step of this run replayed a group" if key in curves["logged"] else "off in this run"
            ax.text(0.5, 0.5, f"{name}: {why}", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel(name)
    plot_readout(loss_axes[-1], curves["readout"])
    for ax in (loss_axes[2], loss_axes[3]):
        ax.set_xlabel("step")
    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "training.png"
    try:
        if not out.name:
            raise ConfigError(f"--out {str(out)!r} names no file")
        with atomic_path(out) as tmp:  # the format said, so that matplotlib writes exactly tmp (no ".png" added)
            fig.savefig(tmp, dpi=100, format=out.suffix[1:] or "png")
    except ValueError as e:  # matplotlib: an extension it cannot write
        raise ConfigError(f"--out {out}: {e}") from e
    finally:
        plt.close(fig)
    return out


READOUT_LINES = {"verdict": "verdict, all pairs", "verdict/same": "verdict, same class",
                 "verdict/one_attribute": "verdict, one attribute apart", "verdict/random": "verdict, random classes",
                 "attributes": "attributes described right", "descriptions_agree/same": "same-class descriptions agree"}


def plot_readout(ax, readout: dict) -> None:
    """The supervisor's readout at each evaluation (``READOUT_LINES`` present in the run) on [0, 1]."""
    shown = [key for key in READOUT_LINES if key in readout]
    for key in shown:
        ax.plot(readout[key]["steps"], readout[key]["values"], "o-", ms=3, label=READOUT_LINES[key])
    if shown:
        ax.legend(loc="lower left", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no supervisor readout in this run\n(--readout-pairs 0)", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("supervisor readout (held-out pairs)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m saga_train.experiments.plot", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    try:
        print(plot_run(args.run_dir, args.out))
    except (UserError, OSError) as e:  # anything else is a bug and keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
