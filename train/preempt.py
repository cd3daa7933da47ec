"""Preemption: SIGTERM or SIGINT asks the loop to stop after the step in flight, checkpoint it
and exit 0; a second SIGINT aborts at once.

One process: the handler sets a flag the loop reads once per step (a Python attribute, no
device or host sync). Several processes (`jax.distributed`): every host must stop at the same
step, so the decision is JAX's preemption sync point (`reached_preemption_sync_point`), which
the coordination service agrees on in the background once any host got SIGTERM; it is a local
check per step until then. Its SIGTERM handler is JAX's own (installed by
`jax.distributed.initialize`), so here only SIGINT is handled, by passing it on as SIGTERM.

A watchdog started by the stop request ends the process (status 1, one line) if the
checkpoint is not written within `train.preempt_grace_s`, the time a scheduler waits before
SIGKILL; the unfinished save is cleared by the next start.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType

import jax

from train.metrics import console

ABORT_STATUS = 130   # 128 + SIGINT, what a shell reports for an interrupted command


def _sync_manager_running() -> bool:
    from jax._src import distributed   # JAX keeps its preemption sync manager only here
    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class Preemption:
    """Installs the handlers for the life of a `with` block; `stop_now(step)` says whether the
    loop should checkpoint `step` and return."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.signal: int | None = None
        self.received_at: float | None = None
        self.stopped_at: int | None = None
        self.multi = jax.process_count() > 1 and _sync_manager_running()
        self._previous: dict[int, object] = {}
        self._watchdog: threading.Timer | None = None

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is not threading.main_thread():
            return self   # signal handlers can only be set from the main thread
        signals = (signal.SIGINT,) if self.multi else (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.signal is not None:
            return   # stopping: a second Ctrl-C while the process winds down still aborts
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._watchdog is not None:
            self._watchdog.cancel()

    @property
    def requested(self) -> bool:
        return self.signal is not None or self.stopped_at is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None:
            if signum == signal.SIGINT:
                print("\nsecond interrupt: aborting now, without a checkpoint", file=sys.stderr,
                      flush=True)
                os._exit(ABORT_STATUS)
            return   # a repeated SIGTERM: already stopping
        self.signal, self.received_at = signum, time.monotonic()
        name = signal.Signals(signum).name
        console(f"{name}: finishing the step in flight, then checkpointing (within "
                f"{self.grace_s:g} s; a second Ctrl-C aborts without it)")
        self._start_watchdog()
        if self.multi:   # JAX's handler makes every host agree on the step to stop at
            os.kill(os.getpid(), signal.SIGTERM)

    def stop_now(self, step: int) -> bool:
        """Called once per step, right after step `step` was dispatched."""
        if self.multi:
            from jax.experimental import multihost_utils   # deferred: multi-process runs only
            stop = multihost_utils.reached_preemption_sync_point(step)
        else:
            stop = self.signal is not None
        if stop:
            self.stopped_at = step
            self._start_watchdog()
        return stop

    def _start_watchdog(self) -> None:
        if self._watchdog is not None or self.grace_s <= 0:
            return
        self.received_at = self.received_at or time.monotonic()
        self._watchdog = threading.Timer(self.grace_s, self._expired)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _expired(self) -> None:
        print(f"error: the checkpoint was not written within train.preempt_grace_s="
              f"{self.grace_s:g} s of the stop request; exiting without it (the next start "
              "resumes from the previous checkpoint)", file=sys.stderr, flush=True)
        os._exit(1)

    def elapsed(self) -> float:
        return 0.0 if self.received_at is None else time.monotonic() - self.received_at
