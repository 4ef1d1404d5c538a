"""The OpenAPI document as a contract, against the real server (`make run`).

- schemathesis fuzzes every operation from the served schema (`--checks all`, positive and
  negative data, a fixed seed, a bounded number of examples): 0 failures;
- a client generated from the served schema by openapi-python-client walks the README's
  first play: create a flow, run it twice with one key (201 then 200), poll, layers,
  history with a state filter and paging, the API key list with a never-used key, and a
  PATCH of a step's args only, which keeps its approval gate;
- WebSocket refusals arrive as close codes 4400/4401/4403 through the real Daphne (a close
  before the accept would be an HTTP 403 for all of them);
- the README's JavaScript example run by Node.js: it subscribes
  first, triggers, and prints step and play events.
"""

from __future__ import annotations

import importlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from .conftest import ROOT, Server

# The contract is the web server's: CI runs it once, on the embedded default (web_only).
pytestmark = [pytest.mark.integration, pytest.mark.web_only]

BIN = Path(sys.executable).parent
JS_DIR = Path(__file__).parent / "js"


def api_key(client: httpx.Client, name: str) -> dict[str, Any]:
    r = client.post("/api/auth/api-keys", json={"name": name})
    assert r.status_code == 201, r.text
    return r.json()


def test_schemathesis_finds_no_contract_violation(server: Server, tmp_path: Path) -> None:
    # The fuzzer writes as a user of a company of its own (flows with made-up queues,
    # schedules, channels…), which is switched off afterwards: the other tests of this
    # server, and its readiness, are not concerned.
    slug = f"fuzz-{secrets.token_hex(3)}"
    token = (
        server.manage(
            "shell",
            "-c",
            (
                "from tenancy.models import ApiKey, Company, User; "
                f"c = Company.objects.create(name='Fuzz {slug}', slug='{slug}'); "
                f"u = User.objects.create_user('{slug}', '{slug}@fuzz.test', 'integration-pass-123', company=c); "
                "print(ApiKey.issue(u, 'schemathesis')[1])"
            ),
        )
        .strip()
        .splitlines()[-1]
    )
    # Logout would end nothing of ours (a bearer key) but login is throttled per address:
    # hammering it would lock the other tests of this server out. Both are fuzzed in-process
    # by tests/test_schema.py.
    try:
        proc = run_schemathesis(server, token, tmp_path)
    finally:
        server.manage(
            "shell",
            "-c",
            (
                "from django.apps import apps; from django.utils import timezone; from flows.models import Flow; "
                f"Flow.objects.filter(company__slug='{slug}').update(enabled=False, deleted_at=timezone.now()); "
                "[m.objects.filter(company__slug="
                f"'{slug}'"
                ").update(enabled=False) "
                "for m in apps.get_models() if m._meta.app_label == 'triggers' "
                "and {'company', 'enabled'} <= {f.name for f in m._meta.get_fields()}]"
            ),
        )
    summary = proc.stdout[-6000:]
    assert proc.returncode == 0, summary
    assert "passed" in summary and " failures" not in summary.split("SUMMARY")[-1], summary


def run_schemathesis(server: Server, token: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(BIN / "schemathesis"),
            "--config-file",
            str(Path(__file__).parent / "schemathesis.toml"),
            "run",
            f"{server.url}/api/schema?format=json",
            "-H",
            f"Authorization: Bearer {token}",
            "--checks",
            "all",
            "--mode",
            "all",
            "--seed",
            "1",
            "--max-examples",
            "10",
            "--exclude-path",
            "/api/auth/login",
            "--exclude-path",
            "/api/auth/logout",
            "--no-color",
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )


@pytest.fixture(scope="module")
def generated(server: Server, alice_session: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The client package openapi-python-client generates from the served schema."""
    out = tmp_path_factory.mktemp("client")
    schema = alice_session.get("/api/schema", params={"format": "json"})
    assert schema.status_code == 200, schema.text
    (out / "schema.json").write_bytes(schema.content)
    package = f"flowplay_client_{secrets.token_hex(3)}"
    proc = subprocess.run(
        [
            str(BIN / "openapi-python-client"),
            "generate",
            "--path",
            str(out / "schema.json"),
            "--meta",
            "none",
            "--output-path",
            str(out / package),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=out,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Every operation was generated: no warning about a skipped endpoint or parameter.
    assert "Unable to" not in proc.stdout + proc.stderr and "Skipping" not in proc.stdout.replace(
        "Skipping Integration", ""
    ), proc.stdout
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module(package)
    finally:
        sys.path.remove(str(out))


def test_a_generated_client_walks_the_first_play(server: Server, alice: httpx.Client, generated: Any) -> None:
    pkg = generated.__name__
    mod = lambda name: importlib.import_module(f"{pkg}.{name}")  # noqa: E731
    models = mod("models")
    token = api_key(alice, "generated client")["token"]
    unused = api_key(alice, "never used")
    client = generated.AuthenticatedClient(base_url=server.url, token=token, raise_on_unexpected_status=True)
    tag = secrets.token_hex(3)

    # Create the flow (two steps, like the README's download + extract).
    body = models.FlowRequest.from_dict(
        {
            "name": f"Invoice processing {tag}",
            "permanentId": f"invoice-processing-{tag}",
            "layers": [
                {
                    "ref": "downloadPdf",
                    "appId": "var",
                    "args": {"values": {"invoice": "{{ $prev.args.invoiceId }}"}},
                    "retry": {"count": 2, "delayMs": 500, "backoffMultiplier": 2, "jitter": True},
                },
                {
                    "ref": "extractText",
                    "appId": "template",
                    "args": {"template": "Invoice {{ id }}", "data": {"id": "{{ $prev.downloadPdf.invoice }}"}},
                },
            ],
        }
    )
    created = mod("api.flows.flows_create").sync_detailed(client=client, body=body)
    assert created.status_code == 201, created.content
    flow = created.parsed
    assert [layer.ref for layer in flow.layers] == ["downloadPdf", "extractText"]

    # Run twice with one idempotency key: 201, then 200 with the same play.
    run = mod("api.flows.flows_run_create")
    request = models.RunRequest.from_dict({"args": {"invoiceId": "INV-001"}, "idempotencyKey": f"inv-{tag}"})
    first = run.sync_detailed(flow.permanent_id, client=client, body=request)
    again = run.sync_detailed(flow.permanent_id, client=client, body=request)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.parsed.play_id == again.parsed.play_id
    play_id = first.parsed.play_id

    # Poll until it ends.
    retrieve = mod("api.plays.plays_retrieve")
    deadline = time.monotonic() + 60
    while (play := retrieve.sync(play_id, client=client)).state.value not in ("DONE", "FAIL"):
        assert time.monotonic() < deadline, play.state
        time.sleep(0.2)
    assert play.state.value == "DONE" and play.pending_approval is None

    layers = mod("api.plays.plays_layers_list").sync(play_id, client=client)
    assert [(layer.ref, layer.state.value) for layer in layers] == [("downloadPdf", "DONE"), ("extractText", "DONE")]
    assert layers[1].out == {"result": "Invoice INV-001"}

    events = mod("api.plays.plays_events_list").sync(play_id, client=client, since=0, limit=100)
    assert [e.type_.value for e in events][0] == "play:started" and events[-1].type_.value == "play:completed"
    assert events[-1].duration is not None and events[2].ref == "downloadPdf"

    # A second play (another key), then history: state filter and paging, both endpoints.
    second = run.sync_detailed(flow.id, client=client, body=models.RunRequest.from_dict({"args": {"invoiceId": "2"}}))
    assert second.status_code == 201
    done = [models.PlayStateEnum("DONE")]
    history = mod("api.flows.flows_plays_list")
    page0 = history.sync(flow.id, client=client, state=done, size=1, page=0)
    assert page0.total >= 1 and page0.size == 1 and len(page0.data) == 1 and page0.data[0].state.value == "DONE"
    everything = mod("api.plays.plays_list").sync(client=client, flow_id=flow.id, size=1, page=1)
    assert everything.total == 2 and everything.pages == 2 and len(everything.data) == 1
    import datetime as dt

    today = dt.datetime.now(dt.UTC).date()
    several = [
        models.PlayStateEnum("DONE"),
        models.PlayStateEnum("RUN"),
        models.PlayStateEnum("NEW"),
        models.PlayStateEnum("FAIL"),
    ]
    ranged = mod("api.plays.plays_list").sync(
        client=client, flow_id=flow.id, state=several, from_=today - dt.timedelta(days=1), to=today
    )
    assert ranged.total == 2

    # API keys: the never-used one has lastUsedAt null, and the list parses.
    keys = mod("api.auth.auth_api_keys_list").sync(client=client)
    never = next(k for k in keys if k.id == unused["id"])
    assert never.last_used_at is None

    # PATCH a step's args only: its approval gate stays.
    gated = mod("api.flows.flows_create").sync(
        client=client,
        body=models.FlowRequest.from_dict(
            {
                "name": f"Gated {tag}",
                "layers": [
                    {
                        "ref": "pay",
                        "appId": "var",
                        "args": {"values": {"n": 1}},
                        "needsApproval": True,
                        "onError": "continue",
                        "name": "Pay",
                    }
                ],
            }
        ),
    )
    step = gated.layers[0]
    patch = mod("api.flows.flows_layers_partial_update")
    patched = patch.sync(
        gated.id, step.id, client=client, body=models.PatchedFlowletRequest.from_dict({"args": {"values": {"n": 2}}})
    )
    assert patched.args.to_dict() == {"values": {"n": 2}} if hasattr(patched.args, "to_dict") else True
    assert (patched.needs_approval, patched.on_error.value, patched.name) == (True, "continue", "Pay")
    raw = alice.get(f"/api/flows/{gated.id}").json()["layers"][0]
    assert (raw["needsApproval"], raw["onError"], raw["name"], raw["args"]) == (
        True,
        "continue",
        "Pay",
        {"values": {"n": 2}},
    )

    # An error is the typed error body.
    missing = retrieve.sync_detailed("nope", client=generated.AuthenticatedClient(base_url=server.url, token=token))
    assert missing.status_code == 404 and missing.parsed.error == "PLAY_NOT_FOUND"


def test_the_schema_without_credentials_is_a_json_401(server: Server) -> None:
    r = httpx.get(f"{server.url}/api/schema")
    assert r.status_code == 401 and r.headers["content-type"].startswith("application/json")
    assert r.json()["error"] == "UNAUTHORIZED" and r.json()["statusCode"] == 401


# --- WebSocket refusals through Daphne --------------------------------------------------


def close_code(url: str, headers: dict[str, str] | None = None) -> int | None:
    """The close code the server ends the connection with, before sending any event."""
    with connect(url, additional_headers=headers or {}, open_timeout=30) as ws:
        try:
            message = ws.recv(timeout=30)
        except ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else None
    raise AssertionError(f"expected a close, got a message: {message}")


def test_websocket_refusals_close_with_documented_codes(server: Server, alice: httpx.Client) -> None:
    ws = f"ws://127.0.0.1:{server.port}/api/ws"
    key = api_key(alice, "ws refusals")
    revoked = api_key(alice, "ws revoked")
    assert alice.delete(f"/api/auth/api-keys/{revoked['id']}").status_code == 204
    cookie = {"Cookie": f"sessionid={alice.cookies['sessionid']}"}
    # Another company's play and flow.
    tag = secrets.token_hex(3)
    other = (
        server.manage(
            "shell",
            "-c",
            (
                "from tenancy.models import ApiKey, Company, User; "
                f"c = Company.objects.create(name='Initech {tag}', slug='initech-{tag}'); "
                f"u = User.objects.create_user('dave-{tag}', 'dave-{tag}@initech.test', 'integration-pass-123', company=c); "
                "print(ApiKey.issue(u, 'ws')[1])"
            ),
        )
        .strip()
        .splitlines()[-1]
    )
    dave = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {other}"}, timeout=30)
    flow = dave.post(
        "/api/flows", json={"name": "theirs", "layers": [{"ref": "a", "appId": "var", "args": {"values": {}}}]}
    ).json()
    play = dave.post(f"/api/flows/{flow['id']}/run", json={}).json()["playId"]

    cases = [
        (f"{ws}", {}, 4401),
        (f"{ws}?token=fp_00000000_not-a-real-token", {}, 4401),
        (f"{ws}?token={revoked['token']}", {}, 4401),
        (f"{ws}?token=nope", cookie, 4401),  # a bad token beside a valid cookie
        (f"{ws}?token={key['token']}&since=-1", {}, 4400),
        (f"{ws}?token={key['token']}&since=abc", {}, 4400),
        (f"{ws}?token={key['token']}&since={2**63}", {}, 4400),
        (f"{ws}?token={key['token']}&playId={play}", {}, 4403),
        (f"{ws}?token={key['token']}&flowId={flow['id']}", {}, 4403),
        (f"{ws}", {**cookie, "Origin": "http://evil.test:8000"}, 4403),  # cross-site WebSocket hijacking
    ]
    got = [(url.replace(key["token"], "<key>"), close_code(url, headers)) for url, headers, _ in cases]
    assert [code for _, code in got] == [code for _, _, code in cases], got
    # The same key with good parameters is accepted and answers.
    with connect(f"{ws}?token={key['token']}&since={'0' * 32}", open_timeout=30) as good:  # the start
        good.send('{"type": "ping"}')
        deadline = time.monotonic() + 30
        while '"pong"' not in good.recv(timeout=30):  # after the replay of the stored events
            assert time.monotonic() < deadline


# --- The README's JavaScript example ----------------------------------------------------


def test_the_readme_javascript_example_subscribes_then_triggers(
    server: Server, alice: httpx.Client, tmp_path: Path
) -> None:
    node = shutil.which("node")
    assert node, "Node.js is required for this test (apt-get install nodejs)"
    flags = []
    if subprocess.run([node, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"]).returncode != 0:
        flags = ["--experimental-websocket"]
    tag = secrets.token_hex(3)
    flow = alice.post(
        "/api/flows",
        json={
            "name": f"JS {tag}",
            "permanentId": f"invoice-processing-js-{tag}",
            "layers": [
                {"ref": "downloadPdf", "appId": "var", "args": {"values": {"invoice": "{{ $prev.args.invoiceId }}"}}},
                {
                    "ref": "extractText",
                    "appId": "template",
                    "args": {"template": "Invoice {{ id }}", "data": {"id": "{{ $prev.downloadPdf.invoice }}"}},
                },
            ],
        },
    ).json()
    # The example exactly as the README shows it; only the host and the flow differ here.
    source = (JS_DIR / "readme_client.js").read_text()
    script = tmp_path / "readme_client.js"
    script.write_text(
        source.replace("localhost:4454", f"127.0.0.1:{server.port}").replace(
            "'invoice-processing'", f"'{flow['permanentId']}'"
        )
    )
    token = api_key(alice, "readme js")["token"]
    proc = subprocess.run(
        [node, *flags, str(script)],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "FLOWPLAY_TOKEN": token},
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    triggered = next(line for line in lines if line.startswith("Triggered play "))
    play_id = triggered.split()[-1]
    assert f"Play {play_id} started (RUN)" in lines, lines
    assert "Step downloadPdf → RUN" in lines
    assert 'Step downloadPdf → DONE {"invoice":"INV-001"}' in lines
    assert 'Step extractText → DONE {"result":"Invoice INV-001"}' in lines
    assert f"Play {play_id} completed (DONE)" in lines, lines
    assert lines.index(f"Play {play_id} started (RUN)") < lines.index(f"Play {play_id} completed (DONE)")
    assert not any("undefined" in line for line in lines), lines


def test_the_readme_example_is_the_file_the_test_runs() -> None:
    fragment = (ROOT / "README.md").read_text()
    assert (JS_DIR / "readme_client.js").read_text().strip() in fragment
