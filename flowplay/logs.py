"""Log lines an aggregator can read: JSON, with the ids of what was running.

- ``bind(**fields)`` puts ids in a context variable for the duration of a block: the runner
  binds ``playId``/``flowId``/``companyId`` around a play and ``layerRef`` around a step
  (plays/observe.py), the request middleware binds ``requestId``. Context variables follow
  the code into threads started with ``contextvars.copy_context()`` (the step's thread) and
  into Django's sync-to-async hops.
- ``ContextFilter`` copies them onto every record, with ``traceId`` of the current
  OpenTelemetry span when tracing is on.
- ``JsonFormatter`` writes one JSON object per line (``LOG_FORMAT=json``, the default with
  ``FLOWPLAY_PRODUCTION``). It runs after ``plays.redaction.RedactingFilter``, so messages
  and tracebacks are already masked.
- ``RequestIdMiddleware`` takes ``X-Request-ID`` from the caller (or makes one), binds it
  and sends it back.

Framework-light: imported by the logging configuration before Django's apps are ready.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

_fields: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("flowplay_log_fields", default={})  # noqa: B039

CONTEXT_KEYS = ("requestId", "playId", "flowId", "layerRef", "companyId", "traceId")


@contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every log line emitted inside the block (this context only)."""
    token = _fields.set({**_fields.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _fields.reset(token)


def current() -> dict[str, Any]:
    return dict(_fields.get())


def _trace_id() -> str | None:
    try:
        from opentelemetry import trace
    except ImportError:  # pragma: no cover
        return None
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


class ContextFilter(logging.Filter):
    """Copy the bound ids (and the current trace id) onto each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _fields.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        if not hasattr(record, "requestId"):
            # django.request logs a 4xx/5xx after the middleware returned, with the request.
            request_id = getattr(getattr(record, "request", None), "request_id", None)
            if request_id:
                record.requestId = request_id
        if not hasattr(record, "traceId"):
            trace_id = _trace_id()
            if trace_id:
                record.traceId = trace_id
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the ids, the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in CONTEXT_KEYS:
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        entry["process"] = record.process
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:  # masked already by RedactingFilter when it ran first
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,64}$")


def request_id_from(given: str) -> str:
    """The caller's ``X-Request-ID`` if it is a sane token, else a new one."""
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


class RequestIdMiddleware:
    """Bind a request id to the log lines of a request and return it in ``X-Request-ID``."""

    def __init__(self, get_response: Callable[[Any], Any]):
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        request_id = request_id_from(request.headers.get("X-Request-ID", ""))
        request.request_id = request_id
        with bind(requestId=request_id):
            response = self.get_response(request)
        response["X-Request-ID"] = request_id
        return response


__all__ = ["bind", "current", "ContextFilter", "JsonFormatter", "RequestIdMiddleware", "request_id_from"]
