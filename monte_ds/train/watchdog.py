"""A multi-rank run that stops making progress fails with a message instead of waiting forever.

A collective that one rank never reaches (a rank-0-only forward under ZeRO-3, a rank that died
without killing the others) blocks the others until the backend's own timeout, if it has one,
and burns the allocation of every node. `StallWatchdog` counts the seconds since the last step,
save or log of this rank; past `training.ddp_timeout` (transformers' collective timeout, 1800 s by
default) it logs one line, dumps every thread's stack to stderr and exits with `EXIT_STALLED`.
Completed checkpoints stay complete: a checkpoint is marked so only once every rank has written.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

from transformers import TrainerCallback

from monte_ds.run_folder import EXIT_STALLED


logger = logging.getLogger(__name__)


def _exit_stalled(message: str) -> None:
    logger.error(message)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(EXIT_STALLED)  # the main thread is blocked in a collective: no clean exit reaches it


class StallWatchdog(TrainerCallback):
    """Exit when this rank has made no progress for `timeout_s` seconds while training."""

    def __init__(self, timeout_s: float, rank: int, on_stall: Callable[[str], None] = _exit_stalled) -> None:
        self.timeout_s = timeout_s
        self.rank = rank
        self.on_stall = on_stall
        self.step = 0
        self._last_progress = time.monotonic()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._last_progress = time.monotonic()
        self._stopped.clear()
        self._thread = threading.Thread(target=self._watch, name="monte-ds-stall-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def beat(self, step: int) -> None:
        self.step = step
        self._last_progress = time.monotonic()

    def _watch(self) -> None:
        while not self._stopped.wait(min(1.0, self.timeout_s / 4)):
            idle = time.monotonic() - self._last_progress
            if idle > self.timeout_s:
                self.on_stall(
                    f"rank {self.rank}: no training progress for {idle:.0f} s after step {self.step} "
                    f"(training.ddp_timeout = {self.timeout_s:g} s): a collective that not every rank reached; stopping"
                )
                return

    # -- TrainerCallback -------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self.step = state.global_step
        self.start()

    def on_step_end(self, args, state, control, **kwargs):
        self.beat(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        self.beat(state.global_step)

    def on_log(self, args, state, control, **kwargs):
        self.beat(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.stop()  # evaluation after training runs on the main process alone, as long as it needs
