"""Start flowplay's processes, wait until they serve, stop them: one harness for the bench and the tests.

``Processes`` starts commands (the Procfile's web, worker and beat, ``make run``, or any
other) as named subprocesses, each in a process group of its own (so a worker and its pool
are signalled together and nothing else is), with one environment and one log file per name
in a folder. Waits are deadlines on an observed condition (the health URL answers, a line
appears in a log), never fixed sleeps. ``manage.py bench`` and the integration tests
(``tests/integration``: the session server, ``Cluster``, the network-namespace ``Fleet``)
use it; ``prefix`` runs a command inside something else (``ip netns exec <ns>``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BIN = Path(PYTHON).parent  # the environment's celery, daphne, …
# Variables of a test run or of this process's configuration that a child must not inherit.
RUNNER_VARS = ("PYTEST", "DJANGO_SETTINGS", "PROMETHEUS_MULTIPROC")
CONFIG_VARS = ("FLOWPLAY_", "CELERY_", "DATABASE_URL", "REDIS_URL", "SQLITE_PATH")


class Timeout(AssertionError):
    """A condition was not met by its deadline (an AssertionError, so a test reads as failed)."""


def free_port(preferred: int | None = None) -> int:
    """A free TCP port of 127.0.0.1: ``preferred`` if it is free, else one the kernel picks."""
    if preferred:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                pass
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    """Call ``condition`` until it returns a true value (returned); a connection error counts as
    not yet. Raises ``Timeout`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except (httpx.HTTPError, OSError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise Timeout(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def child_env(*, keep_config: bool = True, **extra: str) -> dict[str, str]:
    """This process's environment for a child: without the test runner's variables and, with
    ``keep_config=False``, without the database, broker and flowplay settings too."""
    drop = RUNNER_VARS if keep_config else RUNNER_VARS + CONFIG_VARS
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(extra)
    return env


# --- The Procfile's processes ----------------------------------------------------------------


def web(port: int, host: str = "127.0.0.1", *, processes: int | None = None,
        app: str = "flowplay.asgi:application", args: Sequence[str] = ()) -> list[str]:
    """The web process: one Daphne with the request-body guard (``flowplay.web``), or with
    ``processes``, ``flowplay.serve``'s Daphne processes on one socket (the Procfile's)."""
    if processes is None:
        return [PYTHON, "-m", "flowplay.web", "-b", host, "-p", str(port), *args, app]
    return [PYTHON, "-m", "flowplay.serve", "--host", host, "--port", str(port),
            "--processes", str(processes), "--app", app, *args]


def worker(name: str, queues: str = "default", concurrency: int = 2, *, loglevel: str = "INFO",
           module: str | None = None, args: Sequence[str] = ()) -> list[str]:
    """A Celery worker on ``queues`` (``module``: ``python -m <module> <worker options>`` instead of
    ``celery -A flowplay worker``)."""
    head = [PYTHON, "-m", module] if module else [str(BIN / "celery"), "-A", "flowplay", "worker"]
    return [*head, "--loglevel", loglevel, "--concurrency", str(concurrency), "-Q", queues,
            "-n", name, "--without-gossip", "--without-mingle", *args]


def beat(schedule: Path, loglevel: str = "INFO") -> list[str]:
    return [str(BIN / "celery"), "-A", "flowplay", "beat", "--loglevel", loglevel, "-s", str(schedule)]


# --- The harness -------------------------------------------------------------------------------


@dataclass
class Processes:
    """Named subprocesses started with ``env`` (this process's if empty), logs in ``root``."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    marks: dict[str, int] = field(default_factory=dict)  # log size when each was last started

    def log_path(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def spawn(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
              prefix: Sequence[str] = ()) -> subprocess.Popen:
        """Start ``name`` (unless it runs): its own process group, stdout and stderr to its log
        (new for this harness, appended to when the same name starts again)."""
        old = self.procs.get(name)
        if old is not None and old.poll() is None:
            return old
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.log_path(name)
        mode = "ab" if name in self.procs else "wb"
        self.marks[name] = path.stat().st_size if mode == "ab" and path.exists() else 0
        with path.open(mode) as log:
            proc = subprocess.Popen([*prefix, *argv], cwd=ROOT, env={**(self.env or os.environ), **(env or {})},
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def running(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def check_alive(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")

    def wait_healthy(self, url: str, name: str | None = None, timeout: float = 90) -> None:
        """Until ``url``/api/health answers 200; fails at once if ``name`` exits meanwhile."""

        def healthy() -> bool:
            if name is not None:
                self.check_alive(name)
            return httpx.get(f"{url}/api/health", timeout=3).status_code == 200

        wait_until(healthy, timeout, f"{url} to be healthy" + (f" ({name}: {self.log_path(name)})" if name else ""),
                   every=0.2)

    def wait_log(self, name: str, text: str = "ready.", timeout: float = 90) -> None:
        """Until ``text`` appears in what ``name`` logged since it last started (a worker's
        ``ready.``)."""

        def seen() -> bool:
            if text in self.log(name, since_start=True):
                return True
            self.check_alive(name)
            return False

        wait_until(seen, timeout, f"{name} to log {text!r}", every=0.2)

    def pids(self, name: str) -> set[int]:
        """The process ids of ``name`` and its descendants (a worker's pool), from /proc."""
        parents: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                parents.setdefault(ppid, []).append(int(entry))
        found, todo = set(), [self.procs[name].pid]
        while todo:
            pid = todo.pop()
            found.add(pid)
            todo += parents.get(pid, [])
        return found

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the whole process group of ``name``; with SIGKILL, reap it."""
        proc = self.procs[name]
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            proc.wait(timeout=30)

    def terminate(self, name: str, timeout: float = 60, *, group: bool = False) -> int:
        """SIGTERM (a graceful shutdown: a worker finishes its tasks) to the main process, or
        with ``group`` to its whole group; wait for the exit code. SIGKILL and raise on timeout."""
        proc = self.procs[name]
        if proc.poll() is None:
            if group:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            else:
                proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(name)
            raise

    def stop(self, *names: str, grace: float = 20) -> None:
        """SIGTERM each process group, then SIGKILL what still runs after ``grace`` seconds in
        all: the shutdowns overlap (a worker finishing its task or Daphne closing its
        connections takes seconds each). ``grace=0``: SIGKILL at once."""
        live = [self.procs[n] for n in names if n in self.procs and self.procs[n].poll() is None]
        for proc in live:
            try:
                os.killpg(proc.pid, signal.SIGTERM if grace else signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for proc in live:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)

    def stop_all(self, grace: float = 20) -> None:
        self.stop(*self.procs, grace=grace)

    def log(self, name: str, *, since_start: bool = False) -> str:
        path = self.log_path(name)
        if not path.exists():
            return ""
        with path.open("rb") as f:
            f.seek(self.marks.get(name, 0) if since_start else 0)
            return f.read().decode(errors="replace")

    def tail(self, name: str, lines: int = 60) -> str:
        return "\n".join(self.log(name).splitlines()[-lines:])

    def logs(self, tail: int = 60) -> str:
        """The last lines of every process's log, for a failure message."""
        return "\n".join(f"--- {name} ---\n{self.tail(name, tail)}" for name in self.procs)

    def manage(self, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> str:
        """``manage.py <args>`` with this harness's environment; its stdout. Raises on failure."""
        done = subprocess.run([PYTHON, "manage.py", *args], cwd=ROOT, env={**(self.env or os.environ), **(env or {})},
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} exited with {done.returncode}:\n{done.stderr[-3000:]}")
        return done.stdout
