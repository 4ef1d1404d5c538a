"""The operator's console in a real browser (issue 19): the complete play page, loops,
large and binary outputs, the dashboard and the flow page's Run form.

Debian's Chromium driven by Playwright against the server `make run` starts, like
test_browser.py; every page is checked with axe-core (tests/integration/axe.py). The
screenshots land in tests/artifacts/screenshots/ and, for the README, docs/screenshots/.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.polling import wait_until

from .axe import assert_no_axe_violations
from .conftest import FileServer, Server, wait_for
from .test_browser import chromium, log_in, make_flow, page, shot  # chromium, page: fixtures

pytestmark = [pytest.mark.integration, pytest.mark.browser]


def cards(page: Any) -> list[str]:
    return page.locator("#steps > li.step").evaluate_all("els => els.map(e => e.dataset.ref)")


def test_a_held_play_shows_its_unreached_steps(server: Server, alice: httpx.Client, page: Any) -> None:
    flow = make_flow(alice, "Month end", [
        {"ref": "export", "appId": "var", "args": {"values": {"month": "{{ $prev.args.month }}"}}},
        {"ref": "pause", "appId": "sleep", "args": {"ms": 600_000}},
        {"ref": "publish", "appId": "var", "args": {"values": {"done": True}},
         "filters": [{"leftValue": "{{ $prev.args.publish }}", "operator": "eq", "rightValue": True}]},
    ], category="Reports")
    play_id = alice.post(f"/api/flows/{flow['id']}/run", json={"args": {"month": "2024-01", "publish": False}}).json()["playId"]
    wait_until(lambda: alice.get(f"/api/plays/{play_id}").json()["state"] == "DEFERRED", 60, "the sleep to park the play")
    assert alice.post(f"/api/plays/{play_id}/hold").status_code == 200
    log_in(page, server)
    page.goto(f"{server.url}/plays/{play_id}/")
    page.wait_for_selector("#live-status[data-state='on']")
    assert page.locator("#play-state .badge").get_attribute("data-state") == "ON_HOLD"
    assert cards(page) == ["export", "pause", "publish"]
    assert page.locator("#step-export .badge").first.get_attribute("data-state") == "DONE"
    publish = page.locator("#step-publish")
    assert publish.locator(".badge[data-state='UNREACHED']").count() == 1
    assert "Args (as written)" in publish.inner_text()
    # The resolved args of a reached step.
    page.locator("#step-export summary", has_text="Args (resolved)").click()
    assert '"month": "2024-01"' in page.locator("#step-export .step__args pre").inner_text()
    # Who held it, in the history.
    page.locator("#history-details > summary").click()
    assert re.search(r"alice-\w+: Put a play on hold", page.locator("#play-history").inner_text())
    assert_no_axe_violations(page)
    shot(page, "play-held", docs=True)
    # Resumed and cancelled from the API: the page follows without a reload.
    page.evaluate("window.__same = true")
    assert alice.post(f"/api/plays/{play_id}/cancel").status_code == 200
    page.wait_for_selector("#play-state .badge[data-state='FAIL']")
    page.wait_for_selector("#play-history >> text=Cancelled a play")
    assert page.evaluate("window.__same") is True


def test_a_50_item_loop_is_summarised_and_its_items_arrive_in_order(server: Server, alice: httpx.Client,
                                                                     page: Any) -> None:
    flow = make_flow(alice, "Invoice batch", [
        {"ref": "each", "appId": "iterator", "args": {"items": "{{ $prev.args.docs }}", "concurrency": 4}},
        {"ref": "parse", "appId": "json-parse", "args": {"input": "{{ $prev.each.item }}"}, "onError": "continue"},
        {"ref": "gather", "appId": "aggregator", "args": {"sourceRef": "parse"}},
    ], category="Finance")
    docs = ["{broken" if i % 10 == 7 else json.dumps({"invoice": f"INV-{i:03d}"}) for i in range(50)]
    r = alice.post(f"/api/flows/{flow['id']}/run", json={"args": {"docs": docs}, "start": False})
    play_id = r.json()["playId"]
    log_in(page, server)
    page.goto(f"{server.url}/plays/{play_id}/")
    page.wait_for_selector("#live-status[data-state='on']")
    assert cards(page) == ["each", "gather"]  # parse is summarised inside the loop
    page.evaluate("window.__same = true")
    assert alice.post(f"/api/plays/{play_id}/start").status_code == 200
    # The summary fills in live: 45 DONE and 5 FAIL, without a reload.
    summary = page.locator("#loop-each .loop__summary tr[data-ref='parse']")
    summary.locator(".badge[data-state='DONE'] + .count", has_text=re.compile(r"^45$")).wait_for(timeout=120_000)
    assert summary.locator(".badge[data-state='FAIL'] + .count").inner_text() == "5"
    page.wait_for_selector("#play-state .badge[data-state='DONE']", timeout=120_000)
    assert page.evaluate("window.__same") is True
    rows = page.locator("#loop-each .loop__items tbody tr").evaluate_all("els => els.map(e => +e.dataset.item)")
    assert rows == list(range(25))  # the first page, in item order
    assert "Items 1–25 of 50" in page.locator("#loop-each").inner_text()
    height = page.evaluate("document.documentElement.scrollHeight")
    assert height < 6000, height  # was 13,220 px for 153 flat rows
    shot(page, "play-loop", docs=True)
    # The failed items only: one click on the FAIL count.
    summary.locator("a:has(.badge[data-state='FAIL'])").click()
    page.wait_for_url(re.compile(r"lstate=FAIL"))
    rows = page.locator("#loop-each .loop__items tbody tr").evaluate_all("els => els.map(e => +e.dataset.item)")
    assert rows == [7, 17, 27, 37, 47]
    assert "not valid JSON" in page.locator("#loop-each .loop__items").inner_text() or \
        page.locator("#loop-each .cell-error").count() == 5
    assert page.get_by_label("State").input_value() == "FAIL"
    assert_no_axe_violations(page)
    # The next page of all items.
    page.goto(f"{server.url}/plays/{play_id}/?loop=each&lpage=1")
    rows = page.locator("#loop-each .loop__items tbody tr").evaluate_all("els => els.map(e => +e.dataset.item)")
    assert rows == list(range(25, 50))


def test_a_2_mb_binary_output_is_downloaded(server: Server, alice: httpx.Client, page: Any,
                                            tmp_path: Path) -> None:
    pdf = b"%PDF-1.4\n%" + bytes(range(256)) * 8192 + b"\n%%EOF\n"  # 2 MB
    files = FileServer({"/scan.pdf": (200, "application/pdf", pdf)})
    try:
        flow = make_flow(alice, "Scan archive", [
            {"ref": "download", "appId": "curl", "args": {"url": files.url + "/scan.pdf", "responseType": "binary"}},
        ], category="Archive")
        play_id = alice.post(f"/api/flows/{flow['id']}/run", json={}).json()["playId"]
        assert wait_for(alice, play_id, timeout=120)["state"] == "DONE"
    finally:
        files.close()
    log_in(page, server)
    started = time.monotonic()
    response = page.goto(f"{server.url}/plays/{play_id}/")
    assert len(response.body()) < 100_000  # the 2.7 MB of base64 stay off the page
    out = page.locator("#step-download .step__out")
    out.locator("summary").click()
    binary = out.locator(".binary")
    assert re.search(r"Binary field body: 2\.0 MB, application/pdf", binary.inner_text())
    with page.expect_download() as info:
        binary.get_by_role("link", name="Download the file").click()
    saved = tmp_path / "scan.pdf"
    info.value.save_as(saved)
    assert saved.read_bytes() == pdf
    assert info.value.suggested_filename.endswith(".pdf")
    # The whole value as JSON, and as a tree.
    with page.expect_download() as info:
        out.get_by_role("link", name="Download JSON").click()
    info.value.save_as(tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text())["statusCode"] == 200
    out.get_by_role("button", name="Show as tree").click()
    tree = out.locator(".js-tree-root")
    tree.wait_for()
    assert re.search(r"binary, 2\.0 MB, application/pdf", tree.inner_text())
    assert time.monotonic() - started < 60
    assert_no_axe_violations(page)
    shot(page, "play-output", docs=True)


def test_the_dashboard_renders_and_updates(server: Server, alice: httpx.Client, page: Any) -> None:
    flow = make_flow(alice, "Dashboard feed", [
        {"ref": "parse", "appId": "json-parse", "args": {"input": "{{ $prev.args.doc }}"}},
    ], category="Ops")
    for doc in ['{"a": 1}', '{"b": 2}', "{nope"]:
        play_id = alice.post(f"/api/flows/{flow['id']}/run", json={"args": {"doc": doc}}).json()["playId"]
        wait_for(alice, play_id)
    log_in(page, server)
    page.goto(f"{server.url}/dashboard/")
    page.wait_for_selector("#chart-ended canvas")
    page.wait_for_selector("#chart-duration canvas")
    page.wait_for_selector("#chart-queue canvas")
    assert page.locator(f"#dash-flows tr[data-flow-id='{flow['id']}']").count() == 1

    def failed() -> int:
        return int(page.locator("[data-key='failedOf']").inner_text().split()[0])

    before = failed()
    assert before >= 1
    updated = page.get_attribute("body", "data-dashboard-updated")
    page.evaluate("window.__same = true")
    for _ in range(2):
        play_id = alice.post(f"/api/flows/{flow['id']}/run", json={"args": {"doc": "{bad"}}).json()["playId"]
        wait_for(alice, play_id)
    wait_until(lambda: failed() >= before + 2, 90, "the dashboard to count the new failures")
    assert page.get_attribute("body", "data-dashboard-updated") != updated
    assert page.evaluate("window.__same") is True
    row = page.locator(f"#dash-flows tr[data-flow-id='{flow['id']}']")
    assert int(row.locator("td").nth(1).inner_text()) >= 3  # failed
    assert_no_axe_violations(page)
    shot(page, "dashboard", docs=True)
    page.set_viewport_size({"width": 390, "height": 844})
    shot(page, "dashboard-phone")
    page.set_viewport_size({"width": 1280, "height": 860})
    # One flow's dashboard, one click away.
    row.get_by_role("link", name=re.compile("Dashboard feed")).click()
    page.wait_for_url(re.compile(r"/flows/[^/]+/dashboard/$"))
    page.wait_for_selector("#chart-ended canvas")
    assert "Dashboard feed" in page.locator("h1").inner_text()
    assert_no_axe_violations(page)


def test_the_run_form_starts_a_play(server: Server, alice: httpx.Client, page: Any) -> None:
    flow = make_flow(alice, "Greeting", [
        {"ref": "greet", "appId": "var", "args": {"values": {"message": "Hello {{ $prev.args.name }}"}}},
    ], category="Demo")
    log_in(page, server)
    page.goto(f"{server.url}/flows/{flow['permanentId']}/")
    assert page.locator(".flow-steps .step").evaluate_all("els => els.map(e => e.dataset.ref)") == ["greet"]
    assert "your time zone" in page.locator("label[for='run-at']").inner_text()
    assert_no_axe_violations(page)
    shot(page, "flow", docs=True)
    # Not JSON: said at once, nothing sent.
    page.get_by_label(re.compile("^Args")).fill("{name: Ada}")
    page.get_by_role("button", name=re.compile("^Run ")).click()
    page.locator(".js-json-error", has_text="not valid JSON").wait_for()
    assert "/flows/" in page.url and "/run/" not in page.url
    page.get_by_label(re.compile("^Args")).fill('{"name": "Ada"}')
    page.get_by_label(re.compile("Idempotency key")).fill("greet-ada-1")
    page.get_by_role("button", name=re.compile("^Run ")).click()
    page.wait_for_url(re.compile(r"/plays/\w+/$"))
    play_id = page.url.rstrip("/").rsplit("/", 1)[1]
    page.wait_for_selector("#play-state .badge[data-state='DONE']")
    page.locator("#step-greet .step__out summary").click()
    assert "Hello Ada" in page.locator("#step-greet .js-preview").inner_text()
    play = alice.get(f"/api/plays/{play_id}").json()
    assert play["args"] == {"name": "Ada"} and play["idempotencyKey"] == "greet-ada-1"
    assert_no_axe_violations(page)
    shot(page, "play-run")
