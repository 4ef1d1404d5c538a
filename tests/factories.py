"""Builders the tests share: one way to make a flow, to start a play and to run it to its end.

``client`` is DRF's ``APIClient`` in the unit tests or an ``httpx.Client`` against a real
server in the integration tests; both get the same requests and the same checks.
"""

from __future__ import annotations

from typing import Any

import httpx


def _post(client: Any, url: str, body: dict[str, Any]) -> Any:
    if isinstance(client, httpx.Client):
        return client.post(url, json=body)
    return client.post(url, body, format="json")


def make_flow(client: Any, layers: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    """POST /api/flows (named "Test flow" unless ``name`` is given); the created flow."""
    body = {"name": fields.pop("name", "Test flow"), "layers": layers, **fields}
    r = _post(client, "/api/flows", body)
    assert r.status_code == 201, r.content
    return r.json()


def flow_row(client: Any, layers: list[dict[str, Any]], **fields: Any) -> Any:
    """``make_flow`` through the API, returned as the ``Flow`` row."""
    from flows.models import Flow

    return Flow.objects.get(pk=make_flow(client, layers, **fields)["id"])


def trigger(client: Any, flow: dict[str, Any] | str, args: dict[str, Any] | None = None, **body: Any) -> dict[str, Any]:
    """POST /api/flows/{id}/run; the answer (``playId``, ``state``, ...). Nothing runs yet."""
    flow_id = flow if isinstance(flow, str) else flow["id"]
    r = _post(client, f"/api/flows/{flow_id}/run", {"args": args or {}, **body})
    assert r.status_code in (200, 201), r.content  # 200: an idempotency key seen before
    return r.json()


def run(client: Any, flow: dict[str, Any] | str, drain: Any, args: dict[str, Any] | None = None, **body: Any) -> str:
    """Trigger a play and drive it to its end in this process (the ``drain`` fixture); its id."""
    play_id = trigger(client, flow, args, **body)["playId"]
    drain()
    return play_id


def make_play(flow: Any, user: Any = None, args: dict[str, Any] | None = None, **trigger_kw: Any) -> Any:
    """A new ``Play`` of ``flow`` made by the model verb, left as ``Play.trigger`` leaves it
    (nothing drains the queue, so no step runs)."""
    from plays.models import Play

    play, created = Play.trigger(flow, args or {}, user=user, **trigger_kw)
    assert created
    return play


def run_module(app_id: str, args: Any, ctx: Any = None) -> Any:
    """Run one module directly and hold its out to the module's own out_schema."""
    from jsonschema import Draft202012Validator

    from flows.modules import RunContext, get_module

    module = get_module(app_id)
    assert module is not None
    out = module.run(args, ctx or RunContext())
    Draft202012Validator(module.out_schema).validate(out)
    return out


def check_module(app_id: str, args: Any) -> dict[str, list[str]]:
    """A module's own check of ``args``: the problems by field."""
    from flows.modules import get_module

    module = get_module(app_id)
    assert module is not None
    return module.check(args)
