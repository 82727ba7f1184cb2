"""Worker processes end with the process that started them (de-dup search, cache build); temporary names no
other writer uses."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> bool:
    """Ask the kernel to send this process SIGTERM when its parent dies, so a killed run leaves no idle pool
    behind (Linux; elsewhere a no-op). Call it first thing in a worker. Returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0


def writer_id() -> str:
    """Unique to this process and thread, for temporary file names: ranks may write the same file at once, as
    processes or, on XLA devices driven by threads of one process, as threads."""
    return f"{os.getpid()}-{threading.get_ident()}"
