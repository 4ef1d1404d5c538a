"""Request bodies over ``FLOWPLAY_MAX_BODY_BYTES`` are refused before they are read.

Django checks ``DATA_UPLOAD_MAX_MEMORY_SIZE`` only once the view reads ``request.body``, and
its ASGI handler first spools the whole body: an anonymous 1 GB ``POST /api/auth/login`` was
read whole before its 413. Two guards refuse it earlier, with the API's error body
(``413 PAYLOAD_TOO_LARGE``):

- ``BodyLimitMiddleware``, an ASGI middleware in front of Django (``flowplay.asgi``): a
  ``Content-Length`` over the limit is answered at once, without reading the body; a body
  without one (chunked) is counted as it streams in and answered as soon as it passes the
  limit. Django never sees the request. This holds under any ASGI server.
- ``LimitedWebRequest``, the request class of Daphne's HTTP protocol (``flowplay.web``, the
  ``web`` process of the Procfile). Daphne (through Twisted) receives a whole request body
  before it calls the application and then queues all of it, in memory, for the
  application; so under Daphne the refusal must happen while the body arrives: the answer
  is sent from the headers (``Content-Length``) or from the running count (chunked), and the
  connection is closed without reading the rest.
"""

from __future__ import annotations

import io
import json
from typing import Any

Scope = dict[str, Any]


# HTTP channels (``/hooks/…``) read their bodies themselves, each with its channel's own limit
# (``max_body_bytes``, at most this much): here they are only held to that ceiling.
HOOKS_PREFIX = "/hooks/"
HOOKS_CEILING = 100 * 1024 * 1024


def body_limit(path: str = "") -> int:
    from django.conf import settings

    limit = int(settings.DATA_UPLOAD_MAX_MEMORY_SIZE)
    return max(limit, HOOKS_CEILING) if path.startswith(HOOKS_PREFIX) else limit


def too_large_body(limit: int) -> bytes:
    return json.dumps(
        {
            "error": "PAYLOAD_TOO_LARGE",
            "message": f"The request body is larger than {limit} bytes",
            "statusCode": 413,
        }
    ).encode()


def declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The ``Content-Length`` of ASGI headers; None when absent or not a number."""
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class BodyLimitMiddleware:
    """ASGI middleware: answer ``413`` to a body over the limit instead of reading it."""

    def __init__(self, app: Any, limit: int | None = None):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> Any:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit if self.limit is not None else body_limit(scope.get("path", ""))
        length = declared_length(scope.get("headers") or [])
        if length is not None and length > limit:
            return await self._refuse(send, limit)

        received = 0
        refused = False

        async def counting_receive() -> dict[str, Any]:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Answer now; the application sees a client that went away (Django
                    # raises RequestAborted while reading the body and answers nothing).
                    refused = True
                    await self._refuse(send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            if not refused:
                await send(message)

        return await self.app(scope, counting_receive, guarded_send)

    @staticmethod
    async def _refuse(send: Any, limit: int) -> None:
        payload = too_large_body(limit)
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def _limited_web_request() -> type:
    from daphne.http_protocol import WebRequest

    # Overrides Twisted's per-request hooks (gotLength, handleContentChunk, requestReceived)
    # and reads the request line's path that Twisted keeps on the channel (``_path``): Daphne
    # has no hook of its own before the whole body is read. tests/test_shims.py checks them.
    class LimitedWebRequest(WebRequest):
        """Daphne's request, refusing a body over the limit while it arrives.

        A refused request still ends through Daphne's ``connectionLost``: Daphne's server
        registered it when it was created and forgets it only once told it is gone."""

        refused = False
        body_seen = 0

        def gotLength(self, length: int | None) -> None:  # noqa: N802 (Twisted's name)
            # The request line is parsed by now (Twisted keeps its path on the channel).
            path = getattr(self.channel, "_path", b"") or b""
            self.limit = body_limit(path.decode("latin-1").split("?", 1)[0])
            if length is not None and length > self.limit:
                self.refuse()
                return
            super().gotLength(length)

        def handleContentChunk(self, data: bytes) -> None:  # noqa: N802
            if self.refused:
                return
            self.body_seen += len(data)
            if self.body_seen > self.limit:
                self.refuse()
                return
            super().handleContentChunk(data)

        def refuse(self) -> None:
            self.refused = True
            self.content = io.BytesIO()  # keep nothing of the body
            self.requestHeaders.removeHeader(b"expect")  # no "100 Continue" after the answer
            payload = too_large_body(self.limit)
            head = (
                b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(payload)
            )
            self.channel.transport.write(head + payload)
            # Stops reading: the rest of the body is never received.
            self.channel.transport.loseConnection()

        def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:  # noqa: N802
            if not self.refused:
                super().requestReceived(command, path, version)

    return LimitedWebRequest


def install_daphne_guard() -> None:
    """Make Daphne's HTTP protocol use ``LimitedWebRequest`` (it looks the class up per connection)."""
    from daphne import http_protocol

    if not getattr(http_protocol.WebRequest, "flowplay_limited", False):
        limited = _limited_web_request()
        limited.flowplay_limited = True
        http_protocol.WebRequest = limited
