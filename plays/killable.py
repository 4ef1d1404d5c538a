"""Run a CPU-bound step in a forked process that a timeout or a cancel really stops.

A thread cannot be stopped: one parsing a hostile CSV or PDF keeps its CPU and the GIL
long after its step timed out. ``cpu_bound`` modules run in a fork per step instead (it
inherits the imports, needs no pool or pickled args, and touches neither the database
nor the broker); the runner waits with the step's deadline and SIGKILLs it on timeout or
cancel. Backstops in the child: ``RLIMIT_CPU`` and ``PR_SET_PDEATHSIG``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import math
import os
import pickle
import resource
import select
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from flows.modules import StepError

_PR_SET_PDEATHSIG = 1
_CHUNK = 1 << 16


class Cancelled(Exception):
    """The play ended (cancelled, failed) while its step ran: the child was killed."""


def available() -> bool:
    return hasattr(os, "fork")


def call(
    fn: Callable[..., Any],
    *args: Any,
    timeout: float,
    ended: threading.Event,
    max_bytes: int,
) -> Any:
    """``fn(*args)`` in a forked child; its value, or its StepError raised here.

    Raise ``concurrent.futures.TimeoutError`` after ``timeout`` seconds and ``Cancelled``
    once ``ended`` is set; in both cases the child is dead when this returns.
    ``max_bytes`` bounds what the child may send back (OUTPUT_TOO_LARGE beyond).
    """
    libc, parent = _libc(), os.getpid()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_fd)
        _child(write_fd, timeout, fn, args, libc, parent)
    os.close(write_fd)
    try:
        data = _receive(pid, read_fd, timeout, ended, max_bytes)
    finally:
        os.close(read_fd)
    return _outcome(pid, data)


def _receive(pid: int, fd: int, timeout: float, ended: threading.Event, max_bytes: int) -> bytes:
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    size = 0
    # pickle's framing on top of the JSON-sized limit that the child has already checked.
    ceiling = 2 * max_bytes + (1 << 20)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            _kill(pid)
            raise FutureTimeout
        if ended.is_set():
            _kill(pid)
            raise Cancelled
        ready, _, _ = select.select([fd], [], [], min(remaining, 0.25))
        if not ready:
            continue
        chunk = os.read(fd, _CHUNK)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > ceiling:
            _kill(pid)
            raise StepError(
                f"The step's output is larger than FLOWPLAY_MAX_OUTPUT_BYTES ({max_bytes:,} bytes)",
                "OUTPUT_TOO_LARGE",
                retryable=False,
            )
        chunks.append(chunk)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _reap(pid)


def _reap(pid: int) -> int:
    while True:
        try:
            return os.waitpid(pid, 0)[1]
        except InterruptedError:
            continue
        except ChildProcessError:
            return 0


def _outcome(pid: int, data: bytes) -> Any:
    status = _reap(pid)
    if not data:
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if sig == signal.SIGXCPU:
                raise StepError("The step used up its CPU time and was stopped", "TIMEOUT")
            raise StepError(f"The step's process died ({signal.Signals(sig).name})", "STEP_CRASHED")
        raise StepError("The step's process ended without an answer", "STEP_CRASHED")
    kind, *rest = pickle.loads(data)
    if kind == "ok":
        return rest[0]
    message, code, retryable = rest
    raise StepError(message, code, retryable)


def _child(fd: int, timeout: float, fn: Callable[..., Any], args: tuple[Any, ...], libc: Any, parent: int) -> None:
    code = 0
    # A collection would walk (and so copy, page by page) the whole heap shared with the
    # worker; the child lives for one step.
    gc.disable()
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the worker died before prctl: nobody waits for this
            os._exit(1)
        seconds = math.ceil(timeout) + 5
        resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds + 5))
        try:
            outcome: tuple[Any, ...] = ("ok", fn(*args))
        except StepError as exc:
            outcome = ("error", exc.message, exc.code, exc.retryable)
        except MemoryError:
            outcome = ("error", "The step ran out of memory", "STEP_ERROR", False)
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the runner
            outcome = ("error", f"{type(exc).__name__}: {exc}", "STEP_ERROR", True)
        try:
            data = pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # an out that pickle cannot carry is a module bug
            data = pickle.dumps(("error", f"Cannot send the step's output: {exc}", "STEP_ERROR", False))
        view = memoryview(data)
        while view:
            written = os.write(fd, view[:_CHUNK])
            view = view[written:]
    except BaseException:  # noqa: BLE001 - the parent sees an empty answer
        code = 1
    finally:
        os._exit(code)


@functools.cache
def _libc() -> Any:
    """libc for prctl (found once, in the parent: find_library runs a subprocess)."""
    if not hasattr(os, "sched_getaffinity"):  # not Linux: RLIMIT_CPU still bounds the child
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc if hasattr(libc, "prctl") else None
    except OSError:
        return None
