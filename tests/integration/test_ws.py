"""The WebSocket /api/ws against the real server (`make run`): real clients, real worker.

Clients are the `websockets` package, a raw socket where the test must misbehave at the
protocol level (never answer pings, never read), the seed page's JavaScript run by
Node.js, and the wsbench command.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import select
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from ..factories import make_flow, trigger
from .conftest import Server, wait_for

pytestmark = pytest.mark.integration

TERMINAL_EVENTS = {"play:completed", "play:failed"}
JS_DIR = Path(__file__).parent / "js"

# The keys of each event type (spec section 4), beyond type, seq, cursor, playId, flowId, timestamp.
EXTRA_KEYS = {
    "play:started": {"state"},
    "play:layer:started": {"layerId", "ref", "state"},
    "play:layer:completed": {"layerId", "ref", "state", "out"},
    "play:layer:failed": {"layerId", "ref", "state", "error"},
    "play:completed": {"state", "duration"},
    "play:failed": {"state", "ref", "error", "duration"},
    "play:waiting": {"layerId", "ref"},
    "play:state": {"state", "previousState"},
}


def ws_url(server: Server, **params: Any) -> str:
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return f"ws://127.0.0.1:{server.port}/api/ws" + (f"?{query}" if query else "")


def cookie_ws(server: Server, client: httpx.Client, **params: Any) -> ClientConnection:
    """A connection authenticated by the logged-in client's session cookie."""
    return connect(
        ws_url(server, **params),
        additional_headers={"Cookie": f"sessionid={client.cookies['sessionid']}"},
        open_timeout=30,
    )


def api_key(client: httpx.Client, name: str = "ws") -> dict[str, Any]:
    r = client.post("/api/auth/api-keys", json={"name": name})
    assert r.status_code == 201, r.text
    return r.json()


def stored(client: httpx.Client, play_id: str) -> list[dict[str, Any]]:
    r = client.get(f"/api/plays/{play_id}/events")
    assert r.status_code == 200, r.text
    return r.json()


def collect(
    ws: ClientConnection, until: Callable[[list[dict[str, Any]]], bool], timeout: float = 60
) -> list[dict[str, Any]]:
    """Messages until ``until(messages)`` holds; fails after ``timeout`` seconds."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while not until(got):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(
                f"timed out after {timeout} s with {len(got)} messages: {[m.get('type') for m in got]}"
            )
        try:
            got.append(json.loads(ws.recv(timeout=left)))
        except TimeoutError:
            continue
    return got


def ended(play_id: str) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda got: any(
        m["playId"] == play_id
        and m["type"] in TERMINAL_EVENTS | {"play:state"}
        and m.get("state") in ("DONE", "FAIL", "SKIP", "FILTERED")
        for m in got
    )


def quiet(ws: ClientConnection, seconds: float = 1.5) -> list[dict[str, Any]]:
    """Whatever arrives within ``seconds``."""
    got = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            got.append(json.loads(ws.recv(timeout=left)))
        except TimeoutError:
            break
    return got


def assert_shape(events: list[dict[str, Any]]) -> None:
    for e in events:
        assert set(e) >= {"type", "seq", "cursor", "playId", "flowId", "timestamp"} | EXTRA_KEYS[e["type"]], e
        assert e["timestamp"].endswith("Z")


@pytest.fixture
def three_steps(alice: httpx.Client) -> dict[str, Any]:
    return make_flow(
        alice,
        [
            {"ref": "first", "appId": "var", "args": {"values": {"n": "{{ $prev.args.n }}"}}},
            {"ref": "second", "appId": "var", "args": {"values": {"double": "{{ $prev.first.n * 2 }}"}}},
            {
                "ref": "third",
                "appId": "template",
                "args": {"template": "n={{ n }}", "data": {"n": "{{ $prev.second.double }}"}},
            },
        ],
    )


def test_a_three_step_play_streams_its_exact_event_sequence(
    server: Server, alice: httpx.Client, three_steps: dict[str, Any]
) -> None:
    with cookie_ws(server, alice, flowId=three_steps["id"]) as ws:
        play_id = trigger(alice, three_steps, {"n": 21})["playId"]
        got = collect(ws, ended(play_id))
        got += quiet(ws, 1.0)
    assert [(m["type"], m.get("ref"), m.get("state")) for m in got] == [
        ("play:started", None, "RUN"),
        ("play:layer:started", "first", "RUN"),
        ("play:layer:completed", "first", "DONE"),
        ("play:layer:started", "second", "RUN"),
        ("play:layer:completed", "second", "DONE"),
        ("play:layer:started", "third", "RUN"),
        ("play:layer:completed", "third", "DONE"),
        ("play:completed", None, "DONE"),
    ]
    assert_shape(got)
    assert [m["out"] for m in got if m["type"] == "play:layer:completed"] == [
        {"n": 21},
        {"double": 42},
        {"result": "n=42"},
    ]
    assert {m["playId"] for m in got} == {play_id} and {m["flowId"] for m in got} == {three_steps["id"]}
    seqs = [m["seq"] for m in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert got == stored(alice, play_id)
    assert got[-1]["duration"] >= 0


def test_a_failing_play_streams_the_failed_layer_and_the_play_error(server: Server, alice: httpx.Client) -> None:
    flow = make_flow(
        alice,
        [
            {"ref": "ok", "appId": "var", "args": {"values": {"x": 1}}},
            {"ref": "boom", "appId": "var", "args": {"values": {"y": "{{ 1 / 0 }}"}}},
            {"ref": "never", "appId": "var", "args": {"values": {"z": 1}}},
        ],
    )
    with cookie_ws(server, alice, flowId=flow["permanentId"]) as ws:
        play_id = trigger(alice, flow)["playId"]
        got = collect(ws, ended(play_id))
    assert_shape(got)
    types = [m["type"] for m in got]
    assert types[0] == "play:started" and types[-1] == "play:failed"
    assert "never" not in {m.get("ref") for m in got}
    layer_failed = [m for m in got if m["type"] == "play:layer:failed"]
    assert [(m["ref"], m["state"]) for m in layer_failed] == [("boom", "FAIL")]
    assert layer_failed[0]["error"]["code"] == "EXPRESSION_ERROR"
    failed = got[-1]
    assert failed["state"] == "FAIL" and failed["ref"] == "boom"
    assert failed["error"]["code"] == "STEP_FAILED" and failed["error"]["ref"] == "boom"
    assert got == stored(alice, play_id)


def test_a_filtered_step_is_a_completed_layer_in_state_filtered(server: Server, alice: httpx.Client) -> None:
    flow = make_flow(
        alice,
        [
            {
                "ref": "big",
                "appId": "var",
                "args": {"values": {"x": 1}},
                "filters": [
                    {"leftValue": "{{ $prev.args.amount }}", "operator": "gte", "rightValue": "1000", "cast": "number"}
                ],
            },
            {"ref": "always", "appId": "var", "args": {"values": {"y": 2}}},
        ],
    )
    with cookie_ws(server, alice, flowId=flow["id"]) as ws:
        play_id = trigger(alice, flow, {"amount": 5})["playId"]
        got = collect(ws, ended(play_id))
    assert_shape(got)
    big = [m for m in got if m.get("ref") == "big"]
    assert [(m["type"], m["state"]) for m in big] == [("play:layer:completed", "FILTERED")]
    assert got[-1]["type"] == "play:completed" and got[-1]["state"] == "DONE"
    assert got == stored(alice, play_id)


def test_a_skipped_play_streams_one_state_event(server: Server, alice: httpx.Client) -> None:
    flow = make_flow(
        alice,
        [{"ref": "a", "appId": "var", "args": {"values": {"x": 1}}}],
        filters=[{"leftValue": "{{ $prev.args.go }}", "operator": "eq", "rightValue": "yes"}],
    )
    with cookie_ws(server, alice, flowId=flow["id"]) as ws:
        play_id = trigger(alice, flow, {"go": "no"})["playId"]
        got = collect(ws, ended(play_id))
        got += quiet(ws, 1.0)
    assert_shape(got)
    assert [(m["type"], m["state"], m["previousState"]) for m in got] == [("play:state", "SKIP", "NEW")]
    assert got == stored(alice, play_id)


def test_deferral_and_approval_stream_state_and_waiting_events(server: Server, alice: httpx.Client) -> None:
    flow = make_flow(
        alice,
        [
            {"ref": "prepare", "appId": "var", "args": {"values": {"x": 1}}},
            {"ref": "pay", "appId": "var", "args": {"values": {"paid": True}}, "needsApproval": True},
        ],
    )
    with cookie_ws(server, alice, flowId=flow["id"]) as ws:
        r = alice.post(f"/api/flows/{flow['id']}/run", json={"args": {}, "delayMs": 300})
        assert r.status_code == 201, r.text
        play_id = r.json()["playId"]
        got = collect(ws, lambda g: any(m["type"] == "play:waiting" for m in g))
        waiting = got[-1]
        r = alice.post(f"/api/plays/{play_id}/approve", json={"layerId": waiting["layerId"], "decision": "approved"})
        assert r.status_code == 200, r.text
        got += collect(ws, ended(play_id))
    assert_shape(got)
    assert [(m["type"], m.get("ref"), m.get("state"), m.get("previousState")) for m in got] == [
        ("play:state", None, "DEFERRED", "NEW"),
        ("play:started", None, "RUN", None),
        ("play:layer:started", "prepare", "RUN", None),
        ("play:layer:completed", "prepare", "DONE", None),
        ("play:waiting", "pay", "WAIT", None),
        ("play:state", None, "RUN", "WAIT"),
        ("play:layer:started", "pay", "RUN", None),
        ("play:layer:completed", "pay", "DONE", None),
        ("play:completed", None, "DONE", None),
    ]
    assert got == stored(alice, play_id)


def test_a_connection_sees_only_its_company_and_its_filters(
    server: Server, alice: httpx.Client, three_steps: dict[str, Any]
) -> None:
    tag = secrets.token_hex(3)
    charlie_token = (
        server.manage(
            "shell",
            "-c",
            (
                "from tenancy.models import ApiKey, Company, User; "
                f"c = Company.objects.create(name='Globex {tag}', slug='globex-{tag}'); "
                f"u = User.objects.create_user('charlie-{tag}', 'charlie-{tag}@globex.test', 'integration-pass-123', company=c); "
                "print(ApiKey.issue(u, 'ws')[1])"
            ),
        )
        .strip()
        .splitlines()[-1]
    )
    charlie = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {charlie_token}"}, timeout=30)
    charlie_flow = make_flow(charlie, [{"ref": "c", "appId": "var", "args": {"values": {"secret": "globex"}}}])
    other = make_flow(alice, [{"ref": "o", "appId": "var", "args": {"values": {}}}])

    with (
        connect(ws_url(server, token=charlie_token)) as charlie_all,
        cookie_ws(server, alice) as alice_all,
        cookie_ws(server, alice, flowId=three_steps["id"]) as alice_flow,
    ):
        alice_play = trigger(alice, three_steps, {"n": 1})["playId"]
        with cookie_ws(server, alice, playId=alice_play) as alice_play_only:
            other_play = trigger(alice, other)["playId"]
            charlie_play = trigger(charlie, charlie_flow)["playId"]
            wait_for(alice, alice_play)
            wait_for(alice, other_play)
            wait_for(charlie, charlie_play)
            mine = collect(alice_all, lambda got: ended(alice_play)(got) and ended(other_play)(got))
            mine += quiet(alice_all)
            by_flow = collect(alice_flow, ended(alice_play)) + quiet(alice_flow)
            by_play = quiet(alice_play_only, 3)
        theirs = collect(charlie_all, ended(charlie_play)) + quiet(charlie_all)
    # Naming another company's flow is refused: accepted, then closed with 4403, nothing sent.
    with connect(ws_url(server, token=charlie_token, flowId=three_steps["id"])) as charlie_peeking:
        with pytest.raises(ConnectionClosed) as peeking:
            charlie_peeking.recv(timeout=30)
    assert peeking.value.rcvd is not None and peeking.value.rcvd.code == 4403

    assert {m["playId"] for m in mine} >= {alice_play, other_play}
    assert charlie_play not in {m["playId"] for m in mine}
    assert {m["playId"] for m in theirs} == {charlie_play}
    assert by_flow == stored(alice, alice_play)
    # Opened after the play started: a suffix of its events, and only its own.
    assert {m["playId"] for m in by_play} <= {alice_play}
    full = stored(alice, alice_play)
    assert by_play == full[len(full) - len(by_play) :]


def test_handshakes_without_valid_credentials_are_refused(server: Server, alice: httpx.Client) -> None:
    key = api_key(alice, "revoke me")
    with connect(ws_url(server, token=key["token"])) as ws:
        ws.send(json.dumps({"type": "ping"}))
        assert json.loads(ws.recv(timeout=10))["type"] == "pong"
    assert alice.delete(f"/api/auth/api-keys/{key['id']}").status_code == 204
    for url, headers, code in [
        (ws_url(server), {}, 4401),
        (ws_url(server, token="fp_00000000_not-a-real-token"), {}, 4401),
        (ws_url(server, token=key["token"]), {}, 4401),
        # A bad token is refused even beside a valid session cookie.
        (ws_url(server, token="nope"), {"Cookie": f"sessionid={alice.cookies['sessionid']}"}, 4401),
        # A cookie handshake from another origin's page (cross-site WebSocket hijacking).
        (ws_url(server), {"Cookie": f"sessionid={alice.cookies['sessionid']}", "Origin": "http://evil.test:8000"}, 4403),
    ]:
        # Accepted, then closed with a code that says why (no event is ever sent).
        with connect(url, additional_headers=headers, open_timeout=30) as refused:
            with pytest.raises(ConnectionClosed) as closed:
                refused.recv(timeout=30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == code, url


def test_reconnecting_with_since_loses_nothing_while_the_play_runs(server: Server, alice: httpx.Client) -> None:
    layers = []
    for i in range(5):
        layers.append({"ref": f"work{i}", "appId": "var", "args": {"values": {"i": i}}})
        layers.append({"ref": f"nap{i}", "appId": "sleep", "args": {"ms": 600}})
    flow = make_flow(alice, layers)
    token = api_key(alice)["token"]

    with connect(ws_url(server, token=token, flowId=flow["id"])) as first:
        play_id = trigger(alice, flow)["playId"]
        before = collect(first, lambda got: len(got) >= 4)
        # Killed mid-play, without a closing handshake, like a dropped network.
        first.socket.shutdown(socket.SHUT_RDWR)
    assert alice.get(f"/api/plays/{play_id}").json()["state"] not in ("DONE", "FAIL")
    time.sleep(1.0)  # events are written while nobody listens
    with connect(ws_url(server, token=token, flowId=flow["id"], since=before[-1]["cursor"])) as second:
        after = collect(second, ended(play_id), timeout=90)
        after += quiet(second, 1.0)

    union = before + after
    cursors = [m["cursor"] for m in union]
    assert len(cursors) == len(set(cursors)), "duplicate at the seam"
    assert union == stored(alice, play_id)
    assert after and after[0]["cursor"] > before[-1]["cursor"]
    assert union[-1]["type"] == "play:completed"


def test_the_seed_javascript_client_sees_layer_events(
    server: Server, alice: httpx.Client, three_steps: dict[str, Any], tmp_path: Path
) -> None:
    node = shutil.which("node")
    assert node, "Node.js is required for this test (apt-get install nodejs)"
    flags = []
    if subprocess.run([node, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"]).returncode != 0:
        flags = ["--experimental-websocket"]  # Node 20 and 21; global from 22 on
    token = api_key(alice, "seed js")["token"]
    source = (JS_DIR / "seed_client.js").read_text()
    script = tmp_path / "seed_client.js"
    script.write_text(
        source.replace("ws://localhost:4454/api/ws", f"ws://127.0.0.1:{server.port}/api/ws?token={token}")
    )
    proc = subprocess.Popen(
        [node, *flags, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "the script did not connect within 60 s"
        assert proc.stdout.readline().strip() == "OPEN", proc.stderr.read()
        # Deferred a little, so that the script knows the id before the first step starts.
        r = alice.post(f"/api/flows/{three_steps['id']}/run", json={"args": {"n": 5}, "delayMs": 1500})
        assert r.status_code == 201, r.text
        play_id = r.json()["playId"]
        proc.stdin.write(play_id + "\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert "Step first → RUN undefined" in lines
    assert "Step first → DONE { n: 5 }" in lines
    assert "Step second → DONE { double: 10 }" in lines
    assert "Step third → DONE { result: 'n=10' }" in lines
    assert lines.index("Step first → DONE { n: 5 }") < lines.index("Step third → DONE { result: 'n=10' }")


def test_wsbench_delivers_every_event_to_every_client(server: Server, alice: httpx.Client) -> None:
    token = api_key(alice, "wsbench")["token"]
    out = server.manage("wsbench", "--url", server.url, "--token", token, "--clients", "10", "--plays", "30")
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| clients |"))
    cells = [[c.strip() for c in lines[i].strip("|").split("|")] for i in (header, header + 2)]
    figures = dict(zip(*cells, strict=True))
    assert figures["plays"] == "30"
    assert int(figures["lost"]) == 0 and int(figures["duplicates"]) == 0 and int(figures["out of order"]) == 0
    assert int(figures["events delivered"]) == 10 * int(figures["events stored"]) > 0


# --- protocol-level misbehaviour --------------------------------------------------------


def raw_handshake(server: Server, token: str, query: str = "", rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /api/ws?token={token}{query} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    response = b""
    sock.settimeout(30)
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(1)
        assert chunk, "closed during the handshake"
        response += chunk
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def read_frame(sock: socket.socket) -> tuple[int, bytes] | None:
    """One frame (opcode, payload), or None when the server closed the TCP connection."""

    def exactly(n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            try:
                chunk = sock.recv(n - len(buf))
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            buf += chunk
        return buf

    head = exactly(2)
    if head is None:
        return None
    opcode, length = head[0] & 0x0F, head[1] & 0x7F
    if length == 126:
        length = struct.unpack("!H", exactly(2) or b"\0\0")[0]
    elif length == 127:
        length = struct.unpack("!Q", exactly(8) or b"\0" * 8)[0]
    payload = exactly(length) if length else b""
    return None if payload is None else (opcode, payload)


@pytest.mark.web_only  # Daphne's keepalive: 45 s of waiting, once is enough (CI's embedded half)
def test_the_server_pings_and_drops_a_client_that_never_answers(server: Server, alice: httpx.Client) -> None:
    assert "--ping-interval 15 --ping-timeout 30" in (Path(__file__).parents[2] / "Procfile").read_text()
    token = api_key(alice, "keepalive")["token"]
    # A flow that never runs: both connections receive no event, only pings.
    quiet_flow = make_flow(alice, [{"ref": "a", "appId": "var", "args": {"values": {}}}])
    nothing = f"&flowId={quiet_flow['id']}"
    with connect(ws_url(server, token=token, flowId=quiet_flow["id"])) as polite:  # answers pings (websockets does)
        sock = raw_handshake(server, token, nothing)
        opened = time.monotonic()
        sock.settimeout(90)
        first_ping = None
        while True:
            frame = read_frame(sock)
            if frame is None:
                break
            if frame[0] == 0x9 and first_ping is None:
                first_ping = time.monotonic() - opened
        dropped = time.monotonic() - opened
        sock.close()
        assert first_ping is not None and first_ping <= 15 + 5, first_ping
        assert 30 - 1 <= dropped - first_ping <= 30 + 5, (first_ping, dropped)
        # The client that answered its pings is still connected after the same time.
        polite.send(json.dumps({"type": "ping"}))
        assert json.loads(polite.recv(timeout=10))["type"] == "pong"


def test_a_client_that_stops_reading_is_closed_without_holding_up_others(server: Server, alice: httpx.Client) -> None:
    flow = make_flow(alice, [{"ref": "big", "appId": "var", "args": {"values": {"blob": "{{ $prev.args.blob }}"}}}])
    token = api_key(alice, "stalled")["token"]
    slow_closes_before = server.log("server").count("closing slow WebSocket client")
    stalled = raw_handshake(server, token, f"&flowId={flow['id']}", rcvbuf=4096)
    blob = "x" * 200_000
    with connect(ws_url(server, token=token, flowId=flow["id"]), max_size=None) as reader:
        plays = [trigger(alice, flow, {"blob": blob})["playId"] for _ in range(25)]
        got = collect(reader, lambda g: all(ended(p)(g) for p in plays), timeout=120)
    assert [m["cursor"] for m in got] == sorted(m["cursor"] for p in plays for m in stored(alice, p))
    # The server gives up on the stalled socket once its buffer stays full for 15 s
    # (STALL_SECONDS); the log says so. Only then does the client start reading: it finds
    # a prefix of the stream, in order, and then the end of the connection.
    deadline = time.monotonic() + 120
    while server.log("server").count("closing slow WebSocket client") <= slow_closes_before:
        assert time.monotonic() < deadline, "a client that never reads must be disconnected"
        time.sleep(0.5)
    stalled.settimeout(30)
    frames = []
    while (frame := read_frame(stalled)) is not None and frame[0] != 0x8:
        frames.append(frame)
    stalled.close()
    if frame is not None:
        assert struct.unpack("!H", frame[1][:2])[0] == 4008
    cursors = [json.loads(payload)["cursor"] for opcode, payload in frames if opcode == 0x1]
    assert cursors == [m["cursor"] for m in got][: len(cursors)]
    assert len(cursors) < len(got), "the stalled client was cut off before it had everything"
