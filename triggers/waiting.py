"""Wait for a play to end without holding a thread or a worker.

A sync channel request and an MCP tool call both wait for the play they started. They
wait on the web process's event loop: the coroutine listens to the process's hub
(``plays.hub``), which already brings every event of the company once (woken by Redis,
or polling the event table in the embedded mode), and reads the play's row when an event
says it ended. The row is also read on a timer that backs off from 50 ms to 1 s. Database reads run on
the shared thread pool one at a time (``database_sync_to_async``), never in a thread kept
for the request; the play runs on the workers as any other.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async

from plays.hub import LiveRange, hub
from plays.models import TERMINAL, Layer, LayerState, Play

END_EVENTS = frozenset({"play:completed", "play:failed", "play:state"})
FIRST_POLL_SECONDS = 0.05
MAX_POLL_SECONDS = 1.0


# Unit tests set this to run the calls in the test's own thread, inside its transaction
# (so without closing the connection around each call, as database_sync_to_async does).
THREAD_SENSITIVE = False


def db(func: Any) -> Any:
    """Run ``func`` on the shared thread pool (not a thread of the request's own)."""

    @functools.wraps(func)
    async def call(*args: Any, **kwargs: Any) -> Any:
        if THREAD_SENSITIVE:
            return await sync_to_async(func, thread_sensitive=True)(*args, **kwargs)
        return await database_sync_to_async(func, thread_sensitive=False)(*args, **kwargs)

    return call


@db
def _state(play_id: str) -> str | None:
    return Play.objects.filter(pk=play_id).values_list("state", flat=True).first()


async def wait_for_end(play: Play, timeout: float) -> str | None:
    """Wait up to ``timeout`` seconds for ``play`` to reach a terminal state; return the
    state it is in at the end (terminal, or not if the time ran out)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(0.0, timeout)
    state = await _state(play.pk)
    if state in TERMINAL or state is None or timeout <= 0:
        return state
    ended = asyncio.Event()

    def listener(live: LiveRange) -> None:
        if any(event.play_id == play.pk and event.type in END_EVENTS for event in live.events):
            ended.set()

    await hub.listen(play.company_id, listener)
    try:
        delay = FIRST_POLL_SECONDS
        while True:
            try:
                await asyncio.wait_for(ended.wait(), max(0.0, min(loop.time() + delay, deadline) - loop.time()))
            except TimeoutError:
                pass
            ended.clear()
            state = await _state(play.pk)
            if state in TERMINAL or state is None or loop.time() >= deadline:
                return state
            delay = min(delay * 2, MAX_POLL_SECONDS)
    finally:
        await hub.unlisten(play.company_id, listener)


def error_body(code: str, message: str, status: int) -> dict[str, Any]:
    """The API's error body (``flows.api.body``, which cannot be imported as early as the
    ASGI module loads these apps: it pulls in DRF's settings)."""
    return {"error": code, "message": message, "statusCode": status}


def last_output(play: Play) -> Any:
    """The output of the last step that ran (the highest DONE layer outside loops)."""
    layer = (
        Layer.objects.filter(play=play, iteration__isnull=True, state=LayerState.DONE)
        .order_by("-index")
        .only("out")
        .first()
    )
    return layer.out if layer is not None else None


__all__ = ["wait_for_end", "last_output", "db", "error_body"]
