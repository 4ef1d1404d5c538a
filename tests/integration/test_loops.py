"""Loops and subflows on the real server: iterations spread over the worker processes."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import FileServer, Server, wait_for

pytestmark = pytest.mark.integration


def _t(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def test_iterations_run_in_parallel_across_worker_processes(server: Server, alice: httpx.Client) -> None:
    flow = alice.post("/api/flows", json={"name": "Parallel naps", "layers": [
        {"ref": "each", "appId": "iterator", "args": {"items": "{{ $prev.args.items }}", "concurrency": 10}},
        # A sleep inside a loop waits in its worker process, so it shows which ran together.
        {"ref": "nap", "appId": "sleep", "args": {"ms": 400}},
        {"ref": "tag", "appId": "var", "args": {"values": {"i": "{{ $prev.each.index }}"}}},
        {"ref": "gather", "appId": "aggregator", "args": {"sourceRef": "tag", "field": "i"}},
    ]}).json()
    play_id = alice.post(f"/api/flows/{flow['id']}/run", json={"args": {"items": list(range(12))}}).json()["playId"]
    play = wait_for(alice, play_id, timeout=120)
    assert play["state"] == "DONE", play
    layers = alice.get(f"/api/plays/{play_id}/layers").json()
    gather = next(layer for layer in layers if layer["ref"] == "gather")
    assert gather["out"] == {"items": list(range(12)), "count": 12}
    naps = sorted((_t(layer["startedAt"]), _t(layer["completedAt"])) for layer in layers if layer["ref"] == "nap")
    assert len(naps) == 12
    # At least two naps overlapped in time: they ran in different worker processes.
    overlapping = sum(1 for (s1, e1), (s2, _) in zip(naps, naps[1:], strict=False) if s2 < e1)
    assert overlapping >= 1, naps
    serial = sum(e - s for s, e in naps)
    wall = max(e for _, e in naps) - min(s for s, _ in naps)
    print(f"\n12 iterations of 400 ms: loop wall time {wall:.2f} s, serial step time {serial:.2f} s")


def test_invoices_are_iterated_routed_reviewed_by_a_subflow_and_summarised_by_mail(
        server: Server, alice: httpx.Client) -> None:
    invoices = [{"id": f"INV-{i:03}", "amount": amount} for i, amount in enumerate([120, 2500, 80, 9900, 640], 1)]
    files = FileServer({"/invoices.json": (200, "application/json", json.dumps(invoices).encode())})
    try:
        review = alice.post("/api/flows", json={"name": "Large invoice review", "permanentId": "invoice-review", "layers": [
            {"ref": "check", "appId": "var",
             "args": {"values": {"reviewed": "{{ $prev.args.invoice.id }}", "flag": "{{ $prev.args.invoice.amount > 5000 }}"}}},
        ]})
        assert review.status_code == 201, review.text
        flow = alice.post("/api/flows", json={"name": "Invoice run", "layers": [
            {"ref": "list", "appId": "curl", "args": {"url": files.url + "/invoices.json"}},
            {"ref": "each", "appId": "iterator", "args": {"items": "{{ $prev.list.body }}", "concurrency": 4}},
            {"ref": "route", "appId": "router", "args": {"routes": [
                {"condition": "{{ $prev.each.item.amount >= 1000 }}", "label": "large"},
                {"condition": "true", "label": "small"}]}},
            {"ref": "review", "appId": "subflow", "args": {"flowId": "invoice-review", "args": {"invoice": "{{ $prev.each.item }}"}},
             "filters": [{"leftValue": "{{ $prev.route.route }}", "operator": "eq", "rightValue": "large"}]},
            {"ref": "line", "appId": "template", "args": {
                "template": "{{ id }}: {{ amount }} ({{ route }})", "data": {
                    "id": "{{ $prev.each.item.id }}", "amount": "{{ $prev.each.item.amount }}",
                    "route": "{{ $prev.route.route }}"}}},
            {"ref": "gather", "appId": "aggregator", "args": {"sourceRef": "line"}},
            {"ref": "mail", "appId": "send-mail", "args": {
                "to": ["finance@example.com"], "subject": "Invoice run: {{ $prev.gather.count }} invoices",
                "body": {"text": "{{ $prev.gather.items | tojson }}"}}},
        ]})
        assert flow.status_code == 201, flow.text
        flow = flow.json()
        play_id = alice.post(f"/api/flows/{flow['id']}/run", json={"args": {}}).json()["playId"]
        play = wait_for(alice, play_id, timeout=120)
        assert play["state"] == "DONE", (play, alice.get(f"/api/plays/{play_id}/layers").json())
        layers = alice.get(f"/api/plays/{play_id}/layers").json()
        reviews = [layer for layer in layers if layer["ref"] == "review"]
        assert [layer["state"] for layer in reviews] == ["FILTERED", "DONE", "FILTERED", "DONE", "FILTERED"]
        children = [layer["out"]["playId"] for layer in reviews if layer["state"] == "DONE"]
        for child_id in children:
            child = alice.get(f"/api/plays/{child_id}").json()
            assert child["parentPlayId"] == play_id and child["state"] == "DONE"
        assert [layer["out"]["out"]["reviewed"] for layer in reviews if layer["state"] == "DONE"] == ["INV-002", "INV-004"]
        gather = next(layer for layer in layers if layer["ref"] == "gather")["out"]
        assert gather["count"] == 5
        assert "INV-004: 9900 (large)" in json.dumps(gather["items"])
        mail = next(layer for layer in layers if layer["ref"] == "mail")
        assert mail["out"]["messageId"]
        sent = "\n".join(p.read_text(errors="replace") for p in Path(server.env["FLOWPLAY_VAR_DIR"], "mail").glob("*"))
        assert "Invoice run: 5 invoices" in sent and "finance@example.com" in sent
    finally:
        files.close()


def test_cancelling_a_parent_cancels_its_running_child(server: Server, alice: httpx.Client) -> None:
    child = alice.post("/api/flows", json={"name": "Slow child", "layers": [
        {"ref": "nap", "appId": "sleep", "args": {"ms": 60000}}]}).json()
    parent = alice.post("/api/flows", json={"name": "Parent", "layers": [
        {"ref": "call", "appId": "subflow", "args": {"flowId": child["id"]}}]}).json()
    play_id = alice.post(f"/api/flows/{parent['id']}/run", json={"args": {}}).json()["playId"]
    kids: list[Any] = []
    deadline = 60
    import time

    ends = time.monotonic() + deadline
    while not kids and time.monotonic() < ends:
        kids = [p for p in alice.get(f"/api/flows/{child['id']}/plays").json()["data"] if p["parentPlayId"] == play_id]
        time.sleep(0.2)
    assert kids, "the child play was not created"
    assert wait_for(alice, play_id, states=("DEFERRED",))["state"] == "DEFERRED"
    assert alice.post(f"/api/plays/{play_id}/cancel").status_code == 200
    assert alice.get(f"/api/plays/{kids[0]['id']}").json()["error"]["code"] == "CANCELLED"
