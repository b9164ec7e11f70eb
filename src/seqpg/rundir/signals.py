"""Signals a training run answers: stop after the current step (SIGINT, SIGTERM), or checkpoint now (SIGUSR1).

SIGTERM is what SLURM, Kubernetes, ``docker stop`` and systemd send before they kill a
process; like Ctrl-C it finishes the step in flight, saves a checkpoint and stops, and the
command then exits with :data:`EXIT_STOPPED` so a scheduler can tell "stopped early,
resumable" from "done".  SIGUSR1 asks for a checkpoint after the current step and the run
goes on.  Under ``torchrun`` the trainer agrees on both requests over all processes
(``DistContext.any``), so every process stops, or saves, after the same step.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

EXIT_STOPPED = 3
"""Exit status of ``seqpg train`` when a stop signal ended it before ``steps``, after saving a checkpoint:
continue with ``seqpg train --resume RUN``.  (Reaching ``max_minutes`` is what was asked: status 0.)"""

STOP_SIGNALS: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)
CHECKPOINT_SIGNALS: tuple[int, ...] = tuple(s for s in (getattr(signal, "SIGUSR1", None),) if s is not None)


class StopFlag:
    """Turns stop signals into a request to stop after the current step, and SIGUSR1 into a checkpoint request.

    Used as a context manager around the training loop::

        with StopFlag() as stop:
            for step in ...:
                train_step(...)
                if stop.is_set() or stop.take_checkpoint_request():
                    save_checkpoint(...)
                if stop.is_set():
                    break

    Inside the block the first stop signal only sets the flag (and says so on stderr); a second
    one raises ``KeyboardInterrupt`` as usual, for when the step itself hangs.  A checkpoint
    signal sets a request that :meth:`take_checkpoint_request` returns once.  The previous
    handlers are restored on exit.  Outside the main thread no handler can be installed: the
    flag then only reacts to :meth:`set`.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS, announce: bool = True,
                 checkpoint_signals: tuple[int, ...] = CHECKPOINT_SIGNALS):
        self.signals = tuple(signals)
        self.checkpoint_signals = tuple(checkpoint_signals)
        self.announce = announce
        self.received: int | None = None
        self._event = threading.Event()
        self._checkpoint = threading.Event()
        self._previous: dict[int, Any] = {}

    def is_set(self) -> bool:
        return self._event.is_set()

    def __bool__(self) -> bool:
        return self.is_set()

    def set(self) -> None:
        self._event.set()

    def request_checkpoint(self) -> None:
        self._checkpoint.set()

    def take_checkpoint_request(self) -> bool:
        """True once after each checkpoint signal (the request is then cleared)."""
        if not self._checkpoint.is_set():
            return False
        self._checkpoint.clear()
        return True

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
            for sig in self.checkpoint_signals:
                self._previous[sig] = signal.signal(sig, self._handle_checkpoint)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self._event.is_set():
            raise KeyboardInterrupt
        self.received = signum
        self._event.set()
        if self.announce:
            print(f"\n{signal.Signals(signum).name}: finishing the current step, then saving a checkpoint "
                  "and stopping (press Ctrl-C again to abort at once)", file=sys.stderr, flush=True)

    def _handle_checkpoint(self, signum: int, frame: Any) -> None:
        self._checkpoint.set()
        if self.announce:
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after the current step, then "
                  "going on", file=sys.stderr, flush=True)
