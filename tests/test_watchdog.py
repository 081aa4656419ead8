"""The stall watchdog: a multi-rank run that stops making progress exits with one line and every
thread's stack (exit 4), and a run that keeps stepping, or has finished training, is left alone."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from monte_ds.run_folder import EXIT_STALLED
from monte_ds.train.watchdog import StallWatchdog


def test_no_progress_past_the_timeout_stops_the_rank_with_a_message():
    stalled = threading.Event()
    messages: list[str] = []
    watchdog = StallWatchdog(0.3, rank=1, on_stall=lambda message: (messages.append(message), stalled.set()))
    watchdog.start()
    watchdog.beat(7)
    assert stalled.wait(5)
    watchdog.stop()
    assert len(messages) == 1
    assert messages[0].startswith("rank 1: no training progress for ") and "after step 7" in messages[0]


def test_a_rank_that_keeps_stepping_or_has_stopped_training_is_left_alone():
    messages: list[str] = []
    watchdog = StallWatchdog(0.4, rank=0, on_stall=messages.append)
    watchdog.start()
    for step in range(12):  # 1.2 s of steps, each well inside the timeout
        time.sleep(0.1)
        watchdog.beat(step)
    watchdog.stop()  # training ended: an evaluation on the main process may take as long as it needs
    time.sleep(0.8)
    assert messages == []


def test_a_stalled_process_exits_with_exit_stalled_and_dumps_its_stacks():
    script = (
        "import time\n"
        "from monte_ds.train.watchdog import StallWatchdog\n"
        "StallWatchdog(0.5, rank=0).start()\n"
        "def blocked_in_a_collective():\n"
        "    time.sleep(60)\n"
        "blocked_in_a_collective()\n"
    )
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_STALLED
    assert time.monotonic() - started < 30
    assert "rank 0: no training progress for" in result.stderr
    assert "blocked_in_a_collective" in result.stderr  # the stack of the thread that hung
