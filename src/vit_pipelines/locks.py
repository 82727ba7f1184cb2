"""One run at a time per data folder: a lock file holding the holder's PID, host, start time and command.

Two `kedro run`s writing into the same folder would share the cache's `.partial` folder and one run's
checkpoints (the second silently resuming the first's). The lock refuses the second run with the first one
named; a lock whose process is gone (same host) is stale and taken over with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class FolderLockedError(RuntimeError):
    """Another live run holds the folder's lock."""


class RunLock:
    """`with RunLock(folder):` or `acquire()` / `release()`; the file is `folder/.run.lock`."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / ".run.lock"
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        }
        for _ in range(2):  # a second try after removing a stale lock
            try:
                with open(self.path, "x") as f:  # O_EXCL: exactly one process creates it
                    json.dump(me, f)
                self.held = True
                return
            except FileExistsError:
                holder = _read(self.path)
                if _alive(holder):
                    raise FolderLockedError(
                        f"another run is writing into {self.path.parent}: pid {holder.get('pid')} on "
                        f"{holder.get('host')} since {holder.get('started')} ({holder.get('command')!r}). Wait for "
                        f"it, point data_root elsewhere, or delete {self.path} if that run is gone"
                    ) from None
                log.warning("removing a stale lock %s of a run that is gone: %s", self.path, holder)
                self.path.unlink(missing_ok=True)
        raise FolderLockedError(f"cannot take the lock {self.path}: another run took it meanwhile")

    def release(self) -> None:
        if self.held and _read(self.path).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # empty or damaged: no holder to wait for


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the lock's process may still run: on this host, whether its PID exists; elsewhere, assume so."""
    if not holder:
        return False
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return isinstance(holder.get("pid"), int)
    return True
