"""Triage in a real browser (Debian's Chromium driven by Playwright), issue 19.

Bulk retry of a filtered set with its dry run and result page, the approval inbox, the
live "new plays" notice honouring the filters (and rows leaving a list they no longer
match), ``?page=999``, ``?flowId=<permanentId>`` in the flow dropdown, the keyboard path to
the first row, and the admin play page of a play with a 600 KB output. Every page is
checked with axe-core (0 violations). Screenshots go to tests/artifacts/screenshots/ and,
for the README, docs/screenshots/ (``shot(..., docs=True)``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .conftest import Server, wait_for
from .test_browser import TIMEOUT_MS, chromium, log_in, make_flow, poll, shot

pytestmark = [pytest.mark.integration, pytest.mark.browser]
# A browser away from UTC: the lists show its local time, and its own "yesterday".
ZONE = "Europe/Berlin"


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    context = chromium.new_context(viewport={"width": 1280, "height": 860}, timezone_id=ZONE)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def axe_clean(page: Any) -> None:
    from .axe import assert_no_axe_violations

    assert_no_axe_violations(page)


def run(client: httpx.Client, flow: dict[str, Any], args: dict[str, Any]) -> str:
    r = client.post(f"/api/flows/{flow['id']}/run", json={"args": args})
    assert r.status_code == 201, r.text
    return r.json()["playId"]


def ids_on(page: Any) -> list[str]:
    return page.locator("#plays tbody tr").evaluate_all("rows => rows.map(r => r.dataset.playId)")


def test_bulk_retry_of_a_filtered_set_with_its_result_page(server: Server, alice: httpx.Client, page: Any) -> None:
    flow = make_flow(alice, "Nightly import", [
        {"ref": "parse", "appId": "json-parse", "args": {"input": "{{ $prev.args.doc }}"}},
    ], category="Finance")
    docs = ['{"ok": 1}', "{broken", "<xml/>", "{'single': 1}", '{"ok": 2}', "nope"]
    ids = [run(alice, flow, {"doc": doc}) for doc in docs]
    states = [wait_for(alice, i)["state"] for i in ids]
    assert states == ["DONE", "FAIL", "FAIL", "FAIL", "DONE", "FAIL"]
    failed = [i for i, s in zip(ids, states, strict=True) if s == "FAIL"]
    log_in(page, server)

    # Ticking rows: the dry run names what will not be retried.
    page.goto(f"{server.url}/flows/{flow['permanentId']}/plays/")
    page.locator(f"tr[data-play-id='{ids[0]}'] input[name='play']").check()
    page.locator(f"tr[data-play-id='{ids[1]}'] input[name='play']").check()
    assert page.locator("#bulk-count").inner_text() == "2"
    page.locator("#bulk-action").select_option("retry")
    page.locator("#bulk-selected").click()
    page.locator("#dry-summary").get_by_text("1 will be retried, 1 is not FAIL.").wait_for()
    page.get_by_role("link", name="Cancel").click()

    # Everything failed in the filter, in three clicks: filter, "all matching", confirm.
    page.goto(f"{server.url}/flows/{flow['permanentId']}/plays/?state=FAIL")
    assert sorted(ids_on(page)) == sorted(failed)
    page.get_by_role("link", name="Last 24 h").wait_for()
    page.locator("#plays tbody tr").first.locator("time.js-time").wait_for()
    first_time = page.locator("#plays tbody tr time.js-time").first
    assert re.search(r"(s|min) ago$", first_time.inner_text())
    assert first_time.get_attribute("title").endswith(ZONE)  # the absolute time on hover, in the browser's zone
    yesterday = page.get_by_role("link", name="Yesterday").get_attribute("href")
    assert re.search(r"from=\d{4}-\d\d-\d\dT23:00:00Z", yesterday), yesterday  # Berlin's midnight (CET), in UTC
    page.locator("#tz-toggle").click()
    assert first_time.get_attribute("title").endswith(" UTC")
    assert re.search(r"from=\d{4}-\d\d-\d\d&", page.get_by_role("link", name="Yesterday").get_attribute("href"))
    page.locator("#tz-toggle").click()
    axe_clean(page)
    shot(page, "history-triage", docs=True)
    page.locator("#bulk-all").click()
    page.locator("#dry-summary").get_by_text(f"{len(failed)} will be retried.").wait_for()
    axe_clean(page)
    shot(page, "bulk-dry-run", docs=True)
    page.locator("#bulk-note").fill("after the outage")
    page.locator("#bulk-confirm").click()
    page.wait_for_url(re.compile(r"/plays/bulk/[^/]+/$"))
    page.locator("#job-status[data-state='DONE']").wait_for()
    links = page.locator("#job-items a.js-new-play")
    assert links.count() == len(failed)
    new_ids = links.evaluate_all("els => els.map(e => e.textContent.trim())")
    axe_clean(page)
    shot(page, "bulk-result", docs=True)
    for new in new_ids:
        play = alice.get(f"/api/plays/{new}").json()
        assert play["retryOf"] in failed
    # The list now says where each failed play went; "not yet retried" is empty.
    page.goto(f"{server.url}/flows/{flow['permanentId']}/plays/?state=FAIL")
    poll(lambda: page.locator(".js-retried").count() >= len(failed), "the retried links")
    retried_to = page.locator(".js-retried code").all_inner_texts()
    assert set(new_ids) <= set(retried_to)
    # The same bad documents fail again: "not yet retried" now lists exactly the retries.
    for new in new_ids:
        assert wait_for(alice, new)["state"] == "FAIL"
    page.goto(f"{server.url}/flows/{flow['permanentId']}/plays/?state=FAIL&retried=no")
    assert sorted(ids_on(page)) == sorted(new_ids)
    # The retry itself says what it retries, in the list (trigger=retry).
    page.goto(f"{server.url}/flows/{flow['permanentId']}/plays/?trigger=retry")
    assert page.get_by_text("retry of").count() == len(failed)


def test_the_approval_inbox(server: Server, alice: httpx.Client, page: Any) -> None:
    flow = make_flow(alice, "Payouts", [
        {"ref": "check", "appId": "var", "args": {"values": {"amount": "{{ $prev.args.amount }}"}}},
        {"ref": "pay", "appId": "var", "args": {"values": {"paid": True}}, "needsApproval": True},
    ], category="Finance")
    ids = [run(alice, flow, {"amount": 100 * (i + 1)}) for i in range(3)]
    for i in ids:
        wait_for(alice, i, states=("WAIT",))
    log_in(page, server)
    pill = page.locator("#waiting-count")
    assert int(pill.inner_text()) >= 3  # the header of every page
    page.get_by_role("link", name=re.compile(r"^Approvals")).click()
    page.wait_for_url(re.compile(r"/inbox/$"))
    for i in ids:
        page.locator(f"#inbox tr[data-play-id='{i}']").wait_for()
    axe_clean(page)
    shot(page, "inbox", docs=True)
    before = int(pill.inner_text())

    # One click, with a note.
    row = page.locator(f"#inbox tr[data-play-id='{ids[0]}']")
    row.get_by_label(f"Note for play {ids[0]}").fill("checked the invoice")
    row.get_by_role("button", name=f"Approve play {ids[0]}").click()
    page.get_by_text(re.compile(rf"Play {ids[0]}: step approved")).wait_for()
    assert wait_for(alice, ids[0])["state"] == "DONE"
    assert page.locator(f"#inbox tr[data-play-id='{ids[0]}']").count() == 0
    assert int(page.locator("#waiting-count").inner_text()) <= before - 1

    # In bulk, through the dry run.
    for i in ids[1:]:
        page.locator(f"#inbox tr[data-play-id='{i}'] input[name='play']").check()
    page.locator("#bulk-decline").click()
    page.locator("#dry-summary").get_by_text("2 will be declined.").wait_for()
    page.locator("#bulk-note").fill("duplicates")
    page.locator("#bulk-confirm").click()
    page.locator("#job-status[data-state='DONE']").wait_for()
    for i in ids[1:]:
        assert wait_for(alice, i)["state"] == "SKIP"


def test_the_live_notice_honours_the_filters(server: Server, alice: httpx.Client, page: Any) -> None:
    waiting = make_flow(alice, "Gate", [
        {"ref": "gate", "appId": "var", "args": {"values": {"x": 1}}, "needsApproval": True},
    ], category="Ops")
    other = make_flow(alice, "Chatter", [{"ref": "say", "appId": "var", "args": {"values": {"hi": 1}}}])
    first = run(alice, waiting, {"n": 1})
    wait_for(alice, first, states=("WAIT",))
    log_in(page, server)
    page.goto(f"{server.url}/flows/{waiting['permanentId']}/plays/?state=WAIT")
    page.wait_for_selector("#live-status[data-state='on']")
    assert ids_on(page) == [first]
    # Unrelated plays (another flow, and a DONE one of this flow's) are not announced ...
    for n in range(5):
        run(alice, other, {"n": n})
    # ... a play that reaches WAIT on this flow is.
    second = run(alice, waiting, {"n": 2})
    wait_for(alice, second, states=("WAIT",))
    page.locator("#live-notice").get_by_text("1 new play matching these filters since this page was loaded.").wait_for()
    # A row that turns WAIT -> SKIP leaves the WAIT list.
    layer = next(lay for lay in alice.get(f"/api/plays/{first}/layers").json() if lay["state"] == "WAIT")
    r = alice.post(f"/api/plays/{first}/approve", json={"layerId": layer["id"], "decision": "declined"})
    assert r.status_code == 200, r.text
    page.locator(f"tr[data-play-id='{first}']").wait_for(state="detached")
    assert "1 new play matching" in page.locator("#live-notice").inner_text()  # still one, not six
    page.locator("#live-notice a").click()
    assert ids_on(page) == [second]
    axe_clean(page)


def test_bookmarked_states_page_999_and_the_flow_dropdown(server: Server, alice: httpx.Client, page: Any) -> None:
    flow = make_flow(alice, "Bookmarks", [{"ref": "a", "appId": "var", "args": {"values": {"i": 1}}}])
    ids = [run(alice, flow, {"i": i}) for i in range(12)]
    for i in ids:
        wait_for(alice, i)
    log_in(page, server)
    # ?page=999: the last page there is, and a summary that adds up.
    page.goto(f"{server.url}/flows/{flow['permanentId']}/plays/?page=999&size=5")
    page.wait_for_url(re.compile(r"page=2&size=5$"))
    assert page.locator("#results-summary").inner_text().startswith("Plays 11–12 of 12")
    assert page.locator(".pager [aria-current='page']").inner_text() == "3"
    # ?flowId=<permanentId>: the dropdown shows the flow, and Apply keeps it.
    page.goto(f"{server.url}/plays/?flowId={flow['permanentId']}")
    assert page.locator("#f-flow").evaluate("s => s.value") == flow["id"]
    assert len(ids_on(page)) == 12
    assert page.locator("#filters").get_attribute("open") is None  # a filtered list keeps its card folded
    page.locator("#filters summary").click()
    page.locator("#f-size").select_option("10")
    page.get_by_role("button", name="Apply filters").click()
    page.wait_for_url(re.compile(rf"flowId={flow['id']}"))
    assert page.locator("#results-summary").inner_text().startswith("Plays 1–10 of 12")
    # Search by key prefix and by id.
    page.goto(f"{server.url}/plays/?q={ids[3]}")
    assert ids_on(page) == [ids[3]]
    axe_clean(page)
    # The keyboard: a skip link to the list, then its first row.
    page.goto(f"{server.url}/flows/{flow['permanentId']}/plays/")
    presses = 0
    for _ in range(8):
        page.keyboard.press("Tab")
        presses += 1
        if page.evaluate("document.activeElement.textContent.trim()") == "Skip to the plays":
            page.keyboard.press("Enter")
            presses += 1
            break
    for _ in range(4):
        page.keyboard.press("Tab")
        presses += 1
        if page.evaluate("!!document.activeElement.closest('#plays tbody tr')"):
            break
    assert page.evaluate("!!document.activeElement.closest('#plays tbody tr')"), "focus never reached the first row"
    assert presses <= 6, presses


def test_the_admin_page_of_a_play_with_a_600_kb_output_stays_small(
        server: Server, alice: httpx.Client, page: Any) -> None:
    flow = make_flow(alice, "Big output", [
        {"ref": "big", "appId": "var", "args": {"values": {"blob": "{{ $prev.args.blob }}"}}},
    ])
    play_id = run(alice, flow, {"blob": "x" * 600_000})
    assert wait_for(alice, play_id)["state"] == "DONE"
    log_in(page, server)
    response = page.goto(f"{server.url}/admin/plays/play/{play_id}/change/")
    body = response.body()
    assert response.status == 200 and len(body) < 200_000, len(body)
    height = page.evaluate("document.documentElement.scrollHeight")
    assert height < 20_000, height
    link = page.get_by_role("link", name=re.compile("the whole value")).first
    assert link.count() == 1
    full = alice.get(link.get_attribute("href"))
    assert full.status_code == 200
    shot(page, "admin-play-bounded")
