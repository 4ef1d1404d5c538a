"""The seed page's examples, run against the server started with `make run`."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from .conftest import FileServer, Server, clone, wait_for

pytestmark = pytest.mark.integration


def invoice_flow(client: httpx.Client, files: FileServer, name: str) -> dict[str, Any]:
    r = client.post("/api/flows", json={
        "name": name,
        "category": "Finance",
        "layers": [
            {"ref": "downloadPdf", "name": "Download the invoice", "appId": "curl",
             "args": {"url": files.url + "/{{ $prev.args.invoiceId }}.pdf", "responseType": "binary"},
             "retry": {"count": 2, "delayMs": 200, "backoffMultiplier": 2, "jitter": True}},
            {"ref": "extractText", "appId": "pdf-extract", "args": {"content": "{{ $prev.downloadPdf }}"}},
        ],
    })
    assert r.status_code == 201, r.text
    return r.json()


def test_the_invoice_example_runs_end_to_end(server: Server, alice: httpx.Client, files: FileServer) -> None:
    flow = invoice_flow(alice, files, "Invoice processing (seed)")
    r = alice.post(f"/api/flows/{flow['id']}/run",
                   json={"args": {"invoiceId": "INV-001", "customerEmail": "client@example.com"}})
    assert r.status_code == 201
    assert r.json()["state"] == "RUN"
    play = wait_for(alice, r.json()["playId"])
    assert play["state"] == "DONE", play
    assert play["duration"] >= 0 and play["startedAt"] and play["completedAt"]
    layers = alice.get(f"/api/plays/{play['id']}/layers").json()
    assert [(x["ref"], x["state"]) for x in layers] == [("downloadPdf", "DONE"), ("extractText", "DONE")]
    assert layers[0]["out"]["statusCode"] == 200
    assert layers[0]["out"]["headers"]["content-type"] == "application/pdf"
    assert "Invoice #INV-001" in layers[1]["out"]["text"]


def test_the_seed_polling_loop_works_as_written(server: Server, alice: httpx.Client, files: FileServer, tmp_path: Any) -> None:
    assert shutil.which("jq"), "the seed's polling loop needs jq (apt-get install jq)"
    flow = invoice_flow(alice, files, "Invoice processing (poll)")
    email, password = server.users["alice"]
    base = f"http://localhost:{server.port}"
    script = textwrap.dedent(f"""
        set -e
        curl -s -c cookies.txt -X POST {base}/api/auth/login -H 'Content-Type: application/json' \\
             -d '{{"email": "{email}", "password": "{password}"}}' > /dev/null
        CSRF=$(awk '$6 == "csrftoken" {{print $7}}' cookies.txt)
        PLAY_ID=$(curl -s -b cookies.txt -X POST {base}/api/flows/{flow['permanentId']}/run \\
             -H 'Content-Type: application/json' -H "X-CSRFToken: $CSRF" \\
             -d '{{ "args": {{ "invoiceId": "INV-001", "customerEmail": "client@example.com" }}}}' | jq -r '.playId')
        # The seed's loop, verbatim but for the port:
        while true; do
          STATE=$(curl -s -b cookies.txt {base}/api/plays/$PLAY_ID | jq -r '.state')
          if [[ "$STATE" == "DONE" || "$STATE" == "FAIL" ]]; then
            echo "Final state: $STATE"
            break
          fi
          sleep 1
        done
        curl -s -b cookies.txt {base}/api/plays/$PLAY_ID/layers | jq -r '.[1].out.text'
    """)
    out = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Final state: DONE" in out.stdout
    assert "Invoice #INV-001" in out.stdout


def test_idempotency_over_http_under_concurrency(server: Server, alice: httpx.Client) -> None:
    flow = alice.post("/api/flows", json={"name": "Idempotent orders", "layers": [
        {"ref": "a", "appId": "var", "args": {"values": {"order": "{{ $prev.args.orderId }}"}}}]}).json()
    body = {"args": {"orderId": "ORD-999"}, "idempotencyKey": "process-order-ORD-999"}
    clients = [clone(alice) for _ in range(10)]

    def post(i: int) -> tuple[int, str]:
        r = clients[i % len(clients)].post(f"/api/flows/{flow['id']}/run", json=body)
        return r.status_code, r.json().get("playId", r.text)

    with ThreadPoolExecutor(max_workers=25) as pool:
        results = list(pool.map(post, range(50)))
    statuses = [s for s, _ in results]
    assert statuses.count(201) == 1, results
    assert set(statuses) == {200, 201}
    assert len({play for _, play in results}) == 1
    play = wait_for(alice, results[0][1])
    assert play["state"] == "DONE"
    again = alice.post(f"/api/flows/{flow['id']}/run", json=body)
    assert again.status_code == 200 and again.json()["state"] == "DONE"
    listing = alice.get(f"/api/flows/{flow['id']}/plays?idempotencyKey=process-order-ORD-999").json()
    assert listing["total"] == 1
    for c in clients:
        c.close()


def test_history_filters_over_http(server: Server, alice: httpx.Client) -> None:
    flow = alice.post("/api/flows", json={"name": "Sometimes fails", "layers": [
        {"ref": "p", "appId": "json-parse", "args": {"input": "{{ $prev.args.doc }}"}}]}).json()
    ids = []
    for doc in ('{"a": 1}', "{broken", '{"b": 2}', "{bad"):
        ids.append(alice.post(f"/api/flows/{flow['id']}/run", json={"args": {"doc": doc}}).json()["playId"])
    for play_id in ids:
        wait_for(alice, play_id)
    failed = alice.get(f"/api/flows/{flow['id']}/plays?state=FAIL&size=25&page=0").json()
    assert failed["total"] == 2 and {p["id"] for p in failed["data"]} == {ids[1], ids[3]}
    assert all(p["error"]["code"] == "STEP_FAILED" and p["error"]["ref"] == "p" for p in failed["data"])
    both = alice.get(f"/api/flows/{flow['id']}/plays?state=DONE,FAIL&size=3").json()
    assert (both["total"], both["pages"], len(both["data"])) == (4, 2, 3)
    assert alice.get(f"/api/flows/{flow['id']}/plays?state=NOPE").status_code == 400
