"""A test seam, nothing else: `cityops worker` whose reading of changed files takes 3 s.

A worker that is told of a reload reads the files in a thread while its partitions go on; a
checkpoint made in that time must not acknowledge the announcement it has not taken yet
(tests/runtimes/test_reload_kafka.py). On this machine the read takes a few milliseconds, so the window
is hit by chance; ``python -m tests.slow_read_seam worker`` makes it wide enough to be hit
every time.
"""

from __future__ import annotations

import sys
import threading
import time

from pipeline.runtimes.reload_kafka import KafkaReload

READ_SECONDS = 3.0
_read = KafkaReload._read


def _slow_read(self: KafkaReload) -> None:
    if threading.current_thread() is not threading.main_thread():
        time.sleep(READ_SECONDS)     # time is the thing: the read is slow, the window wide
    _read(self)


def install() -> None:
    KafkaReload._read = _slow_read


if __name__ == "__main__":
    from pipeline.cli import main
    install()
    sys.exit(main())
