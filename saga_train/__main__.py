"""``python -m saga_train [flags]``: train SAGA; no flags = the embedded CPU default (see config.py)."""
import os
import sys

from .config import parse_args
from .errors import UserError
from .preemption import EXIT_PREEMPTED
from .train import format_metrics, train


def main(argv=None) -> int:
    """Exit status: 0 done, 2 a ``UserError`` (printed as ``error: ...``), ``EXIT_PREEMPTED`` (75) stopped by a
    preemption signal with a checkpoint (resume with ``--resume`` / ``--auto-resume``)."""
    try:
        cfg = parse_args(argv)
        result = train(cfg)
        if result.get("preempted"):
            return EXIT_PREEMPTED
        if result["rank"] == 0:  # torchrun: rank 0 reports
            report(result)
    except UserError as e:  # what the user can fix; anything else is a bug and keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def report(result: dict) -> None:
    """What a finished run prints: retrieval before -> after, the rollout totals, the plot and the run directory."""
    if result.get("after"):
        before, after = result.get("before"), result["after"]
        gain = f" (R@1 {after['R@1'] - before['R@1']:+.3f})" if before else ""
        print(f"retrieval on the held-out classes: before {format_metrics(before)} -> after {format_metrics(after)}"
              f"{gain}")
    if "reward_rate" in result:
        r = result["rollouts"]
        print(f"reward rate {result['reward_rate']:.3f} over {int(r['completions'])} completions "
              f"({int(r['unparseable'])} unparseable); {int(r['groups_contributing'])} of {int(r['pairs_drawn'])} "
              f"pairs had reward variance, {int(r['groups_kept'])} replayed; "
              f"shortfall against K: {int(r['shortfall'])}")
        shares = ", ".join(f"{k} {v:.0%}" for k, v in result["phase_share"].items())
        print(f"{result['seconds_per_step']:.2f} s/step ({shares}); wall {result['wall_seconds']:.0f} s")
    if result["random_init"]:
        print("The supervisor MLLM was randomly initialized: its verdicts are noise, so no GRPO or attention "
              "signal was meaningful in this run.")
    from .experiments.plot import plot_run  # matplotlib, only once a run is done

    print(f"R@1, reward rate and losses over training: {os.path.abspath(plot_run(result['run_dir']))}")
    print(f"run directory: {os.path.abspath(result['run_dir'])}")


if __name__ == "__main__":
    sys.exit(main())
