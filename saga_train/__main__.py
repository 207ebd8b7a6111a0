"""``python -m saga_train [flags]``: train SAGA; no flags = the embedded CPU default (see config.py)."""
import os
import sys

from .config import parse_args
from .data.samplers import PAIR_KINDS
from .errors import UserError
from .preemption import EXIT_PREEMPTED, PreemptionWatch
from .readout import format_readout
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
            # the run is complete: a preemption signal now waits for the plot (a second or so), then the exit is 0
            with PreemptionWatch(cfg.preempt_signal, message="the run is complete; finishing its report and plot"):
                report(result)
    except UserError as e:  # what the user can fix; anything else is a bug and keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def report(result: dict) -> None:
    """What a finished run prints: retrieval before -> after, the supervisor's readout after (and before), the rollout
    totals (by pair kind), the plot and the run directory."""
    if result.get("after"):
        before, after = result.get("before"), result["after"]
        gain = f" (R@1 {after['R@1'] - before['R@1']:+.3f})" if before else ""
        print(f"retrieval on the held-out classes: before {format_metrics(before)} -> after {format_metrics(after)}"
              f"{gain}")
    before, after = (format_readout(result.get(k) or {}) for k in ("before", "after"))
    if after:
        print(f"{after}" + (f"\n  (before training: {before.split(': ', 1)[1]})" if before else ""))
    if "reward_rate" in result:
        r = result["rollouts"]
        mean = f", mean reward {result['reward_mean']:.3f}" if result["reward_mean"] != result["reward_rate"] else ""
        print(f"reward rate (right verdicts) {result['reward_rate']:.3f}{mean} over {int(r['completions'])} "
              f"completions ({int(r['unparseable'])} unparseable); {int(r['groups_contributing'])} of "
              f"{int(r['pairs_drawn'])} pairs had reward variance, {int(r['groups_kept'])} replayed; "
              f"shortfall against K: {int(r['shortfall'])}")
        kinds = [k for k in PAIR_KINDS if r.get(f"pairs_drawn_{k}")]
        print("  by pair kind (drawn / with reward variance / replayed): " + "; ".join(
            f"{k} {int(r[f'pairs_drawn_{k}'])} / {int(r[f'groups_contributing_{k}'])} / {int(r[f'groups_kept_{k}'])}"
            for k in kinds))
        shares = ", ".join(f"{k} {v:.0%}" for k, v in result["phase_share"].items())
        print(f"{result['seconds_per_step']:.2f} s/step ({shares}); wall {result['wall_seconds']:.0f} s")
    if result["random_init"]:
        print("The supervisor MLLM was randomly initialized: its verdicts are noise, so no GRPO or attention "
              "signal was meaningful in this run.")
    from .experiments.plot import plot_run  # matplotlib, only once a run is done

    plot = os.path.abspath(plot_run(result["run_dir"]))
    print(f"R@1, reward rate, losses and the supervisor readout over training: {plot}")
    print(f"run directory: {os.path.abspath(result['run_dir'])}")


if __name__ == "__main__":
    sys.exit(main())
