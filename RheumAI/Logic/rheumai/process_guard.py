"""Worker processes that die with their parent, however the parent ends (even SIGKILL).

Kept free of heavy imports: a pool worker runs :func:`die_with_parent` as its initializer right
after the interpreter starts, before it imports the work it will do, so a parent killed at any
moment leaves no worker behind for longer than the watchdog period.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, period_s: float = 0.5) -> None:
    """Pool initializer: end this process when ``parent_pid`` is no longer its parent (Linux: the kernel
    sends SIGKILL, ``prctl(PR_SET_PDEATHSIG)``; everywhere: a daemon thread checks every ``period_s`` s)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(period_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="rheumai-parent-watch").start()


def stop_pool(pool: ProcessPoolExecutor, timeout_s: float = 5.0) -> None:
    """Cancel pending jobs and end running workers at once (on an error, a cancel or a signal)."""
    pool.shutdown(wait=False, cancel_futures=True)
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=timeout_s)
