"""The web client's member panel at the default cap, 1,000 members (issue 24), in a real browser
(Debian's chromium via Playwright) against a real ``chatd run``.

In an 800 px window the panel must scroll on its own: the channel header, the message list and
the composer stay in the window, and so does the cap's error sentence when the owner adds a
1,001st member (the old panel grew the page to ~1,389 px at 100 members: the composer and the
error ended up below the window, and the person saw nothing happen). A search finds any member.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.browser import PASSWORD, TIMEOUT_MS, ChatdProcess, Shots, enter, expect, http, launch, open_channel, \
    require_browser, send
from tests.helpers import free_port

MEMBERS = 1000  # limits.max_group_members' default, the owner included
WINDOW = {"width": 1000, "height": 800}


@pytest.fixture
def chatd_proc(tmp_path):
    require_browser()
    srv = ChatdProcess(tmp_path, free_port(), free_port())
    yield srv
    srv.stop()


def in_window(page, selector: str) -> bool:
    """The element is drawn entirely inside the window (not below it, not scrolled away)."""
    return page.locator(selector).evaluate(
        "e => { const r = e.getBoundingClientRect();"
        " return r.height > 0 && r.top >= 0 && r.bottom <= window.innerHeight; }")


def test_member_panel_of_1000_scrolls_searches_and_keeps_composer_and_error_in_view(chatd_proc, tmp_path):
    from playwright.sync_api import sync_playwright
    url = chatd_proc.url
    shots = Shots(tmp_path / "shots")

    def sign_up(i: int) -> int:
        status, body = http("POST", url + "/v1/users", {"username": f"m{i:04d}", "password": PASSWORD})
        assert status == 201, body
        return body["user"]["id"]
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(sign_up, range(1, MEMBERS)))  # 999 members besides the owner
    status, body = http("POST", url + "/v1/users", {"username": "owner", "password": PASSWORD})
    assert status == 201, body
    assert http("POST", url + "/v1/users", {"username": "extra", "password": PASSWORD})[0] == 201
    status, login = http("POST", url + "/v1/login", {"username": "owner", "password": PASSWORD})
    assert status == 200, login
    status, body = http("POST", url + "/v1/groups", {"name": "thousand", "members": ids}, token=login["token"])
    assert status == 201, body
    assert len(body["channel"]["members"]) == MEMBERS

    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            page = browser.new_context(viewport=WINDOW).new_page()
            page.set_default_timeout(TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            enter(page, url, "owner")
            open_channel(page, "thousand")
            page.click("#members-button")
            expect(page.locator("#member-count")).to_have_text("200 shown of 1,000 matching (1,000 members)")
            expect(page.locator("#member-list li")).to_have_count(200)
            expect(page.locator("#member-list")).to_contain_text("m0001")  # names came with the list
            shots(page, "members-open")
            # the page does not grow: header, messages and composer are in the window
            assert page.evaluate("document.documentElement.scrollHeight") <= WINDOW["height"]
            for selector in (".channel-header", "#messages", "#composer-input", "#member-search"):
                assert in_window(page, selector), selector
            assert page.locator("#messages").evaluate("e => e.clientHeight") >= 100  # not shrunk to nothing
            # the list scrolls on its own
            assert page.locator("#member-list").evaluate("e => e.scrollHeight > e.clientHeight")
            page.locator("#member-list li").last.scroll_into_view_if_needed()
            assert in_window(page, ".channel-header") and in_window(page, "#composer-input")

            # the search finds a member who is not drawn at first
            page.fill("#member-search", "m0999")
            expect(page.locator("#member-list li")).to_have_count(1)
            expect(page.locator("#member-list li")).to_contain_text("m0999")
            expect(page.locator("#member-count")).to_have_text("1 shown of 1 matching (1,000 members)")
            page.fill("#member-search", "")
            expect(page.locator("#member-list li")).to_have_count(200)

            # the 1,001st member: the cap's sentence is shown, in the window
            page.fill("#add-member", "extra")
            page.click("#add-member-form button")
            expect(page.locator("#members-error")).to_contain_text("The group is full")
            assert in_window(page, "#members-error") and in_window(page, "#composer-input")
            shots(page, "cap-error")

            # the composer works with the panel open
            send(page, "hello thousand")
            mine = page.locator("#message-list .msg", has_text="hello thousand")
            expect(mine).to_have_attribute("data-status", "sent")
            assert in_window(page, "#composer-input")
            assert not errors, errors
        finally:
            browser.close()
