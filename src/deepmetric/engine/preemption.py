"""Preemption: SIGTERM (how SLURM and Kubernetes stop a job), SIGINT (Ctrl-C) and SIGUSR1 (a
SLURM ``--signal`` warning) end a training run cleanly instead of killing it.

While :class:`StopSignals` is active, these signals only record that a stop was asked for.
The trainer asks :meth:`StopSignals.requested` after every step; under torchrun the answer
is the same on every rank (one all-reduce of one integer per step), so all ranks stop after
the same step, rank 0 writes a checkpoint, and the command exits with :data:`EXIT_STOPPED`.
Repeated signals change nothing (torchrun forwards a Ctrl-C that the workers also got from
the terminal); SIGKILL still stops at once, the last checkpoint intact.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

from deepmetric import distributed as dist

__all__ = ["EXIT_STOPPED", "STOP_SIGNALS", "StopSignals", "ignore_stop_signals"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
EXIT_STOPPED = 75  # sysexits EX_TEMPFAIL: stopped on request, a checkpoint written; resume


def _exit_quietly(signum: int, frame: FrameType | None) -> None:
    os._exit(0)


def ignore_stop_signals() -> None:
    """In a DataLoader worker: leave SIGINT and SIGUSR1 to the main process (a Ctrl-C in the
    terminal reaches the workers too), and end on SIGTERM with status 0 (multiprocessing ends
    workers with SIGTERM, so it cannot be ignored; status 0, unlike a death by signal, does
    not abort the main process's step in progress)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_quietly)


class StopSignals:
    """Context manager: SIGTERM, SIGINT and SIGUSR1 set a flag instead of ending the process
    (only in the main thread, where Python delivers signals; elsewhere it does nothing).
    The previous handlers are restored on exit."""

    def __init__(self) -> None:
        self.received = 0  # the first signal's number, 0 before any
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signum

    def requested(self) -> str | None:
        """The name of the signal that asks to stop ("SIGTERM" ...), from any rank, or None.
        Every rank gets the same answer (one all-reduce under torchrun)."""
        signum = dist.max_over_ranks(self.received)
        return signal.Signals(signum).name if signum else None
