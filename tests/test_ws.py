"""The WebSocket consumer in-process (channels' WebsocketCommunicator), with the hub in
its embedded mode (polling the table). The real server and clients are in
tests/integration/test_ws.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from channels.db import database_sync_to_async as sync_to_async
from channels.testing import WebsocketCommunicator

from flows.models import Flow
from plays import consumers, wsauth
from plays import hub as hub_module
from plays.hub import Hub, LiveRange, hub, live_event
from plays.models import Event, EventType, Play, decode_cursor, emit, encode_cursor
from plays.outbox import company_group, doorbell
from plays.wsauth import SEND_BACKLOG
from tenancy.models import ApiKey, User

from .factories import make_flow

pytestmark = pytest.mark.django_db(transaction=True)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture(autouse=True)
def _one_database_thread(monkeypatch: Any) -> None:
    """Run the consumer's reads on the one thread the tests write from.

    The consumer reads on pool threads; SQLite's in-memory test database is shared between
    threads in shared-cache mode, which locks whole tables ("database table is locked")
    where the real file database in WAL mode lets readers run beside the writer.
    """
    for owner, name in [
        (consumers.PlayEventsConsumer, n) for n in ("_read", "_head", "_lag", "_still_authorized")
    ] + [(Hub, "_read"), (Hub, "_head")]:
        monkeypatch.setattr(owner, name, sync_to_async(owner.__dict__[name].func))
    monkeypatch.setattr(wsauth, "_db", sync_to_async)


@pytest.fixture(autouse=True)
def _short_lived_connections(monkeypatch: Any) -> Any:
    from django.db import connections

    monkeypatch.setitem(connections["default"].settings_dict, "CONN_MAX_AGE", 0)
    yield
    # The thread that ran the consumer's queries keeps its connection otherwise, and an
    # open session keeps PostgreSQL from dropping the test database.
    run(sync_to_async(connections.close_all)())


@pytest.fixture
def token(alice: User) -> str:
    return ApiKey.issue(alice, "ws")[1]


@pytest.fixture
def play(api: Any) -> Play:
    flow = make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {"x": 1}}}])
    return Play.trigger(Flow.objects.get(pk=flow["id"]), {}, start=False)[0]


def other_play(play: Play) -> Play:
    return Play.trigger(play.flow, {"other": True}, start=False)[0]


def step(play: Play, ref: str) -> list[Event]:
    return emit(play, [(EventType.LAYER_STARTED, {"layerId": "L", "ref": ref, "state": "RUN"})])


def communicator(path: str, headers: list[tuple[bytes, bytes]] | None = None) -> WebsocketCommunicator:
    from flowplay.asgi import application

    return WebsocketCommunicator(application, path, headers=headers or [])


async def receive_cursors(comm: WebsocketCommunicator, n: int, timeout: float = 10) -> list[str]:
    return [(await comm.receive_json_from(timeout=timeout))["cursor"] for _ in range(n)]


def head(play: Play) -> str:
    return encode_cursor(Event.objects.head(play.company_id))


def stored_after(play: Play, since: str, only_play: bool = False) -> list[str]:
    events = Event.objects.after(play.company_id, decode_cursor(since))
    if only_play:
        events = events.filter(play=play)
    return [e.cursor for e in events]


async def close_code(path: str, headers: list[tuple[bytes, bytes]] | None = None) -> int | None:
    """A refused connection is accepted, then closed at once: its close code (no event first)."""
    comm = communicator(path, headers)
    connected, code = await comm.connect()
    if not connected:
        return None  # closed before the accept: Daphne would answer HTTP 403, whatever the reason
    out = await comm.receive_output(timeout=5)
    assert out["type"] == "websocket.close", out
    return out.get("code")




def test_it_refuses_a_handshake_without_credentials() -> None:
    assert run(close_code("/api/ws")) == 4401


def test_it_refuses_a_revoked_or_unknown_token(alice: User) -> None:
    key, token = ApiKey.issue(alice, "soon revoked")
    key.revoke()

    assert run(close_code(f"/api/ws?token={token}")) == 4401
    assert run(close_code("/api/ws?token=fp_nothing_here")) == 4401


@pytest.mark.parametrize("since", ["-3", "12", "g" * 32, "f" * 32])
def test_it_refuses_a_bad_since(token: str, since: str) -> None:
    assert run(close_code(f"/api/ws?token={token}&since={since}")) == 4400


def test_another_companys_play_or_flow_is_4403(token: str, charlie: User) -> None:
    from .conftest import client_for

    other = make_flow(client_for(charlie), [{"ref": "a", "appId": "var", "args": {"values": {}}}])
    their_play = Play.trigger(Flow.objects.get(pk=other["id"]), {}, start=False)[0]
    assert run(close_code(f"/api/ws?token={token}&playId={their_play.id}")) == 4403
    assert run(close_code(f"/api/ws?token={token}&flowId={other['id']}")) == 4403
    assert run(close_code(f"/api/ws?token={token}&flowId=no-such-flow")) == 4403


def test_it_replays_after_since_then_goes_live_without_duplicates(token: str, play: Play) -> None:
    before = [e.cursor for _ in range(4) for e in step(play, "before")]
    other = other_play(play)  # its events are filtered out by playId
    step(other, "other")

    async def go() -> list[str]:
        comm = communicator(f"/api/ws?token={token}&since={before[1]}&playId={play.id}")
        assert (await comm.connect())[0]
        replayed = await receive_cursors(comm, 2)
        live = []
        for _ in range(3):
            await sync_to_async(step)(play, "live")
            await sync_to_async(step)(other, "other")
            live += await receive_cursors(comm, 1)
        assert await comm.receive_nothing(timeout=0.5)
        await comm.disconnect()
        return replayed + live

    cursors = run(go())
    assert cursors[:2] == before[2:]
    assert cursors == stored_after(play, before[1], only_play=True) and len(cursors) == 5
    assert cursors == sorted(cursors)


def test_a_replay_longer_than_one_batch_arrives_whole_at_once(token: str, play: Play, monkeypatch: Any) -> None:
    monkeypatch.setattr(consumers, "POLL_SECONDS", 3600)
    since = head(play)
    backlog = emit(
        play, [(EventType.LAYER_STARTED, {"layerId": "L", "ref": f"r{i}", "state": "RUN"}) for i in range(1100)]
    )

    async def go() -> list[str]:
        comm = communicator(f"/api/ws?token={token}&since={since}&playId={play.id}")
        assert (await comm.connect())[0]
        cursors = await receive_cursors(comm, 1100)
        await comm.disconnect()
        return cursors

    assert run(go()) == [e.cursor for e in backlog]
    assert [e.seq for e in backlog] == list(range(1, 1101))


def test_a_long_replay_meets_the_live_stream_without_gap_or_duplicate(token: str, play: Play) -> None:
    since = head(play)
    emit(play, [(EventType.LAYER_STARTED, {"layerId": "L", "ref": f"r{i}", "state": "RUN"}) for i in range(1200)])

    async def go() -> list[str]:
        comm = communicator(f"/api/ws?token={token}&since={since}")
        assert (await comm.connect())[0]
        received: list[str] = []
        for i in range(20):  # written while the replay is under way
            await sync_to_async(step)(play, f"live{i}")
            received += await receive_cursors(comm, 50)
        total = await sync_to_async(lambda: len(stored_after(play, since)))()
        received += await receive_cursors(comm, total - len(received))
        assert await comm.receive_nothing(timeout=0.5)
        await comm.disconnect()
        return received

    got = run(go())
    assert got == stored_after(play, since) and len(got) == 1220


def test_a_since_beyond_the_head_starts_at_the_head(token: str, play: Play) -> None:
    step(play, "before")
    beyond = encode_cursor((2**40, 0))

    async def go() -> str:
        comm = communicator(f"/api/ws?token={token}&since={beyond}")
        assert (await comm.connect())[0]
        await sync_to_async(step)(play, "after")
        got = await comm.receive_json_from(timeout=10)
        await comm.disconnect()
        return got

    got = run(go())
    assert got["ref"] == "after" and got["cursor"] == Event.objects.filter(play=play).latest("seq").cursor


def test_a_range_that_starts_past_the_position_makes_it_read_the_table(
    token: str, play: Play, monkeypatch: Any
) -> None:
    """A range from the hub that does not start where the consumer is (the ones between
    were dropped from a full queue) is filled from the table: nothing lost, nothing twice."""
    monkeypatch.setattr(Hub, "RELAY_SECONDS", 3600)
    monkeypatch.setattr(consumers, "POLL_SECONDS", 3600)

    async def go() -> tuple[list[str], list[str]]:
        comm = communicator(f"/api/ws?token={token}")
        assert (await comm.connect())[0]
        await asyncio.sleep(0.2)  # the sender's first round (the replay) is done
        events = await sync_to_async(lambda: [e for _ in range(3) for e in step(play, "x")])()
        offer(
            play.company_id,
            LiveRange(
                decode_cursor(events[1].cursor), [live_event(events[2].message)], decode_cursor(events[2].cursor)
            ),
        )
        cursors = await receive_cursors(comm, 3)
        assert await comm.receive_nothing(timeout=0.3)
        await comm.disconnect()
        return cursors, [e.cursor for e in events]

    got, stored = run(go())
    assert got == stored


def offer(company_id: str, live: LiveRange) -> None:
    """Hand a range to the company's listeners, as the hub does."""
    for listener in list(hub.listeners[company_id]):
        listener(live)


def test_contiguous_ranges_are_delivered_without_reading_the_table(token: str, play: Play, monkeypatch: Any) -> None:
    monkeypatch.setattr(Hub, "RELAY_SECONDS", 3600)
    monkeypatch.setattr(consumers, "POLL_SECONDS", 3600)
    reads = []
    real_read = consumers.PlayEventsConsumer.__dict__["_read"].func

    def counting_read(self: Any, after: Any) -> Any:
        reads.append(after)
        return real_read(self, after)

    monkeypatch.setattr(consumers.PlayEventsConsumer, "_read", sync_to_async(counting_read))

    async def go() -> tuple[list[str], list[str], int]:
        start = await sync_to_async(Event.objects.head)(play.company_id)
        comm = communicator(f"/api/ws?token={token}")
        assert (await comm.connect())[0]
        await asyncio.sleep(0.3)  # the sender's first round (the replay) is done
        first_reads = len(reads)
        events = await sync_to_async(lambda: step(play, "one") + step(play, "two") + step(play, "three"))()
        positions = [start] + [decode_cursor(e.cursor) for e in events]
        # Three ranges, one of them sent twice (a hub that read again): no duplicate.
        for i in (0, 1, 1, 2):
            offer(play.company_id, LiveRange(positions[i], [live_event(events[i].message)], positions[i + 1]))
        cursors = await receive_cursors(comm, 3)
        assert await comm.receive_nothing(timeout=0.3)
        await comm.disconnect()
        return cursors, [e.cursor for e in events], len(reads) - first_reads

    got, stored, extra_reads = run(go())
    assert got == stored
    assert extra_reads == 0


def test_the_end_of_a_burst_whose_ranges_were_dropped_is_read_from_the_table(
    token: str, play: Play, monkeypatch: Any
) -> None:
    reads = []
    real_read = consumers.PlayEventsConsumer.__dict__["_read"].func

    def counting_read(self: Any, after: Any) -> Any:
        reads.append(after)
        return real_read(self, after)

    monkeypatch.setattr(consumers.PlayEventsConsumer, "_read", sync_to_async(counting_read))
    monkeypatch.setattr(consumers, "POLL_SECONDS", 3600)

    async def go() -> tuple[list[str], list[str]]:
        comm = communicator(f"/api/ws?token={token}")
        assert (await comm.connect())[0]
        first = await sync_to_async(step)(play, "delivered")
        got = await receive_cursors(comm, 1)
        reads_before = len(reads)
        with monkeypatch.context() as m:
            m.setattr(consumers, "QUEUED_RANGES", 0)  # every queue full: the ranges are dropped
            events = await sync_to_async(lambda: step(play, "dropped") + step(play, "dropped"))()
            # Nothing comes after them to show the gap: the hub's position does.
            got += await receive_cursors(comm, 2)
        await comm.disconnect()
        return got, [first[0].cursor] + [e.cursor for e in events], len(reads) - reads_before

    got, stored, table_reads = run(go())
    assert got == stored
    assert table_reads >= 1


def test_it_closes_a_client_that_does_not_read(token: str, play: Play, monkeypatch: Any) -> None:
    monkeypatch.setattr(consumers, "STALL_SECONDS", 0.3)
    from flowplay.asgi import application

    async def stuck_app(scope: dict, receive: Any, send: Any) -> Any:
        # A send buffer that never drains, as Twisted would report for a stalled reader.
        return await application(dict(scope, **{SEND_BACKLOG: lambda: 10 * consumers.SEND_HIGH_WATER}), receive, send)

    async def go() -> Any:
        comm = WebsocketCommunicator(stuck_app, f"/api/ws?token={token}")
        assert (await comm.connect())[0]
        await sync_to_async(step)(play, "x")
        first = await comm.receive_json_from(timeout=5)
        closed = await comm.receive_output(timeout=5)
        await comm.wait()
        return first, closed

    first, closed = run(go())
    assert first["type"] == "play:layer:started"
    assert closed == {"type": "websocket.close", "code": 4008, "reason": "too far behind; reconnect with since"}


def test_it_closes_when_the_api_key_is_revoked(alice: User, play: Play, monkeypatch: Any) -> None:
    monkeypatch.setattr(consumers, "AUTH_CHECK_SECONDS", 0.1)
    monkeypatch.setattr(consumers, "POLL_SECONDS", 0.1)
    key, token = ApiKey.issue(alice, "revoked while open")

    async def go() -> Any:
        comm = communicator(f"/api/ws?token={token}")
        assert (await comm.connect())[0]
        assert await comm.receive_nothing(timeout=0.4)
        await sync_to_async(key.revoke)()
        closed = await comm.receive_output(timeout=5)
        await comm.wait()
        return closed

    assert run(go())["code"] == 4401


def test_a_cookie_handshake_from_another_origin_is_refused(alice: User, client: Any) -> None:
    client.force_login(alice)
    cookie = f"sessionid={client.cookies['sessionid'].value}".encode()

    async def go(origin: bytes) -> bool:
        headers = [(b"cookie", cookie), (b"host", b"testserver"), (b"origin", origin)]
        comm = communicator("/api/ws", headers)
        connected, _ = await comm.connect()
        if connected:
            await comm.disconnect()
        return connected

    assert run(go(b"http://testserver")) is True
    headers = [(b"cookie", cookie), (b"host", b"testserver"), (b"origin", b"http://evil.example:3000")]
    assert run(close_code("/api/ws", headers)) == 4403


def test_it_closes_when_the_session_is_logged_out(alice: User, client: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(consumers, "AUTH_CHECK_SECONDS", 0.1)
    monkeypatch.setattr(consumers, "POLL_SECONDS", 0.1)
    client.force_login(alice)
    cookie = f"sessionid={client.cookies['sessionid'].value}".encode()

    async def go() -> Any:
        comm = communicator("/api/ws", [(b"cookie", cookie)])
        assert (await comm.connect())[0]
        assert await comm.receive_nothing(timeout=0.4)
        await sync_to_async(client.logout)()
        closed = await comm.receive_output(timeout=5)
        await comm.wait()
        return closed

    assert run(go())["code"] == 4401


class FlakyRedisLayer:
    """Stands in for channels-redis' pub/sub layer: every call fails while ``down``."""

    def __init__(self) -> None:
        self.down = True
        self.groups: dict[str, set[str]] = {}
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def new_channel(self, prefix: str) -> str:
        if self.down:
            raise ConnectionError("Connection refused.")
        return f"{prefix}test"

    async def group_add(self, group: str, channel: str) -> None:
        if self.down:
            raise ConnectionError("Connection closed by server.")
        self.groups.setdefault(group, set()).add(channel)

    async def group_discard(self, group: str, channel: str) -> None:
        if self.down:
            raise ConnectionError("Connection closed by server.")
        self.groups.get(group, set()).discard(channel)

    async def receive(self, channel: str) -> dict[str, Any]:
        return await self.inbox.get()


def test_hub_survives_redis_being_down_and_joins_its_channels_when_it_is_back(
    monkeypatch: Any, settings: Any
) -> None:
    """A Redis that is down never fails a listener; the hub subscribes once it is back, and
    a doorbell makes it read the table and hand what it found to its listeners."""
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    redis = FlakyRedisLayer()
    monkeypatch.setattr(hub_module, "get_channel_layer", lambda alias="default": redis)
    monkeypatch.setattr(Hub, "JOIN_SECONDS", 0.05)
    monkeypatch.setattr(hub_module, "POLL_SECONDS", 3600)
    table: list[dict[str, Any]] = []

    async def head(self: Any, company_id: str) -> Any:
        return (0, 0)

    async def read(self: Any, company_id: str, after: Any) -> Any:
        found = [e for e in table if decode_cursor(e["cursor"]) > after]
        return found, decode_cursor(found[-1]["cursor"]) if found else after

    monkeypatch.setattr(Hub, "_head", head)
    monkeypatch.setattr(Hub, "_read", read)
    local_hub = Hub()
    group = company_group("c1")
    got: list[LiveRange] = []

    async def until(condition: Any) -> None:
        for _ in range(300):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("timed out")

    async def scenario() -> None:
        await local_hub.listen("c1", got.append)  # Redis refuses: no exception
        assert "c1" in local_hub.listeners and group not in redis.groups
        redis.down = False
        await until(lambda: group in redis.groups)
        assert redis.groups[group] == {"flowplay-hub.test"}
        await asyncio.sleep(0.05)  # the first sweep has read the (empty) table
        events = [{"cursor": encode_cursor((7, 1)), "seq": 1, "type": "play:started", "playId": "p1"}]
        table.extend(events)
        await redis.inbox.put(doorbell("c1", events[0]["cursor"]))
        await until(lambda: got)
        assert got == [LiveRange((0, 0), [live_event(events[0])], (7, 1))]
        assert local_hub.position("c1") == (7, 1)
        redis.down = True
        await local_hub.unlisten("c1", got.append)  # Redis down again: leaving does not fail either
        assert "c1" not in local_hub.listeners
        for task in local_hub.tasks:
            task.cancel()

    run(scenario())
