"""Waiting in tests without fixed sleeps: poll a check until a deadline.

``wait_until`` waits for something to happen; ``stays`` watches that something does NOT
happen for a while (the window is the scenario, e.g. "a redelivery would have come by
now"), failing at the first sign of it instead of only at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(check: Callable[[], Any], timeout: float = 60, what: str = "condition", every: float = 0.1) -> Any:
    """The first truthy value of ``check()``; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached after {timeout:g} s")
        time.sleep(every)


def stays(check: Callable[[], Any], seconds: float, what: str = "condition", every: float = 0.2) -> None:
    """``check()`` is truthy for all of ``seconds`` (and once more at the end)."""
    deadline = time.monotonic() + seconds
    while True:
        assert check(), f"{what} no longer holds"
        if time.monotonic() > deadline:
            return
        time.sleep(every)
