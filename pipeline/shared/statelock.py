"""One process per state file: a second `cityops run` on the same state is refused at once.

Two processes on one state would replay each other's journal and snapshot over each other's
work. The lock is an advisory ``flock`` on ``<state>.lock`` holding the holder's pid: the
kernel drops it when the process ends, however it ends (kill -9 included), so a stale lock
file never blocks a restart.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from rules.yamlfile import ConfigError


class StateLock:
    def __init__(self, state_path: Path) -> None:
        self.state_path = state_path
        self.path = state_path.with_name(state_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise ConfigError naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(self.state_path, None, f"in use by another cityops (pid {holder}); "
                              "stop it first, or give this one its own --state") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        # The file stays: unlinking it would let a third process lock a new file while a
        # second still waits on the old one.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
