"""HTTP channels: the API (/api/channels, routes), /hooks/… requests and the request log.

The hooks app is an ASGI app; these tests call it through httpx's ASGI transport, in the
test's thread and transaction (``waiting.THREAD_SENSITIVE``). A fake worker coroutine runs
the enqueued plays meanwhile (``drain``), as a Celery worker would.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from typing import Any

import httpx
import pytest
from asgiref.sync import async_to_sync, sync_to_async
from rest_framework.test import APIClient

from plays.models import Play, State
from triggers import waiting
from triggers.channels import hooks_app, response_of
from triggers.models import Channel, ChannelRequest, Route, SeenSignature
from triggers.tasks import prune_requests_once

from .factories import make_flow


class NoHub:
    """The WebSocket hub reads the event table from another thread; the tests' transaction is
    invisible there, so the wait relies on its own polling."""

    async def subscribe(self, company_id: str) -> None:
        pass

    async def unsubscribe(self, company_id: str) -> None:
        pass


@pytest.fixture
def hooks(monkeypatch: Any, drain: Any) -> Any:
    monkeypatch.setattr(waiting, "THREAD_SENSITIVE", True)
    monkeypatch.setattr(waiting, "hub", NoHub())
    monkeypatch.setattr(waiting, "FIRST_POLL_SECONDS", 0.01)

    def send(
        method: str,
        path: str,
        *,
        content: bytes | str = b"",
        headers: dict[str, str] | None = None,
        run_plays: bool = True,
    ) -> httpx.Response:
        async def go() -> httpx.Response:
            async def worker() -> None:
                while True:
                    await sync_to_async(drain)()
                    await asyncio.sleep(0.01)

            task = asyncio.create_task(worker()) if run_plays else None
            try:
                transport = httpx.ASGITransport(app=hooks_app)
                async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
                    return await client.request(method, path, content=content, headers=headers or {})
            finally:
                if task is not None:
                    task.cancel()

        return async_to_sync(go)()

    return send


def echo_flow(api: APIClient, **fields: Any) -> dict[str, Any]:
    return make_flow(
        api,
        [
            {
                "ref": "echo",
                "appId": "var",
                "args": {
                    "values": {
                        "order": "{{ $prev.args.params.orderId }}",
                        "body": "{{ $prev.args.body }}",
                        "method": "{{ $prev.args.method }}",
                        "query": "{{ $prev.args.query }}",
                    }
                },
            }
        ],
        **fields,
    )


def channel(api: APIClient, **body: Any) -> dict[str, Any]:
    r = api.post("/api/channels", {"name": "Shop", **body}, format="json")
    assert r.status_code == 201, r.content
    return r.json()


def route(api: APIClient, channel_id: str, **body: Any) -> dict[str, Any]:
    r = api.post(f"/api/channels/{channel_id}/routes", body, format="json")
    assert r.status_code == 201, r.content
    return r.json()


def sign(secret: str, payload: bytes) -> str:
    return hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


# --- API ----------------------------------------------------------------------------------


def test_the_secret_is_shown_once_and_never_listed(api: APIClient) -> None:
    created = channel(api, slug="gh", authMode="hmac", hmacFormat="github")
    assert len(created["secret"]) == 64 and created["url"] == "/hooks/gh"
    shown = api.get(f"/api/channels/{created['id']}").json()
    assert "secret" not in shown and "token" not in shown
    assert created["secret"] not in json.dumps(api.get("/api/channels").json())


def test_a_header_token_is_stored_hashed(api: APIClient) -> None:
    created = channel(api, slug="tok", authMode="header_token")
    stored = Channel.objects.get(pk=created["id"])
    assert created["token"].startswith("fph_") and created["token"] not in (stored.token_hash, stored.secret)
    assert stored.token_hash == hashlib.sha256(created["token"].encode()).hexdigest()


def test_rotate_hands_out_a_new_token_and_the_old_one_stops_working(api: APIClient, hooks: Any) -> None:
    flow = echo_flow(api)
    created = channel(api, slug="rot", authMode="header_token")
    route(api, created["id"], path="/x", flowIds=[flow["id"]])
    new = api.post(f"/api/channels/{created['id']}/rotate").json()["token"]
    assert hooks("POST", "/hooks/rot/x", headers={"X-Hook-Token": created["token"]}).status_code == 401
    assert hooks("POST", "/hooks/rot/x", headers={"X-Hook-Token": new}).status_code == 202


def test_a_slug_is_unique_across_companies(api: APIClient, charlie_api: APIClient) -> None:
    channel(api, slug="orders")
    assert channel(api, name="Orders_In")["slug"] == "orders-in"
    assert channel(api, name="Orders in")["slug"] == "orders-in-2"
    r = charlie_api.post("/api/channels", {"name": "x", "slug": "orders"}, format="json")
    assert r.status_code == 400 and "slug" in r.json()["details"]


def test_charlie_cannot_see_or_change_alices_channel(api: APIClient, charlie_api: APIClient) -> None:
    created = channel(api, slug="mine")
    assert charlie_api.get(f"/api/channels/{created['id']}").status_code == 404
    assert charlie_api.patch(f"/api/channels/{created['id']}", {"enabled": False}, format="json").status_code == 404
    assert charlie_api.get(f"/api/channels/{created['id']}/routes").status_code == 404
    assert charlie_api.get("/api/channels").json()["total"] == 0


def test_a_route_names_flows_of_the_company_by_id_or_permanent_id(api: APIClient, charlie_api: APIClient) -> None:
    flow = echo_flow(api, permanentId="echo")
    theirs = echo_flow(charlie_api, permanentId="theirs")
    created = channel(api, slug="r")
    ok = route(api, created["id"], method="put", path="orders/{orderId}/", flowIds=["echo"])
    assert ok["flowIds"] == [flow["id"]] and ok["method"] == "PUT" and ok["path"] == "/orders/{orderId}"
    bad = api.post(f"/api/channels/{created['id']}/routes", {"path": "/a", "flowIds": [theirs["id"]]}, format="json")
    assert bad.status_code == 400 and "flowIds" in bad.json()["details"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"path": "/a/{x}/{x}", "flowIds": ["echo"]}, "path"),
        ({"path": "/a b", "flowIds": ["echo"]}, "path"),
        ({"path": "/a", "flowIds": ["echo"], "timeoutMs": 120_001}, "timeoutMs"),
        ({"path": "/a", "flowIds": ["echo"], "responseMode": "later"}, "responseMode"),
        ({"path": "/a", "flowIds": ["echo"], "idempotencyKey": "{{ $prev.args.headers[ }}"}, "idempotencyKey"),
        ({"path": "/a", "flowIds": ["echo"], "idempotencyKey": "{{ $prev.step.x }}"}, "idempotencyKey"),
        ({"path": "/a", "flowIds": []}, "flowIds"),
    ],
)
def test_bad_routes_are_400_naming_the_field(api: APIClient, body: dict[str, Any], field: str) -> None:
    echo_flow(api, permanentId="echo")
    created = channel(api, slug="v")
    r = api.post(f"/api/channels/{created['id']}/routes", body, format="json")
    assert r.status_code == 400 and field in r.json()["details"], r.content


def test_routes_can_be_read_changed_and_deleted(api: APIClient) -> None:
    flow = echo_flow(api)
    created = channel(api, slug="crud")
    made = route(api, created["id"], path="/a", flowIds=[flow["id"]])
    url = f"/api/channels/{created['id']}/routes/{made['id']}"
    assert api.get(url).json()["path"] == "/a"
    assert api.patch(url, {"responseMode": "sync", "timeoutMs": 500}, format="json").json()["timeoutMs"] == 500
    assert api.delete(url).status_code == 204
    assert api.get(url).status_code == 404
    assert api.delete(f"/api/channels/{created['id']}").status_code == 204
    assert not Route.objects.exists()


# --- Authentication -----------------------------------------------------------------------


def test_public_channel_takes_anyone(api: APIClient, hooks: Any) -> None:
    flow = echo_flow(api)
    route(api, channel(api, slug="pub")["id"], path="/x", flowIds=[flow["id"]])
    r = hooks("POST", "/hooks/pub/x", content=b'{"a": 1}', headers={"Content-Type": "application/json"})
    assert r.status_code == 202 and r.json()["status"] == "queued"


def test_header_token_good_and_bad(api: APIClient, hooks: Any) -> None:
    flow = echo_flow(api)
    created = channel(api, slug="tk", authMode="header_token")
    route(api, created["id"], path="/x", flowIds=[flow["id"]])
    assert hooks("POST", "/hooks/tk/x").status_code == 401
    assert hooks("POST", "/hooks/tk/x", headers={"X-Hook-Token": "fph_wrong"}).status_code == 401
    good = hooks("POST", "/hooks/tk/x", headers={"Authorization": f"Bearer {created['token']}"})
    assert good.status_code == 202
    play = Play.objects.get(pk=good.json()["playId"])
    assert "authorization" not in play.args["headers"]


def test_github_signature_good_bad_and_replayed(api: APIClient, hooks: Any) -> None:
    flow = echo_flow(api)
    created = channel(api, slug="gh", authMode="hmac", hmacFormat="github")
    route(api, created["id"], path="/push", flowIds=[flow["id"]])
    body = b'{"ref": "main"}'
    signed = {"Content-Type": "application/json", "X-Hub-Signature-256": "sha256=" + sign(created["secret"], body)}
    assert hooks("POST", "/hooks/gh/push", content=body, headers=signed).status_code == 202
    tampered = hooks("POST", "/hooks/gh/push", content=b'{"ref": "evil"}', headers=signed)
    assert tampered.status_code == 401 and tampered.json()["error"] == "UNAUTHORIZED"
    replayed = hooks("POST", "/hooks/gh/push", content=body, headers=signed)
    assert replayed.status_code == 401 and replayed.json()["error"] == "SIGNATURE_REPLAYED"
    assert hooks("POST", "/hooks/gh/push", content=body).status_code == 401
    assert Play.objects.count() == 1
    play = Play.objects.get()
    assert "x-hub-signature-256" not in play.args["headers"] and play.args["body"] == {"ref": "main"}


def test_stripe_signature_good_bad_old_and_replayed(api: APIClient, hooks: Any) -> None:
    flow = echo_flow(api)
    secret = "whsec_" + "s" * 32  # Stripe hands out the secret; the channel takes it
    created = channel(api, slug="stripe", authMode="hmac", hmacFormat="stripe", secret=secret, toleranceSeconds=300)
    assert created["secret"] == secret
    route(api, created["id"], path="/events", flowIds=[flow["id"]])
    body = b'{"type": "invoice.paid"}'

    def header(t: int, payload: bytes = body, key: str = secret) -> dict[str, str]:
        return {
            "Content-Type": "application/json",
            "Stripe-Signature": f"t={t},v1={sign(key, f'{t}.'.encode() + payload)},v0=ignored",
        }

    now = int(time.time())
    assert hooks("POST", "/hooks/stripe/events", content=body, headers=header(now)).status_code == 202
    wrong = hooks("POST", "/hooks/stripe/events", content=body, headers=header(now + 1, key="whsec_other_secret_1234"))
    assert wrong.status_code == 401 and wrong.json()["error"] == "UNAUTHORIZED"
    old = hooks("POST", "/hooks/stripe/events", content=body, headers=header(now - 301))
    assert old.status_code == 401 and old.json()["error"] == "SIGNATURE_EXPIRED"
    again = hooks("POST", "/hooks/stripe/events", content=body, headers=header(now))
    assert again.status_code == 401 and again.json()["error"] == "SIGNATURE_REPLAYED"
    assert hooks("POST", "/hooks/stripe/events", content=body, headers=header(now - 5)).status_code == 202
    assert Play.objects.count() == 2


def test_generic_signature_good_bad_old_and_replayed(api: APIClient, hooks: Any) -> None:
    flow = echo_flow(api)
    created = channel(api, slug="gen", authMode="hmac", hmacFormat="generic", toleranceSeconds=60)
    route(api, created["id"], path="/in", flowIds=[flow["id"]])
    body = b"plain text"

    def header(t: int, payload: bytes = body) -> dict[str, str]:
        return {
            "X-Signature-Timestamp": str(t),
            "X-Signature": "sha256=" + sign(created["secret"], f"{t}.".encode() + payload),
        }

    now = int(time.time())
    ok = hooks("POST", "/hooks/gen/in", content=body, headers=header(now))
    assert ok.status_code == 202 and Play.objects.get().args["body"] == "plain text"
    assert hooks("POST", "/hooks/gen/in", content=b"other", headers=header(now)).json()["error"] == "UNAUTHORIZED"
    assert hooks("POST", "/hooks/gen/in", content=body, headers=header(now - 61)).json()["error"] == "SIGNATURE_EXPIRED"
    assert hooks("POST", "/hooks/gen/in", content=body, headers=header(now)).json()["error"] == "SIGNATURE_REPLAYED"
    missing = {"X-Signature": header(now)["X-Signature"]}
    assert hooks("POST", "/hooks/gen/in", content=body, headers=missing).status_code == 401


# --- Routing and args ---------------------------------------------------------------------


def test_path_params_query_and_method_reach_the_args(api: APIClient, hooks: Any) -> None:
    flow = echo_flow(api)
    route(
        api, channel(api, slug="shop")["id"], method="PUT", path="/orders/{orderId}/items/{item}", flowIds=[flow["id"]]
    )
    r = hooks(
        "PUT",
        "/hooks/shop/orders/A-17/items/3?x=1&tag=a&tag=b",
        content=b'{"qty": 2}',
        headers={"Content-Type": "application/json", "Cookie": "session=1", "X-Trace": "t1"},
    )
    assert r.status_code == 202
    args = Play.objects.get(pk=r.json()["playId"]).args
    assert args["params"] == {"orderId": "A-17", "item": "3"} and args["method"] == "PUT"
    assert args["query"] == {"x": "1", "tag": ["a", "b"]} and args["body"] == {"qty": 2}
    assert args["path"] == "/orders/A-17/items/3" and args["headers"]["x-trace"] == "t1"
    assert "cookie" not in args["headers"]


def test_a_body_that_cannot_be_stored_as_sent_is_repaired_like_any_stored_value(api: APIClient, hooks: Any) -> None:
    flow = echo_flow(api)
    route(api, channel(api, slug="nul")["id"], path="/x", flowIds=[flow["id"]])
    body = b'{"name": "a\\u0000b", "odd": "\\ud800"}'
    first = hooks(
        "POST", "/hooks/nul/x", content=body, headers={"Content-Type": "application/json", "Idempotency-Key": "n"}
    )
    again = hooks(
        "POST", "/hooks/nul/x", content=body, headers={"Content-Type": "application/json", "Idempotency-Key": "n"}
    )
    assert first.status_code == 202 and again.json()["playId"] == first.json()["playId"]
    assert Play.objects.get().args["body"] == {"name": "a\ufffdb", "odd": "\ufffd"}


def test_unknown_route_is_404_and_a_wrong_method_405(api: APIClient, hooks: Any) -> None:
    flow = echo_flow(api)
    route(api, channel(api, slug="m")["id"], path="/only-post", flowIds=[flow["id"]])
    assert hooks("POST", "/hooks/m/nothing").status_code == 404
    wrong = hooks("GET", "/hooks/m/only-post")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert hooks("POST", "/hooks/nobody/only-post").json()["error"] == "CHANNEL_NOT_FOUND"


def test_a_disabled_channel_is_404(api: APIClient, hooks: Any) -> None:
    flow = echo_flow(api)
    created = channel(api, slug="off")
    route(api, created["id"], path="/x", flowIds=[flow["id"]])
    api.patch(f"/api/channels/{created['id']}", {"enabled": False}, format="json")
    r = hooks("POST", "/hooks/off/x")
    assert r.status_code == 404 and r.json()["error"] == "CHANNEL_NOT_FOUND" and not Play.objects.exists()
    assert ChannelRequest.objects.get().error == "CHANNEL_DISABLED"


def test_malformed_json_is_400(api: APIClient, hooks: Any) -> None:
    flow = echo_flow(api)
    route(api, channel(api, slug="j")["id"], path="/x", flowIds=[flow["id"]])
    r = hooks("POST", "/hooks/j/x", content=b"{nope", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["statusCode"] == 400 and not Play.objects.exists()
    deep = hooks("POST", "/hooks/j/x", content=b"[" * 150 + b"]" * 150, headers={"Content-Type": "application/json"})
    assert deep.status_code == 400 and "nested" in deep.json()["message"] and not Play.objects.exists()


def test_a_route_with_two_flows_starts_two_plays_tagged_with_the_request(api: APIClient, hooks: Any) -> None:
    first, second = echo_flow(api, name="a"), echo_flow(api, name="b")
    created = channel(api, slug="two")
    made = route(api, created["id"], path="/x", flowIds=[first["id"], second["id"]])
    r = hooks("POST", "/hooks/two/x")
    assert len(r.json()["playIds"]) == 2 and r.json()["playId"] == r.json()["playIds"][0]
    play = Play.objects.get(pk=r.json()["playId"])
    assert play.flow_id == first["id"]
    assert play.trigger_source == {
        "kind": "channel",
        "channelId": created["id"],
        "routeId": made["id"],
        "requestId": r.headers["x-flowplay-request-id"],
    }
    listed = api.get("/api/plays?trigger=channel").json()
    assert listed["total"] == 2 and listed["data"][0]["trigger"]["kind"] == "channel"


# --- Response modes -----------------------------------------------------------------------


def test_sync_answers_with_the_last_steps_output(api: APIClient, hooks: Any) -> None:
    flow = echo_flow(api)
    route(
        api,
        channel(api, slug="s")["id"],
        path="/orders/{orderId}",
        flowIds=[flow["id"]],
        responseMode="sync",
        timeoutMs=20_000,
    )
    r = hooks("POST", "/hooks/s/orders/9", content=b'{"n": 1}', headers={"Content-Type": "application/json"})
    assert r.status_code == 200
    assert r.json() == {"order": "9", "body": {"n": 1}, "method": "POST", "query": {}}
    assert Play.objects.get(pk=r.headers["x-flowplay-play-id"]).state == State.DONE


def test_sync_output_can_set_status_and_headers(api: APIClient, hooks: Any) -> None:
    flow = make_flow(
        api,
        [
            {
                "ref": "reply",
                "appId": "var",
                "args": {
                    "values": {
                        "statusCode": 201,
                        "headers": {"Location": "/orders/{{ $prev.args.params.id }}", "Content-Length": "1"},
                        "body": {"created": "{{ $prev.args.params.id }}"},
                    }
                },
            }
        ],
    )
    route(api, channel(api, slug="c")["id"], path="/orders/{id}", flowIds=[flow["id"]], responseMode="sync")
    r = hooks("POST", "/hooks/c/orders/5")
    assert r.status_code == 201 and r.headers["location"] == "/orders/5" and r.json() == {"created": "5"}


def test_sync_past_the_timeout_answers_202_with_the_play(api: APIClient, hooks: Any) -> None:
    flow = make_flow(api, [{"ref": "nap", "appId": "sleep", "args": {"ms": 60_000}}])
    route(api, channel(api, slug="slow")["id"], path="/x", flowIds=[flow["id"]], responseMode="sync", timeoutMs=300)
    r = hooks("POST", "/hooks/slow/x")
    assert r.status_code == 202 and r.json()["status"] == "running"
    play = Play.objects.get(pk=r.json()["playId"])
    assert play.state == State.DEFERRED  # the sleep parked it: no worker holds it either


def test_sync_failure_is_500_with_the_plays_error_code(api: APIClient, hooks: Any) -> None:
    flow = make_flow(api, [{"ref": "boom", "appId": "json-parse", "args": {"input": "{{ $prev.args.body }}"}}])
    route(api, channel(api, slug="f")["id"], path="/x", flowIds=[flow["id"]], responseMode="sync")
    r = hooks("POST", "/hooks/f/x", content=b"{not json", headers={"Content-Type": "text/plain"})
    assert r.status_code == 500 and r.json()["error"] == "STEP_FAILED" and r.json()["playId"]


def test_response_shape_is_only_taken_from_exactly_that_shape() -> None:
    assert response_of({"statusCode": 204})[0] == 204
    curl_like = {"statusCode": 500, "body": "x", "headers": {}, "duration": 3}
    assert response_of(curl_like)[0] == 200  # a curl step's output is data, not the answer
    assert response_of({"statusCode": True})[0] == 200
    assert response_of({"statusCode": 200, "body": "hi"})[1]["content-type"].startswith("text/plain")


# --- Dedup and limits ---------------------------------------------------------------------


def test_the_idempotency_key_header_returns_the_same_play(api: APIClient, hooks: Any) -> None:
    flow = echo_flow(api)
    route(api, channel(api, slug="d")["id"], path="/x", flowIds=[flow["id"]])
    first = hooks("POST", "/hooks/d/x", content=b"a", headers={"Idempotency-Key": "k1", "X-Try": "1"})
    retry = hooks("POST", "/hooks/d/x", content=b"a", headers={"Idempotency-Key": "k1", "X-Try": "2"})
    assert retry.json()["playId"] == first.json()["playId"] and retry.json()["duplicate"] is True
    other = hooks("POST", "/hooks/d/x", content=b"b", headers={"Idempotency-Key": "k1"})
    assert other.status_code == 409 and other.json()["error"] == "IDEMPOTENCY_KEY_REUSED"
    assert Play.objects.count() == 1


def test_a_route_expression_picks_the_key(api: APIClient, hooks: Any) -> None:
    flow = echo_flow(api)
    route(
        api,
        channel(api, slug="e")["id"],
        path="/x",
        flowIds=[flow["id"]],
        idempotencyKey='{{ $prev.args.headers["x-github-delivery"] }}',
    )
    a = hooks("POST", "/hooks/e/x", content=b"1", headers={"X-GitHub-Delivery": "guid-1"})
    b = hooks("POST", "/hooks/e/x", content=b"1", headers={"X-GitHub-Delivery": "guid-1"})
    c = hooks("POST", "/hooks/e/x", content=b"1", headers={"X-GitHub-Delivery": "guid-2"})
    assert a.json()["playId"] == b.json()["playId"] != c.json()["playId"]
    assert Play.objects.get(pk=a.json()["playId"]).idempotency_key == "guid-1"


def test_a_body_over_the_limit_is_413(api: APIClient, hooks: Any) -> None:
    flow = echo_flow(api)
    route(api, channel(api, slug="big", maxBodyBytes=100)["id"], path="/x", flowIds=[flow["id"]])
    assert hooks("POST", "/hooks/big/x", content=b"x" * 100).status_code == 202
    r = hooks("POST", "/hooks/big/x", content=b"x" * 101)
    assert r.status_code == 413 and r.json()["error"] == "PAYLOAD_TOO_LARGE"
    assert Play.objects.count() == 1


def test_the_rate_limit_answers_429_with_retry_after(api: APIClient, hooks: Any, monkeypatch: Any) -> None:
    from datetime import UTC, datetime
    from types import SimpleNamespace

    import triggers.models

    clock = SimpleNamespace(now=lambda: datetime(2026, 1, 1, 12, 0, 45, tzinfo=UTC))
    monkeypatch.setattr(triggers.models, "timezone", clock)
    flow = echo_flow(api)
    route(api, channel(api, slug="rl")["id"], path="/x", flowIds=[flow["id"]], rateLimitPerMinute=2)
    answers = [hooks("POST", "/hooks/rl/x", run_plays=False) for _ in range(3)]
    assert [r.status_code for r in answers] == [202, 202, 429]
    assert answers[2].headers["retry-after"] == "15" and answers[2].json()["error"] == "TOO_MANY_REQUESTS"
    assert Play.objects.count() == 2 and ChannelRequest.objects.filter(status=429).count() == 1


def test_rate_window_counts_and_rolls_over(api: APIClient) -> None:
    from datetime import UTC, datetime

    flow = echo_flow(api)
    made = route(api, channel(api, slug="w")["id"], path="/x", flowIds=[flow["id"]], rateLimitPerMinute=2)
    r = Route.objects.get(pk=made["id"])
    t = datetime(2026, 1, 1, 12, 0, 10, tzinfo=UTC)
    assert [r.take_rate_slot(t), r.take_rate_slot(t), r.take_rate_slot(t)] == [0, 0, 50]
    assert r.take_rate_slot(datetime(2026, 1, 1, 12, 1, 0, tzinfo=UTC)) == 0


# --- The request log ----------------------------------------------------------------------


def test_every_request_is_logged_redacted(api: APIClient, hooks: Any) -> None:
    flow = echo_flow(api)
    created = channel(api, slug="log", authMode="header_token")
    made = route(api, created["id"], path="/x", flowIds=[flow["id"]])
    body = json.dumps({"password": "hunter22", "note": "ok"}).encode()
    ok = hooks(
        "POST",
        "/hooks/log/x?a=1",
        content=body,
        headers={"Content-Type": "application/json", "X-Hook-Token": created["token"]},
    )
    hooks("POST", "/hooks/log/x", headers={"X-Hook-Token": "fph_bad"})
    entries = list(ChannelRequest.objects.order_by("received_at"))
    assert [(e.status, e.error) for e in entries] == [(202, ""), (401, "UNAUTHORIZED")]
    first = entries[0]
    assert first.route_id == made["id"] and first.play_id == ok.json()["playId"] and first.query == {"a": "1"}
    assert first.body == {"password": "[REDACTED]", "note": "ok"}
    assert first.headers["x-hook-token"] == "[REDACTED]" and created["token"] not in json.dumps(first.headers)
    listed = api.get(f"/api/channels/{created['id']}/requests").json()
    assert listed["total"] == 2 and listed["data"][0]["status"] == 401 and listed["data"][1]["playId"]


def test_the_channel_page_shows_routes_and_requests(
    api: APIClient, alice: Any, hooks: Any, client: Any, charlie: Any
) -> None:
    flow = echo_flow(api)
    created = channel(api, slug="page")
    route(api, created["id"], path="/orders/{orderId}", flowIds=[flow["id"]])
    played = hooks("POST", "/hooks/page/orders/1").json()["playId"]
    client.force_login(alice)
    page = client.get(f"/channels/{created['id']}/").content.decode()
    assert "/orders/{orderId}" in page and played in page and "202" in page
    assert "/hooks/page" in client.get("/channels/").content.decode()
    client.force_login(charlie)
    assert client.get(f"/channels/{created['id']}/").status_code == 404


def test_the_admin_lists_requests(api: APIClient, admin_client: Any, hooks: Any) -> None:
    flow = echo_flow(api)
    route(api, channel(api, slug="adm")["id"], path="/x", flowIds=[flow["id"]])
    hooks("POST", "/hooks/adm/x")
    entry = ChannelRequest.objects.get()
    assert "/x" in admin_client.get("/admin/triggers/channelrequest/").content.decode()
    assert entry.play_id in admin_client.get(f"/admin/triggers/channelrequest/{entry.pk}/change/").content.decode()


def test_retention_prunes_old_requests_but_keeps_the_newest(api: APIClient, settings: Any) -> None:
    from datetime import timedelta

    from django.utils import timezone

    settings.FLOWPLAY = {**settings.FLOWPLAY, "HOOK_LOG_DAYS": 7, "HOOK_LOG_KEEP": 2}
    made = Channel.objects.get(pk=channel(api, slug="old")["id"])
    now = timezone.now()
    for days in (30, 20, 10, 1):
        ChannelRequest.objects.create(
            channel=made, method="POST", path="/x", status=202, received_at=now - timedelta(days=days)
        )
    SeenSignature.objects.create(channel=made, digest="a" * 64, seen_at=now - timedelta(hours=1))
    assert prune_requests_once(now) == 2
    assert sorted((now - e.received_at).days for e in ChannelRequest.objects.all()) == [1, 10]
    assert not SeenSignature.objects.exists()
