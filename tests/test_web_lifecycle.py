"""The web client and the message lifecycle, in Chromium (Playwright): rows made by the other person
(edit, reaction, delete; a membership row) show folded into the message, live and after an offline
spell, once and without a duplicate row; and two bugs a new user met after a server restart: the
"Cannot reach the chatd server: cannot reach the chatd server" notice (doubled, and staying after
the status said Connected) and the raw close reason in the offline status."""

from __future__ import annotations

import pytest

from tests.browser import (TIMEOUT_MS, ChatdProcess, Shots, bodies, enter, expect, launch, open_channel,
                           require_browser, send, seqs)
from tests.helpers import free_port


class _Rig:
    """A ``chatd run`` (``srv``) and a launched Chromium (``browser``)."""

    def __init__(self, tmp_path):
        self.tmp_path, self.ports = tmp_path, (free_port(), free_port())
        self.srv = ChatdProcess(tmp_path, *self.ports)
        self.browser = None

    def restart(self) -> None:
        """After ``srv.stop()``: another ``chatd run`` on the same ports and data directory."""
        self.srv = ChatdProcess(self.tmp_path, *self.ports)


@pytest.fixture
def web(tmp_path):
    """The chatd process and the browser of one test, both stopped at the end."""
    require_browser()
    from playwright.sync_api import sync_playwright
    rig = _Rig(tmp_path)
    try:
        with sync_playwright() as pw:
            rig.browser = launch(pw)
            try:
                yield rig
            finally:
                rig.browser.close()
    finally:
        rig.srv.stop()


def _alice_and_bob(web):
    """Two pages, each in a context (a browser) of its own: alice and bob signed up, alice has
    opened her DM with bob; the page errors of both are collected in the list returned."""
    a, b = (web.browser.new_context(viewport={"width": 1000, "height": 700}).new_page() for _ in range(2))
    errors = []
    for p in (a, b):
        p.set_default_timeout(TIMEOUT_MS)
        p.on("pageerror", lambda e: errors.append(str(e)))
    enter(a, web.srv.url, "alice", signup=True)
    enter(b, web.srv.url, "bob", signup=True)
    a.fill("#dm-username", "bob")
    a.click("#dm-form button")
    return a, b, errors


def _do(page, frame: dict) -> dict:
    """A request on the page's own connection (the client's API, window.chatd)."""
    return page.evaluate("""async (f) => chatd.conn.request({client_msg_id: crypto.randomUUID(), ...f})""", frame)


def test_web_client_folds_lifecycle_rows_live_and_after_offline(tmp_path, web):
    shots = Shots(tmp_path / "shots")
    a, b, errors = _alice_and_bob(web)
    ctx_b = b.context
    send(a, "helo bob")
    open_channel(b, "alice")
    expect(b.locator("#message-list .msg .body")).to_have_text(["helo bob"])
    # --- live: alice edits, bob reacts; both pages fold the rows into the message
    ch = a.evaluate("chatd.currentId")
    assert _do(a, {"type": "edit", "channel_id": ch, "target_seq": 1, "body": "hello bob"})["type"] == "ack"
    assert _do(b, {"type": "react", "channel_id": ch, "target_seq": 1, "emoji": "👍"})["type"] == "ack"
    for p in (a, b):
        msg = p.locator("#message-list .msg[data-seq='1']")
        expect(msg.locator(".body")).to_have_text("hello bob")
        expect(msg.locator(".edited")).to_have_text("(edited)")
        expect(msg.locator(".reaction")).to_have_text("👍 1")
        expect(p.locator("#message-list .msg")).to_have_count(1)  # no row for the events
    expect(b.locator(".reaction.me")).to_have_count(1)
    expect(a.locator(".reaction.me")).to_have_count(0)
    shots(b, "bob-sees-edit-and-reaction")
    # --- bob offline: alice sends, edits it, deletes the first; back online bob shows the
    # state once, in order
    ctx_b.set_offline(True)
    expect(b.locator("#conn-status")).not_to_have_text("Connected")
    send(a, "second")
    expect(a.locator("#message-list .msg[data-seq='4']")).to_have_count(1)
    # stored, not on bob's device: one tick, kept until the next state (not replaced by a time)
    expect(a.locator("#message-list .msg[data-seq='4'] .receipt")).to_have_text("✓")
    _do(a, {"type": "edit", "channel_id": ch, "target_seq": 4, "body": "second, fixed"})
    _do(a, {"type": "delete", "channel_id": ch, "target_seq": 1})
    ctx_b.set_offline(False)
    expect(b.locator("#conn-status")).to_have_text("Connected")
    expect(b.locator("#message-list .msg[data-seq='1'] .body")).to_have_text("Message deleted")
    expect(b.locator("#message-list .msg[data-seq='4'] .body")).to_have_text("second, fixed")
    assert bodies(b) == ["Message deleted", "second, fixed"] and seqs(b) == [1, 4]
    assert b.locator("#message-list .reaction").count() == 0
    expect(a.locator("#message-list .msg[data-seq='4'] .receipt")).to_have_text("Seen")  # bob has it open
    shots(b, "bob-back-online")
    # --- a reload reads the folded history: the same
    b.reload()
    expect(b.locator("#conn-status")).to_have_text("Connected")
    open_channel(b, "alice")
    expect(b.locator("#message-list .msg .body")).to_have_text(["Message deleted", "second, fixed"])
    assert not errors, errors


def test_web_client_restart_notices_are_said_once_and_end_when_connected(web):
    page = web.browser.new_context().new_page()
    page.set_default_timeout(TIMEOUT_MS)
    enter(page, web.srv.url, "alice", signup=True)
    # the sentence and the API's detail differ only in case: said once
    said = page.evaluate("""async () => (await import('/web/js/errors.js')).describe(
        {code: 'network', message: 'cannot reach the chatd server'})""")
    assert said == "Cannot reach the chatd server"
    web.srv.stop()
    status = page.locator("#conn-status")
    expect(status).to_contain_text("Offline")
    text = status.inner_text()
    assert "shutting down" not in text, text  # the server's raw close reason is not shown
    assert "the server is restarting" in text or "the connection was lost" in text, text
    page.evaluate("chatd.refreshChannels().catch(() => {})")  # an API call while it is down
    expect(page.locator("#toasts .toast")).not_to_have_count(0)
    assert all(t.count("annot reach the chatd server") <= 1
               for t in page.locator("#toasts .toast span").all_inner_texts())
    web.restart()
    page.evaluate("chatd.conn.wake && chatd.conn.wake()")
    expect(status).to_have_text("Connected")
    # gone at once (a notice otherwise lives 10 s, over half of the message box)
    expect(page.locator("#toasts .toast")).to_have_count(0, timeout=1500)


def test_web_client_edit_delete_react_reply_from_the_page(web):
    """What a person does: ↑ edits the last own message, Delete asks first, a reaction button
    toggles (counts on both sides), Reply shows a quote bar and the reply's quote jumps to the
    original."""
    a, b, errors = _alice_and_bob(web)
    send(a, "helo")
    expect(a.locator("#message-list .msg[data-seq='1']")).to_have_count(1)
    open_channel(b, "alice")
    # ↑ in the empty composer: edit the last own message
    a.focus("#composer-input")
    a.press("#composer-input", "ArrowUp")
    expect(a.locator("#compose-bar-text")).to_have_text("Editing your message")
    expect(a.locator("#composer-input")).to_have_value("helo")
    a.fill("#composer-input", "hello")
    a.press("#composer-input", "Enter")
    for p in (a, b):
        expect(p.locator(".msg[data-seq='1'] .body")).to_have_text("hello")
        expect(p.locator(".msg[data-seq='1'] .edited")).to_have_text("(edited)")
    expect(a.locator("#compose-bar")).to_be_hidden()
    # a reaction from the picker, counted on both pages; clicking it again takes it back
    b.locator(".msg[data-seq='1'] .actions .react[data-emoji='👍']").click()
    for p in (a, b):
        expect(p.locator(".msg[data-seq='1'] .reaction")).to_have_text("👍 1")
    expect(b.locator(".msg[data-seq='1'] .reaction")).to_have_attribute("aria-pressed", "true")
    b.locator(".msg[data-seq='1'] .reaction").click()
    expect(a.locator(".msg[data-seq='1'] .reaction")).to_have_count(0)
    # reply: the quote bar, then a quote that jumps to the original
    b.locator(".msg[data-seq='1'] .actions .reply").click()
    expect(b.locator("#compose-bar-text")).to_have_text("Replying to alice: hello")
    send(b, "yes")
    quote = a.locator(".msg", has_text="yes").locator(".quote")
    expect(quote).to_have_text("alice: hello".replace("alice", "You"))
    quote.click()
    expect(a.locator(".msg[data-seq='1']")).to_have_class("msg mine flash")
    # delete asks first: dismissed, nothing; accepted, the stub on both pages
    a.once("dialog", lambda d: d.dismiss())
    a.locator(".msg[data-seq='1'] .actions .delete").click()
    expect(b.locator(".msg[data-seq='1'] .body")).to_have_text("hello")
    a.once("dialog", lambda d: d.accept())
    a.locator(".msg[data-seq='1'] .actions .delete").click()
    for p in (a, b):
        expect(p.locator(".msg[data-seq='1'] .body")).to_have_text("Message deleted")
    expect(b.locator(".msg", has_text="yes").locator(".quote")).to_have_text("alice: deleted message")
    assert not errors, errors
