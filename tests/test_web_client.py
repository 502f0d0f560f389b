"""The web client (chatd/web, served at GET /) in a real browser: Debian's chromium driven by
Playwright. Three people sign up in three browser contexts, exchange DMs, make a group, see typing
and a read receipt; one goes offline while the other sends 5 messages and, back online, shows exactly
those 5, once, in order (and its own send made while offline arrives once); a reload keeps the session
and its history. Every step is a screenshot under the test's tmp dir (``shots/``)."""

from __future__ import annotations

import json

import pytest

from tests.browser import (PASSWORD, TIMEOUT_MS, ChatdProcess, Shots, bodies, enter, expect, http, launch,
                           open_channel, require_browser, send, seqs)
from tests.helpers import free_port

@pytest.fixture
def chatd_proc(tmp_path):
    require_browser()
    srv = ChatdProcess(tmp_path, free_port(), free_port(), "[limits]\nmax_group_members = 3\n")
    yield srv
    srv.stop()


def test_web_client_two_people_group_offline_reload(chatd_proc, tmp_path):
    from playwright.sync_api import sync_playwright
    shots = Shots(tmp_path / "shots")
    url = chatd_proc.url
    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            ctx_a, ctx_b, ctx_c = (browser.new_context(viewport={"width": 1000, "height": 700}) for _ in range(3))
            for ctx in (ctx_a, ctx_b, ctx_c):
                ctx.set_default_timeout(TIMEOUT_MS)
            a, b, c = ctx_a.new_page(), ctx_b.new_page(), ctx_c.new_page()
            errors, sent_frames = [], []
            for p in (a, b, c):
                p.on("pageerror", lambda e: errors.append(str(e)))
                # nothing the page does may be blocked by its own Content-Security-Policy
                p.on("console", lambda m: "Content Security Policy" in m.text and errors.append(m.text))
            a.on("websocket", lambda ws: ws.on("framesent", lambda f: sent_frames.append(json.loads(f))))
            a.goto(url + "/")
            expect(a.locator("#login-form")).to_be_visible()
            shots(a, "login")
            enter(a, url, "alice", signup=True)
            enter(b, url, "bob", signup=True)
            enter(c, url, "carol", signup=True)
            http("POST", url + "/v1/users", {"username": "dave", "password": PASSWORD})

            # --- a DM by username; sending -> sent; the other side's list shows it unread
            a.fill("#dm-username", "bob")
            a.click("#dm-form button")
            expect(a.locator("#channel-title")).to_have_text("bob")
            send(a, "hi bob")
            mine = a.locator("#message-list .msg", has_text="hi bob")
            expect(mine).to_have_attribute("data-status", "sent")
            expect(mine).to_have_attribute("data-seq", "1")
            row = b.locator("#channel-list button", has_text="alice")
            expect(row.locator(".ch-last")).to_have_text("hi bob")
            expect(row.locator(".badge")).to_have_text("1")
            expect(row.locator(".dot")).to_have_attribute("aria-label", "online")
            shots(b, "bob-sees-unread-dm")

            # --- bob opens it: alice gets a read receipt; bob types: alice sees it
            open_channel(b, "alice")
            expect(a.locator("#message-list .receipt")).to_have_text("Seen")
            b.locator("#composer-input").type("hello al")
            expect(a.locator("#typing")).to_have_text("bob is typing…")
            shots(a, "alice-sees-seen-and-typing")
            b.press("#composer-input", "Shift+Enter")
            b.locator("#composer-input").type("ice")
            b.press("#composer-input", "Enter")
            expect(a.locator("#message-list .msg").last.locator(".body")).to_have_text("hello al\nice")
            expect(b.locator("#channel-list .badge")).to_have_count(0)
            shots(b, "bob-dm")

            # --- a group of three; the member cap's error is shown
            a.click("#group-details summary")
            a.fill("#group-name", "trio")
            a.fill("#group-members", "bob, carol")
            a.click("#group-form button")
            expect(a.locator("#channel-title")).to_have_text("trio")
            send(a, "hello group")
            expect(a.locator("#message-list .msg", has_text="hello group")).to_have_attribute("data-status", "sent")
            for p in (b, c):
                expect(p.locator("#channel-list button", has_text="trio").locator(".ch-last")).to_have_text("hello group")
            open_channel(c, "trio")
            send(c, "carol here")
            expect(a.locator("#message-list .msg").last.locator(".body")).to_have_text("carol here")
            expect(a.locator("#message-list .receipt")).to_contain_text("Seen by 1 (carol)")  # "Seen by N" (issue 21), names beside
            a.click("#members-button")
            expect(a.locator("#member-list li")).to_have_count(3)
            a.fill("#add-member", "dave")
            a.click("#add-member-form button")
            expect(a.locator("#members-error")).to_contain_text("The group is full")
            a.fill("#add-member", "nobody-here")
            a.click("#add-member-form button")
            expect(a.locator("#members-error")).to_contain_text("No such user")
            shots(a, "group-and-cap-error")
            a.click("#member-list li[data-user] button[aria-label='Remove bob']")
            expect(a.locator("#member-list li")).to_have_count(2)
            a.fill("#add-member", "dave")
            a.click("#add-member-form button")
            expect(a.locator("#member-list li")).to_have_count(3)
            expect(a.locator("#member-list")).to_contain_text("dave")
            expect(a.locator("#members-error")).to_be_empty()
            shots(c, "carol-group")

            # --- the longest message goes through; one character more is the server's error, readable,
            # with a retry that keeps the id
            a.fill("#composer-input", "y" * 100_000)
            expect(a.locator("#char-count")).to_have_text("100,000 / 100,000 characters")
            a.press("#composer-input", "Enter")
            longest = a.locator("#message-list .msg", has_text="yyyyyyyyyy")
            expect(longest).to_have_attribute("data-status", "sent")
            assert len(longest.locator(".body").inner_text()) == 100_000
            send(a, "x" * 100_001)
            failed = a.locator("#message-list .msg[data-status=failed]")
            expect(failed.locator(".status")).to_contain_text("Message too long")
            shots(a, "body-too-long")
            failed.locator("button.retry").click()  # the retry sends the same client_msg_id again
            expect(failed.locator(".status")).to_contain_text("Message too long")
            long_sends = [f["client_msg_id"] for f in sent_frames if f.get("body", "").startswith("xxxx")]
            assert len(long_sends) == 2 and long_sends[0] == long_sends[1], long_sends
            failed.locator("button.discard").click()
            expect(failed).to_have_count(0)

            # --- bob offline; alice sends 5; bob sends one while offline; back online: each once, in order
            expect(b.locator("#channel-title")).to_have_text("alice")
            before = bodies(b)
            ctx_b.set_offline(True)
            expect(b.locator("#conn-status")).to_contain_text("Offline")
            open_channel(a, "bob")
            five = [f"missed {i}" for i in range(1, 6)]
            for text in five:
                send(a, text)
            expect(a.locator("#message-list .msg[data-status=sent]", has_text="missed 5")).to_have_count(1)
            send(b, "sent while offline")
            expect(b.locator("#message-list .msg", has_text="sent while offline")).to_have_attribute("data-status", "sending")
            shots(b, "bob-offline")
            ctx_b.set_offline(False)
            expect(b.locator("#conn-status")).to_have_text("Connected")
            expect(b.locator("#message-list .msg[data-seq]", has_text="sent while offline")).to_have_count(1)
            expect(b.locator("#message-list .msg", has_text="missed 5")).to_have_count(1)
            after = bodies(b)
            assert after[:len(before)] == before
            new = after[len(before):]
            # exactly the 5, once, in order; bob's own offline send (resent on reconnect) once, somewhere
            assert [t for t in new if t != "sent while offline"] == five
            assert new.count("sent while offline") == 1 and len(new) == 6
            got = seqs(b)
            assert got == list(range(1, len(got) + 1))  # gap-free, no repeats, in order
            expect(a.locator("#message-list .msg", has_text="sent while offline")).to_have_count(1)
            assert a.locator("#message-list .msg[data-status=sending]").count() == 0
            shots(b, "bob-back-online")

            # --- a reload keeps the session and its history
            b.reload()
            expect(b.locator("#conn-status")).to_have_text("Connected")
            expect(b.locator("#login-view")).to_be_hidden()
            expect(b.locator("#channel-title")).to_have_text("alice")
            expect(b.locator("#message-list .msg")).to_have_count(len(after))
            assert bodies(b) == after and seqs(b) == got
            shots(b, "bob-after-reload")

            # --- phone width: the list, then one conversation with a way back
            a.set_viewport_size({"width": 390, "height": 760})
            expect(a.locator("#back-button")).to_be_visible()
            shots(a, "phone-channel")
            a.click("#back-button")
            expect(a.locator("#channel-list")).to_be_visible()
            shots(a, "phone-list")

            # --- history pagination: 70 messages, carol reloads and pages back to the first
            lo, hi = sorted([a.evaluate("chatd.me.id"), c.evaluate("chatd.me.id")])
            dm_ac = f"dm:{lo}:{hi}"
            a.evaluate('''async (ch) => { for (let i = 1; i <= 70; i++)
                await chatd.conn.request({type: "send", channel_id: ch, client_msg_id: `page-${i}`, body: `page ${i}`}); }''',
                       dm_ac)
            expect(c.locator("#channel-list button", has_text="alice").locator(".ch-last")).to_have_text("page 70")
            c.reload()
            expect(c.locator("#conn-status")).to_have_text("Connected")
            open_channel(c, "alice")
            expect(c.locator("#message-list .msg")).to_have_count(30)  # the last page
            for count in (60, 70):
                c.click("#older-button")
                expect(c.locator("#message-list .msg")).to_have_count(count)
            expect(c.locator("#older-button")).to_be_hidden()
            assert bodies(c) == [f"page {i}" for i in range(1, 71)] and seqs(c) == list(range(1, 71))
            shots(c, "carol-paged-back")

            # --- log out: back to the login form, the session gone from the tab; carol's contacts see
            # her offline at once
            open_channel(a, "carol")
            expect(a.locator("#channel-sub")).to_have_text("online")
            c.click("#logout-button")
            expect(c.locator("#login-view")).to_be_visible()
            expect(a.locator("#channel-sub")).to_have_text("last active just now")
            expect(a.locator("#channel-list button", has_text="carol").locator(".dot")).to_have_attribute(
                "aria-label", "offline")
            c.reload()
            expect(c.locator("#login-view")).to_be_visible()
            assert not errors, errors
        finally:
            browser.close()


def test_web_client_shows_username_beside_a_borrowed_display_name(chatd_proc, tmp_path):
    """A display name is anyone's choice: mallory calling herself "bob" is shown as "bob (@mallory)"."""
    from playwright.sync_api import sync_playwright
    url = chatd_proc.url
    status, body = http("POST", url + "/v1/users", {"username": "mallory", "password": PASSWORD,
                                                     "display_name": "bob"})
    assert status == 201, body
    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            page = browser.new_context(viewport={"width": 1000, "height": 700}).new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url + "/")
            enter(page, url, "alice", signup=True)
            page.fill("#dm-username", "mallory")
            page.click("#dm-form button")
            expect(page.locator("#channel-title")).to_have_text("bob (@mallory)")
        finally:
            browser.close()


def test_web_client_lists_every_channel_across_pages(tmp_path):
    """``GET /v1/channels`` answers pages of 100 (issue 20): the client follows ``next`` until the
    last one, so 105 groups are all in the list with their names (the client that read one answer
    learnt 5 of them only from the WebSocket's heads, and showed them nameless: "group")."""
    from playwright.sync_api import sync_playwright
    require_browser()
    srv = ChatdProcess(tmp_path, free_port(), free_port(), "[limits]\ngroups_created_per_hour = 0\n")
    try:
        url = srv.url
        for name in ("alice", "bob"):
            assert http("POST", url + "/v1/users", {"username": name, "password": PASSWORD})[0] == 201
        status, alice = http("POST", url + "/v1/login", {"username": "alice", "password": PASSWORD})
        status, bob = http("POST", url + "/v1/login", {"username": "bob", "password": PASSWORD})
        for i in range(105):
            status, body = http("POST", url + "/v1/groups", {"name": f"group {i:03}", "members": [alice["user"]["id"]]},
                                token=bob["token"])
            assert status == 201, body
        with sync_playwright() as pw:
            browser = launch(pw)
            try:
                page = browser.new_context(viewport={"width": 1000, "height": 700}).new_page()
                page.set_default_timeout(TIMEOUT_MS)
                page.goto(url + "/")
                enter(page, url, "alice")
                expect(page.locator("#channel-list button")).to_have_count(105)
                for i in range(105):  # each with its name (known only from the list's pages)
                    expect(page.locator("#channel-list button", has_text=f"group {i:03}")).to_have_count(1)
            finally:
                browser.close()
    finally:
        srv.stop()


def test_web_client_says_a_member_who_left_is_invited_back(chatd_proc, tmp_path):
    """Adding someone who left on their own invites them (202 invited): the client says so instead
    of showing nothing (issue 20)."""
    from playwright.sync_api import sync_playwright
    url = chatd_proc.url
    for name in ("alice", "bob"):
        assert http("POST", url + "/v1/users", {"username": name, "password": PASSWORD})[0] == 201
    _, alice = http("POST", url + "/v1/login", {"username": "alice", "password": PASSWORD})
    _, bob = http("POST", url + "/v1/login", {"username": "bob", "password": PASSWORD})
    status, body = http("POST", url + "/v1/groups", {"name": "book club", "members": [bob["user"]["id"]]},
                        token=alice["token"])
    gid = body["channel"]["id"]
    assert http("DELETE", f"{url}/v1/channels/{gid}/members/{bob['user']['id']}", token=bob["token"])[0] == 200
    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            page = browser.new_context(viewport={"width": 1000, "height": 700}).new_page()
            page.set_default_timeout(TIMEOUT_MS)
            enter(page, url, "alice")
            open_channel(page, "book club")
            page.click("#members-button")
            page.fill("#add-member", "bob")
            page.click("#add-member-form button")
            expect(page.locator("#toasts .toast", has_text="invited back")).to_have_count(1)
            expect(page.locator("#members-error")).to_have_text("")
        finally:
            browser.close()
    _, invitations = http("GET", url + "/v1/invitations", token=bob["token"])
    assert [i["channel_id"] for i in invitations["invitations"]] == [gid]
