"""bench/harness.py: the process harness of the bench and the integration tests, on plain Python children."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from bench import harness
from bench.harness import Processes

# A child that logs, forks one child of its own (a worker's pool), and exits 0 on SIGTERM.
CHILD = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
if os.fork() == 0:
    time.sleep(60)
    os._exit(0)
print("ready.", flush=True)
time.sleep(60)
"""


def test_spawn_wait_log_pids_terminate_and_restart(tmp_path: Path) -> None:
    procs = Processes(root=tmp_path)
    procs.spawn("child", [sys.executable, "-c", CHILD])
    procs.wait_log("child", "ready.", timeout=30)
    assert procs.running("child")
    assert len(procs.pids("child")) == 2  # the child and its own child
    assert procs.terminate("child", timeout=30) == 0
    assert not procs.running("child")
    # Started again: the log is appended to, and a wait looks only at what came after.
    procs.spawn("child", [sys.executable, "-c", "print('second', flush=True)"])
    procs.wait_log("child", "second", timeout=30)
    with pytest.raises(RuntimeError, match="exited with 0"):
        procs.wait_log("child", "ready.", timeout=30)  # an earlier run's line does not count
    assert procs.log("child").count("ready.") == 1 and "second" in procs.log("child")
    procs.stop_all()


def test_stop_ends_the_whole_group_and_a_wait_times_out(tmp_path: Path) -> None:
    procs = Processes(root=tmp_path)
    proc = procs.spawn("sleeper", [sys.executable, "-c", CHILD])
    procs.wait_log("sleeper", "ready.", timeout=30)
    pids = procs.pids("sleeper")
    procs.stop("sleeper", grace=10)
    assert proc.returncode is not None
    alive = [pid for pid in pids if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)]
    harness.wait_until(lambda: not [p for p in alive if Path(f"/proc/{p}").exists() and "Z" not in _state(p)],
                       10, "the forked grandchild to be gone")
    with pytest.raises(harness.Timeout):
        harness.wait_until(lambda: False, 0.2, "nothing")
    assert harness.free_port() > 0


def test_kill_sends_the_signal_to_the_group(tmp_path: Path) -> None:
    procs = Processes(root=tmp_path)
    proc = procs.spawn("child", [sys.executable, "-c", CHILD])
    procs.wait_log("child", "ready.", timeout=30)
    procs.kill("child", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert procs.logs().startswith("--- child ---\nready.")


def test_commands_of_the_procfile_processes() -> None:
    assert harness.web(8000)[1:4] == ["-m", "flowplay.web", "-b"]
    assert "flowplay.serve" in harness.web(8000, processes=2)
    argv = harness.worker("w@h", "default,second", 3)
    assert argv[1:4] == ["-A", "flowplay", "worker"] and ["-Q", "default,second"] == argv[8:10]
    assert harness.worker("w@h", module="bench.worker")[1:4] == ["-m", "bench.worker", "--loglevel"]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
