"""Tasks sent after commit: a broker error never turns a saved change into a failure.

A verb that starts work (run, approve, resume, retry, start, a loop's next items, a freed
concurrency slot) saves its change, then hands a task to the broker once the transaction
has committed. If the broker cannot take it (Redis down), the change stays saved: the
error is logged, the play or iteration is marked as having no task (``unsent``: an expired
lease and no runner, which the reaper's next sweep requeues once the broker is back), and
the request's answer says so (``BrokerNoticeMiddleware``: header ``Flowplay-Warning`` and
a ``warning`` field in a JSON object body). Clients must not send the request again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from django.db import transaction

log = logging.getLogger(__name__)

BROKER_UNAVAILABLE = "BROKER_UNAVAILABLE"
WARNING = {
    "code": BROKER_UNAVAILABLE,
    "message": "Saved. The task queue could not be reached; the work starts when it is back "
    "(the reaper requeues it). Do not send this request again.",
}

# The tasks of the current request that could not be sent (None outside a request).
_unsent: ContextVar[list[str] | None] = ContextVar("flowplay_unsent_tasks", default=None)


def send_on_commit(send: Callable[[], Any], what: str, unsent: Callable[[], Any] | None = None) -> None:
    """Call ``send`` (e.g. ``task.apply_async``) after the current transaction commits; if
    it raises, log it, call ``unsent`` (which marks the work for the reaper) and note it for
    the request's answer."""

    def run() -> None:
        try:
            send()
        except Exception:  # kombu/redis connection errors, OSError, a full queue: never the caller's 500
            log.warning("could not send %s to the broker; the reaper will requeue it", what, exc_info=True)
            noted = _unsent.get()
            if noted is not None:
                noted.append(what)
            if unsent is not None:
                try:
                    unsent()
                except Exception:  # the database went too: the reaper's idle rule still finds it
                    log.exception("could not mark %s for the reaper", what)

    transaction.on_commit(run)


class BrokerNoticeMiddleware:
    """Tell the client that its saved change waits for the broker (see the module docstring)."""

    def __init__(self, get_response: Callable[[Any], Any]):
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        noted: list[str] = []
        token = _unsent.set(noted)
        try:
            response = self.get_response(request)
        finally:
            _unsent.reset(token)
        if noted and response.status_code < 400:
            response["Flowplay-Warning"] = BROKER_UNAVAILABLE
            data = getattr(response, "data", None)
            if isinstance(data, dict) and getattr(response, "accepted_renderer", None) is not None:
                data["warning"] = WARNING
                response.content = response.rendered_content
        return response
