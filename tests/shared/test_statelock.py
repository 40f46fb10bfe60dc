"""One process per state file (pipeline/shared/statelock.py): a second holder is refused with the
first one's pid, and a holder killed with -9 leaves nothing that blocks the restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from pipeline.shared.statelock import StateLock
from rules.yamlfile import ConfigError

HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pipeline.shared.statelock import StateLock
    StateLock(Path(sys.argv[1])).acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def test_a_second_holder_is_refused_with_the_first_ones_pid_and_a_kill_9_frees_it(tmp_path) -> None:
    state = tmp_path / "state" / "cityops.state"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(state)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"      # it holds the lock now
        with pytest.raises(ConfigError) as refused:
            StateLock(state).acquire()
        assert f"in use by another cityops (pid {holder.pid})" in str(refused.value)
        assert "--state" in str(refused.value)                  # what to do about it
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    lock = StateLock(state)
    lock.acquire()                                              # the stale file blocks nothing
    assert lock.path.read_text().strip() == str(os.getpid())
    lock.release()
