"""The internals of Celery, kombu, Django, Daphne and Twisted that flowplay patches or reads.

For each shim, a test that fails when the upstream internal it relies on moves (an upgrade
then says what to look at), and a test of what the shim does. Tested elsewhere, and not
repeated here: the pool kept across tasks (``test_celery_app.py``), the 413 of the web
process for a declared or a chunked body and the hooks' larger limit (``test_edges.py``),
a stalled WebSocket client closed with 4008 (``integration/test_ws.py``).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import os
import socket
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
from celery.fixups.django import DjangoWorkerFixup
from celery.signals import worker_process_init
from daphne import http_protocol
from daphne.server import Server
from django.db import DatabaseError, InterfaceError
from django.db.backends.postgresql.base import DatabaseWrapper
from kombu import Connection
from kombu.transport import filesystem, resolve_transport
from twisted.internet import abstract, tcp
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web import http

from flowplay import broker, celery
from flowplay.bodylimit import install_daphne_guard
from plays.wsauth import _backlog_probe

# --- Celery's Django fixup: _close_database (flowplay/celery.py) --------------------------


class FakeConnection:
    alias = "default"

    def __init__(self, log: list[str], error: Exception | None = None) -> None:
        self.log, self.error = log, error

    def close(self) -> None:
        if self.error is not None:
            raise self.error
        self.log.append("close")

    def close_pool(self) -> None:
        self.log.append("close_pool")


def test_celery_still_closes_connections_through_the_fixups_close_database() -> None:
    assert DjangoWorkerFixup._close_database is celery._close_connections_keep_pool
    # Before and after each task, and in a new prefork child.
    assert "_close_database" in DjangoWorkerFixup.close_database.__code__.co_names
    assert "_close_database" in DjangoWorkerFixup.on_worker_process_init.__code__.co_names
    fixup = DjangoWorkerFixup(celery.app)  # what the replacement reads from it
    assert "initialized_only" in inspect.signature(fixup._db.connections.all).parameters
    assert fixup.interface_errors == (InterfaceError,) and fixup.DatabaseError is DatabaseError


def test_closing_skips_connections_already_gone_and_raises_other_errors(monkeypatch: Any) -> None:
    log: list[str] = []
    fixup = DjangoWorkerFixup(celery.app)
    gone = [
        FakeConnection(log, InterfaceError("connection already closed")),
        FakeConnection(log, DatabaseError("the connection is closed")),
        FakeConnection(log),
    ]
    monkeypatch.setattr(fixup._db.connections, "all", lambda initialized_only=False: gone)
    fixup._close_database()
    assert log == ["close"]  # the others were closed already; no pool was closed

    broken = [FakeConnection(log, DatabaseError("disk full"))]
    monkeypatch.setattr(fixup._db.connections, "all", lambda initialized_only=False: broken)
    with pytest.raises(DatabaseError, match="disk full"):
        fixup._close_database()


# --- Django's PostgreSQL pools per process: _connection_pools (flowplay/celery.py) ---------


def test_django_still_keeps_its_postgresql_pools_in_one_class_attribute() -> None:
    assert isinstance(DatabaseWrapper.__dict__["_connection_pools"], dict)
    assert "_connection_pools" in DatabaseWrapper.pool.fget.__code__.co_names


def test_a_prefork_child_forgets_the_pools_of_its_parent(monkeypatch: Any) -> None:
    pools = {"default": object()}  # the parent's, whose threads did not survive the fork
    monkeypatch.setattr(DatabaseWrapper, "_connection_pools", pools)
    assert celery._leave_the_parents_database_pool in worker_process_init._live_receivers(sender=None)
    celery._leave_the_parents_database_pool()
    assert DatabaseWrapper._connection_pools is pools and pools == {}


# --- kombu's filesystem transport, atomic publish (flowplay/broker.py) -----------------------


@pytest.fixture
def channel(tmp_path: Path) -> Any:
    folder = tmp_path / "broker"
    (folder / "processed").mkdir(parents=True)
    options = {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "processed_folder": str(folder / "processed"),
        "store_processed": False,
    }
    with Connection("filesystem://", transport_options=options) as conn:
        yield conn.channel()


def test_kombu_still_resolves_filesystem_urls_through_its_alias_table(channel: Any) -> None:
    assert resolve_transport("filesystem") is broker.Transport
    assert isinstance(channel, broker.Channel)
    assert list(inspect.signature(filesystem.Channel._put).parameters) == ["self", "queue", "payload", "kwargs"]
    assert channel.data_folder_out == channel.transport_options["data_folder_out"]


def test_kombus_consumer_takes_only_files_named_like_a_message(channel: Any) -> None:
    folder = Path(channel.data_folder_out)
    (folder / ".1_x.celery.msg.partial").write_text(json.dumps({"body": "half"}))
    with pytest.raises(Empty):
        filesystem.Channel._get(channel, "celery")
    (folder / "2_y.celery.msg").write_text(json.dumps({"body": "whole"}))
    assert filesystem.Channel._get(channel, "celery") == {"body": "whole"}


def test_a_message_appears_whole_or_not_at_all(channel: Any, monkeypatch: Any) -> None:
    payload = {"body": "x" * 100_000, "headers": {"task": "plays.tasks.run_play"}}
    replace = os.replace
    seen: list[Any] = []

    def renaming(src: str, dst: str) -> None:
        # Written in full under a name that a consumer polling now does not take.
        assert json.loads(Path(src).read_bytes()) == payload and not os.path.exists(dst)
        with pytest.raises(Empty):
            channel._get("celery")
        seen.append(dst)
        replace(src, dst)

    monkeypatch.setattr(os, "replace", renaming)
    channel._put("celery", payload)
    (name,) = seen
    assert sorted(os.listdir(channel.data_folder_out)) == sorted(["processed", os.path.basename(name)])
    assert channel._get("celery") == payload


# --- Daphne's request class and Twisted's request hooks (flowplay/bodylimit.py) ------------


def test_twisted_still_calls_the_request_hooks_with_the_path_on_the_channel() -> None:
    hooks = {
        "gotLength": ["self", "length"],
        "handleContentChunk": ["self", "data"],
        "requestReceived": ["self", "command", "path", "version"],
    }
    for name, parameters in hooks.items():
        assert list(inspect.signature(getattr(http.Request, name)).parameters) == parameters, name
    calls: list[tuple[Any, ...]] = []

    class Recording(http.Request):
        def gotLength(self, length: int | None) -> None:  # noqa: N802
            calls.append(("gotLength", length, self.channel._path))
            super().gotLength(length)

        def handleContentChunk(self, data: bytes) -> None:  # noqa: N802
            calls.append(("handleContentChunk", data))
            super().handleContentChunk(data)

        def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:  # noqa: N802
            calls.append(("requestReceived", path))

    for request in (
        b"POST /hooks/a?b=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello",
        b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    ):
        channel = http.HTTPChannel()
        channel.timeOut = None
        channel.requestFactory = Recording
        channel.makeConnection(StringTransport())
        channel.dataReceived(request)
    assert calls == [
        ("gotLength", 5, b"/hooks/a?b=1"),
        ("handleContentChunk", b"hello"),
        ("requestReceived", b"/hooks/a?b=1"),
        ("gotLength", None, b"/x"),
        ("handleContentChunk", b"abc"),
        ("requestReceived", b"/x"),
    ]


def _daphne(application: Any = None) -> Server:
    server = Server(application, endpoints=["tcp:port=0"])  # not listening: run() is not called
    server.connections = {}
    return server


def _http_channel(server: Server) -> tuple[Any, StringTransport]:
    factory = http_protocol.HTTPFactory(server)
    factory.timeOut = None
    channel = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def test_daphne_still_looks_its_request_class_up_per_connection(monkeypatch: Any) -> None:
    class Mine(http_protocol.WebRequest):
        pass

    monkeypatch.setattr(http_protocol, "WebRequest", Mine)
    channel, _ = _http_channel(_daphne())
    assert channel.requestFactory is Mine
    assert issubclass(Mine, http.Request)


def test_a_refused_request_never_reaches_the_application_and_daphne_forgets_it(settings: Any, monkeypatch: Any) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 4096
    monkeypatch.setattr(http_protocol, "WebRequest", http_protocol.WebRequest)  # restored afterwards
    install_daphne_guard()
    server = _daphne(lambda **kwargs: pytest.fail("the application was called"))
    channel, transport = _http_channel(server)
    assert channel.requestFactory.__name__ == "LimitedWebRequest"
    channel.dataReceived(
        b"POST /api/auth/login HTTP/1.1\r\nHost: h\r\nContent-Length: 1073741824\r\nExpect: 100-continue\r\n\r\n"
        + b"x" * 1000
    )
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in answer and transport.disconnecting
    (request,) = server.connections
    channel.connectionLost(Failure(ConnectionDone()))
    # Marked gone, so that Daphne's application_checker drops it (it kept every refused one).
    assert "disconnected" in server.connections[request]


# --- Daphne's send and Twisted's write buffer: the backlog probe (plays/wsauth.py) ----------


class Protocol:
    """What Daphne hands over for a WebSocket: its protocol, with the connection's transport."""

    def __init__(self, transport: Any = None) -> None:
        self.transport = transport


def _daphnes_send(protocol: Protocol) -> Any:
    """The ``send`` that Daphne's server gives the application of ``protocol``."""
    given = {}

    async def app() -> None:
        pass

    def application(scope: Any, receive: Any, send: Any) -> Any:
        given["send"] = send
        return app()

    server = _daphne(application)
    server.connections[protocol] = {}

    async def create() -> None:
        server.create_application(protocol, {"type": "websocket"})
        await asyncio.sleep(0)

    asyncio.run(create())
    assert given["send"].func == server.handle_reply
    return given["send"]


def test_daphne_still_hands_send_as_a_partial_of_handle_reply_with_the_protocol_first() -> None:
    protocol = Protocol()
    send = _daphnes_send(protocol)
    assert isinstance(send, functools.partial) and send.args == (protocol,) and not send.keywords


def test_twisted_still_counts_unwritten_bytes_in_its_file_descriptors() -> None:
    assert issubclass(tcp.Server, abstract.FileDescriptor)
    descriptor = abstract.FileDescriptor(reactor=FakeReactor())
    assert (descriptor.dataBuffer, descriptor.offset, descriptor._tempDataLen) == (b"", 0, 0)
    for name in ("dataBuffer", "offset", "_tempDataLen"):
        assert name in abstract.FileDescriptor.doWrite.__code__.co_names, name


class FakeReactor:
    """Enough of a reactor for a transport written to by hand."""

    def addWriter(self, descriptor: Any) -> None:  # noqa: N802
        pass

    def removeWriter(self, descriptor: Any) -> None:  # noqa: N802
        pass


def test_the_probe_counts_the_bytes_a_real_transport_has_not_written() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        transport = tcp.Connection(ours, None, reactor=FakeReactor())
        transport.connected = 1
        backlog = _backlog_probe(_daphnes_send(Protocol(transport)))
        assert backlog is not None and backlog() == 0
        total = 1024 * 1024
        transport.write(b"x" * (total // 2))
        transport.write(b"y" * (total // 2))
        assert backlog() == total  # queued, nothing sent yet
        transport.doWrite()  # one non-blocking send, as the reactor does when writable
        theirs.setblocking(False)
        received = 0
        try:
            while chunk := theirs.recv(1 << 20):
                received += len(chunk)
        except BlockingIOError:
            pass
        assert 0 < received < total and backlog() == total - received
        transport.connected = 0
        assert backlog() == 0


def test_the_probe_is_absent_under_another_server() -> None:
    async def send(message: Any) -> None:
        pass

    assert _backlog_probe(send) is None
    assert _backlog_probe(functools.partial(send)) is None
    assert _backlog_probe(functools.partial(lambda protocol, message: None, Protocol(object()))) is None
