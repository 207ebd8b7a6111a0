"""Preemption: stop after the step in flight, with a checkpoint, when the cluster says the job will be killed.

SLURM, Kubernetes and spot instances send SIGTERM some seconds before SIGKILL; SLURM's ``--signal=USR1@120`` sends a
chosen signal earlier. ``PreemptionWatch`` catches SIGTERM and ``--preempt-signal`` (a flag set by the handler, no
work inside it); the trainer asks ``requested`` after every step, where the ranks of a torchrun job agree (a signal
seen by one rank stops all after the same step), writes a checkpoint and exits with ``EXIT_PREEMPTED`` (75,
``EX_TEMPFAIL`` of sysexits.h: try again), which a job script turns into a requeue.
"""
import os
import signal
import threading

from . import distributed as dist_lib
from .errors import ConfigError

EXIT_PREEMPTED = 75
UNCATCHABLE = ("SIGKILL", "SIGSTOP")


def signal_number(name: str) -> signal.Signals:
    """``signal.Signals`` for ``"USR1"`` / ``"SIGUSR1"`` / ``"10"``; ConfigError for a name this OS lacks or a
    signal a process cannot catch."""
    text = name.strip().upper()
    try:
        sig = signal.Signals(int(text)) if text.isdigit() else signal.Signals[text if text.startswith("SIG")
                                                                                else "SIG" + text]
    except (KeyError, ValueError):
        raise ConfigError(f"preempt_signal={name!r} is not a signal name of this OS (e.g. USR1, USR2, INT)") from None
    if sig.name in UNCATCHABLE:
        raise ConfigError(f"preempt_signal={name!r}: {sig.name} cannot be caught")
    return sig


class PreemptionWatch:
    """Context manager catching SIGTERM and ``extra_signal`` (a name; "" for none) while a run trains (or, after it,
    while the CLI writes its report and plot); ``message`` is what it prints when one arrives.

    The handlers only record the signal (and say so on stderr); forked DataLoader workers inherit them and ignore the
    signal (the trainer shuts them down). ``requested(dist)`` tells whether any rank got one
    (an all-reduce under torchrun, so every rank stops after the same step). Outside the main thread (where Python
    cannot install handlers) it watches nothing. The previous handlers come back on exit.
    """

    def __init__(self, extra_signal: str = "", message: str = "stopping after the step in flight, with a checkpoint"):
        self.message = message
        self.signals = [signal.SIGTERM] + ([signal_number(extra_signal)] if extra_signal else [])
        self.received = None
        self._previous = {}
        self._pid = os.getpid()

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:  # a forked DataLoader worker: the trainer stops it
            return
        if self.received is None:
            self.received = signal.Signals(signum).name
            os.write(2, f"\n{self.received} received: {self.message}\n".encode())

    def __enter__(self):
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for sig in dict.fromkeys(self.signals):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def requested(self, dist: dist_lib.DistInfo) -> bool:
        """Whether a watched signal reached this rank or, under torchrun, any rank (a collective: call it on every
        rank at the same point)."""
        return bool(dist_lib.all_max([int(self.received is not None)], dist)[0])


__all__ = ["EXIT_PREEMPTED", "PreemptionWatch", "signal_number"]
