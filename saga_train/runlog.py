"""The run's bookkeeping: per-step records as JSON lines, totals over steps and ranks, the progress bar.

``metrics.jsonl`` holds one JSON object per line: ``{"step": k, ...}`` after step k (1-based), ``{"eval": name,
"step": k, ...}`` for an evaluation after k steps. Each record is appended with one ``write`` and synced to the disk;
a resumed run first cuts the file back to its checkpoint (``restore_records``), so that after any crash and resume
it holds exactly one record per step and per evaluation.
"""
import contextlib
import json
import os
import time

from . import distributed as dist_lib
from .rollout import RolloutStats


class RunLog:
    """Bookkeeping of a run: per-step records (phase times, losses, counts) as JSON lines, totals over
    steps (counts summed and losses averaged over ranks), the tqdm postfix, evaluation records."""

    PHASES = ("a", "b", "c", "opt")
    SUMMED = RolloutStats.counts() + ("tokens_replayed",)  # per-rank counts, summed over ranks
    AVERAGED = ("loss_dml", "loss_grpo", "loss_kl")  # L_DML: the same on every rank; L_GRPO, L_KL: world x shares

    def __init__(self, path: str, dist: dist_lib.DistInfo, *, start: int, stop: int, progress: bool, log=print):
        self.path, self.dist, self.main = path, dist, dist.is_main
        self.totals = dict.fromkeys([f"time_{p}" for p in self.PHASES] + list(self.SUMMED), 0)
        self.record = {}
        self.bar = None
        self._log = log
        if progress and self.main:
            from tqdm import tqdm

            self.bar = tqdm(total=stop, initial=start, desc="saga", dynamic_ncols=True)

    def begin(self, step: int, epoch: int) -> None:
        self.record = {"step": step + 1, "epoch": epoch}

    def add(self, **values) -> None:
        self.record.update(values)

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record[f"time_{name}"] = time.perf_counter() - start

    def end(self) -> dict:
        """Combine ranks, add to the totals, write the JSON line and the progress bar; returns the record."""
        record = self.record
        present = [k for k in self.SUMMED + self.AVERAGED if k in record]
        combined = dist_lib.all_sum({k: record[k] for k in present}, self.dist)
        for key in present:
            record[key] = combined[key] / self.dist.world_size if key in self.AVERAGED else combined[key]
        for key in self.totals:
            self.totals[key] += record.get(key, 0)
        if self.main:
            write_record(self.path, record)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(dml=f"{record['loss_dml']:.3f}", grpo=f"{record.get('loss_grpo', 0):.3f}",
                                 kl=f"{record.get('loss_kl', 0):.3f}",
                                 reward=f"{self.totals['rewarded'] / max(self.totals['completions'], 1):.2f}")
        return record

    def evaluation(self, name: str, step: int, metrics: dict) -> None:
        if self.main:
            write_record(self.path, {"eval": name, "step": step, **metrics})

    def write(self, message: str) -> None:
        (self.bar.write if self.bar is not None else self._log)(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def summary(self, steps: int, rollouts: bool) -> dict:
        """Phase shares, seconds per step and (with rollouts) the reward rate and rollout totals."""
        t = self.totals
        step_time = sum(t[f"time_{p}"] for p in self.PHASES)
        out = {"phase_share": {p: t[f"time_{p}"] / step_time for p in self.PHASES} if step_time else {},
               "seconds_per_step": step_time / max(steps, 1)}
        if rollouts:
            out["reward_rate"] = t["rewarded"] / max(t["completions"], 1)
            out["reward_mean"] = t["reward_total"] / max(t["completions"], 1)
            out["rollouts"] = {k: t[k] for k in self.SUMMED}
        return out


def write_record(path: str, record: dict) -> None:
    """Append ``record`` to the JSON-lines file ``path`` (one write, then fsync)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def restore_records(path: str, step: int) -> list:
    """Cut the metrics file ``path`` back to a checkpoint after ``step`` steps; returns the records kept.

    Keeps the records with ``"step" <= step`` (those written after the checkpoint are written again by the resumed
    run) and drops a last line a kill cut short; rewrites the file atomically. Raises ``DamagedFileError`` naming the
    file and line for any other line that is not a JSON record (the file was damaged, not cut short by a kill).
    """
    from .atomic import atomic_write_text
    from .errors import DamagedFileError

    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            ok = isinstance(record, dict) and isinstance(record.get("step"), int)
        except json.JSONDecodeError:
            ok = False
        if not ok:
            if number == len(lines):  # the last line, without its newline: a write cut short
                break
            raise DamagedFileError(f"{path}: line {number} is not a metrics record: {line[:80]!r}")
        if record["step"] <= step:
            kept.append(record)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


__all__ = ["RunLog", "restore_records", "write_record"]
