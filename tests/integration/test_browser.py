"""The play history pages in a real browser (Debian's Chromium driven by Playwright).

The server is the one `make run` starts (tests/integration/conftest.py). The scenario logs
in through the login page, watches a play's layers arrive over the WebSocket on a page
opened before the play ran, filters the history to FAIL, and holds and resumes a play with
the buttons. Screenshots land in tests/artifacts/screenshots/; with
FLOWPLAY_DOCS_SCREENSHOTS=1 the flows, history and detail ones also replace the README's
copies in docs/screenshots/.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..polling import wait_until
from .conftest import ROOT, Server, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = os.environ.get("FLOWPLAY_CHROMIUM", "/usr/bin/chromium")
SHOTS = ROOT / "tests/artifacts/screenshots"
DOCS_SHOTS = ROOT / "docs/screenshots"
# Generous: the machine is shared, and nothing here should depend on its speed.
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install chromium"
    with sync_playwright() as p:
        # Playwright's own browser downloads are not available here: drive Debian's build.
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    context = chromium.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shot(page: Any, name: str, docs: bool = False) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    # The README's copies change only on request, so that a test run leaves the tree clean.
    if docs and (os.environ.get("FLOWPLAY_DOCS_SCREENSHOTS") or not (DOCS_SHOTS / f"{name}.png").exists()):
        DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_SHOTS / f"{name}.png")


def make_flow(client: httpx.Client, name: str, layers: list[dict[str, Any]], category: str = "Browser") -> dict[str, Any]:
    r = client.post("/api/flows", json={"name": f"{name} {time.monotonic_ns() % 100000}", "category": category,
                                        "layers": layers})
    assert r.status_code == 201, r.text
    return r.json()


def log_in(page: Any, server: Server) -> None:
    email, password = server.users["alice"]
    page.goto(f"{server.url}/flows/")
    assert "/login/" in page.url  # anonymous: sent to the login page
    shot(page, "login")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(re.compile(r"/flows/$"))
    page.get_by_role("heading", name="Flows").wait_for()


def badge(page: Any, selector: str) -> str:
    return page.locator(f"{selector} .badge").first.get_attribute("data-state") or ""


def test_watch_filter_hold_and_resume_in_the_browser(server: Server, alice: httpx.Client, page: Any) -> None:
    slow = make_flow(alice, "Nightly export", [
        {"ref": "prepare", "appId": "var", "args": {"values": {"day": "{{ $prev.args.day }}", "rows": 1200}}},
        {"ref": "pause", "appId": "sleep", "args": {"ms": 2500}},
        {"ref": "publish", "appId": "var", "args": {"values": {"message": "Exported {{ $prev.prepare.rows }} rows"}}},
    ], category="Reports")
    failing = make_flow(alice, "Invoice import", [
        {"ref": "parse", "appId": "json-parse", "args": {"input": "{{ $prev.args.doc }}"}},
    ], category="Finance")
    sleepy = make_flow(alice, "Reminder", [
        {"ref": "wait", "appId": "sleep", "args": {"ms": 600_000}},
        {"ref": "remind", "appId": "var", "args": {"values": {"sent": True}}},
    ], category="Ops")

    log_in(page, server)

    # 1. A play created without starting; its page opened first, then the play started:
    #    every step's progress has to arrive over the WebSocket.
    r = alice.post(f"/api/flows/{slow['id']}/run", json={"args": {"day": "2024-01-15"}, "start": False})
    assert r.status_code == 201, r.text
    play_id = r.json()["playId"]
    page.goto(f"{server.url}/plays/{play_id}/")
    page.wait_for_selector("#live-status[data-state='on']")
    assert badge(page, "#play-state") == "NEW"
    # Every step of the flow is listed before any ran, as not reached.
    assert page.locator("#steps .step .badge[data-state='UNREACHED']").count() == 3
    page.evaluate("window.__sameDocument = true")

    assert alice.post(f"/api/plays/{play_id}/start").status_code == 200
    page.wait_for_selector("#step-prepare .step__state .badge[data-state='DONE']")
    page.wait_for_selector("#step-pause .step__state .badge:not([data-state='UNREACHED'])")
    shot(page, "detail-running")
    page.wait_for_selector("#play-state .badge[data-state='DONE']")
    page.wait_for_selector("#step-publish .step__state .badge[data-state='DONE']")
    assert page.evaluate("window.__sameDocument") is True  # updated in place, never reloaded
    refs = page.locator("#steps .step .step__ref code").all_inner_texts()
    assert refs == ["prepare", "pause", "publish"]
    assert page.locator("#step-publish .step__app").inner_text().strip() == "var"
    out = page.locator("#step-publish details.step__out")
    out.locator("summary").click()
    assert "Exported 1200 rows" in out.locator("pre.js-preview").inner_text()
    assert page.locator("#play-duration").inner_text().strip() not in ("", "—")
    assert wait_for(alice, play_id)["state"] == "DONE"
    # A reload renders the same from the server.
    page.reload()
    assert page.locator("#steps .step").count() == 3
    page.locator("#step-prepare details.step__out summary").click()
    shot(page, "detail")
    page.set_viewport_size({"width": 390, "height": 844})
    shot(page, "detail-phone")
    page.set_viewport_size({"width": 1280, "height": 860})

    # 2. History filtered to FAIL with the filter form.
    docs = ['{"invoice": "INV-101"}', "{not json", '{"invoice": "INV-102"}', "INV-103: <xml/>", "{'single': 1}"]
    ids = [alice.post(f"/api/flows/{failing['id']}/run", json={"args": {"doc": doc}}).json()["playId"] for doc in docs]
    finals = [wait_for(alice, i)["state"] for i in ids]
    assert finals == ["DONE", "FAIL", "DONE", "FAIL", "FAIL"]
    failed_id, done_id = ids[1], ids[0]
    page.goto(f"{server.url}/plays/")
    page.locator(f"tr[data-play-id='{done_id}']").wait_for()
    page.locator("label.chip", has=page.locator("input[value='FAIL']")).click()
    page.get_by_role("button", name="Apply filters").click()
    page.wait_for_url(re.compile(r"/plays/\?state=FAIL&page=0&size=25$"))
    page.locator(f"tr[data-play-id='{failed_id}']").wait_for()
    assert page.locator(f"tr[data-play-id='{done_id}']").count() == 0
    states = page.locator("#plays tbody .js-state .badge").evaluate_all("els => els.map(e => e.dataset.state)")
    assert len(states) >= 3 and set(states) == {"FAIL"}
    assert page.locator("input[name='state'][value='FAIL']").is_checked()
    shot(page, "history", docs=True)
    page.set_viewport_size({"width": 390, "height": 844})
    shot(page, "history-phone")
    page.set_viewport_size({"width": 1280, "height": 860})

    # 3. Hold and resume a sleeping play with the buttons.
    sleeping_id = alice.post(f"/api/flows/{sleepy['id']}/run", json={}).json()["playId"]
    wait_until(lambda: alice.get(f"/api/plays/{sleeping_id}").json()["state"] == "DEFERRED", what="the sleep step to park the play")
    page.goto(f"{server.url}/plays/{sleeping_id}/")
    assert badge(page, "#play-state") == "DEFERRED"
    assert page.get_by_role("button", name="Resume").count() == 0
    page.get_by_role("button", name="Hold").click()
    page.get_by_text("Hold: play is now ON_HOLD.").wait_for()
    assert badge(page, "#play-state") == "ON_HOLD"
    assert alice.get(f"/api/plays/{sleeping_id}").json()["state"] == "ON_HOLD"
    assert page.get_by_role("button", name="Hold").count() == 0
    page.get_by_role("button", name="Resume").click()
    page.get_by_text(re.compile(r"Resume: play is now (DEFERRED|RUN)\.")).wait_for()
    assert alice.get(f"/api/plays/{sleeping_id}").json()["state"] in ("DEFERRED", "RUN")
    assert page.get_by_role("button", name="Hold").count() == 1
    assert alice.post(f"/api/plays/{sleeping_id}/cancel").status_code == 200

    # 4. The flows page, with last plays and the day's counts.
    page.goto(f"{server.url}/flows/")
    row = page.locator(f"tr[data-flow-id='{failing['id']}']")
    row.wait_for()
    assert row.locator(".counts .badge[data-state='FAIL']").count() == 1
    assert row.locator(".counts .badge[data-state='DONE']").count() == 1
    shot(page, "flows", docs=True)


def test_the_history_page_updates_states_live(server: Server, alice: httpx.Client, page: Any) -> None:
    flow = make_flow(alice, "Live history", [{"ref": "nap", "appId": "sleep", "args": {"ms": 600_000}}])
    play_id = alice.post(f"/api/flows/{flow['id']}/run", json={}).json()["playId"]
    wait_until(lambda: alice.get(f"/api/plays/{play_id}").json()["state"] == "DEFERRED", what="the play to park")
    log_in(page, server)
    page.goto(f"{server.url}/flows/{flow['permanentId']}/plays/")
    page.wait_for_selector("#live-status[data-state='on']")
    row = page.locator(f"tr[data-play-id='{play_id}']")
    assert row.locator(".badge").get_attribute("data-state") == "DEFERRED"
    assert alice.post(f"/api/plays/{play_id}/cancel").status_code == 200
    row.locator(".badge[data-state='FAIL']").wait_for()
    # The list shows the duration of an ended play (the Started/Completed columns became Created + Duration).
    wait_until(lambda: row.locator(".js-duration").inner_text().strip() not in ("", "—"), what="the play's duration")
    # A play started after the page was rendered is announced, not silently missed.
    other = alice.post(f"/api/flows/{flow['id']}/run", json={}).json()["playId"]
    page.locator("#live-notice").get_by_text("1 new play since this page was loaded.").wait_for()
    assert alice.post(f"/api/plays/{other}/cancel").status_code == 200


def test_api_docs_render_offline_from_local_static_files(server: Server, alice: httpx.Client, page: Any) -> None:
    """Swagger UI (/api/docs) and ReDoc (/api/redoc) with every request off this server refused."""
    outside: list[str] = []

    def only_this_server(route: Any) -> None:
        if route.request.url.startswith(server.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.context.route("**/*", only_this_server)
    page.context.add_cookies([{"name": "sessionid", "value": alice.cookies["sessionid"], "url": server.url}])

    page.goto(f"{server.url}/api/docs")
    page.locator(".swagger-ui .info .title").filter(has_text="flowplay API").wait_for()
    page.locator(".opblock-summary-path", has_text="/api/flows/{flow_id}/run").first.wait_for()
    assert page.locator(".opblock").count() >= 30
    shot(page, "api-docs")

    page.goto(f"{server.url}/api/redoc")
    page.get_by_role("heading", name=re.compile("flowplay API")).first.wait_for()
    page.get_by_text("/api/flows/{flow_id}/run").first.wait_for(state="attached")
    shot(page, "api-redoc")
    assert outside == [], f"the docs tried to load from elsewhere: {outside}"
