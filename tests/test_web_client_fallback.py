"""The web client when WebSocket does not get through (docs/protocol.md section 7): in Chromium
with ``WebSocket`` removed by an init script (then SSE), with ``WebSocket`` and ``EventSource``
removed (then long polling), and behind a small proxy that refuses ``Upgrade`` (the client tries
WebSocket, falls back by itself). Each: sign up, chat both ways with a WebSocket user, go offline
while the other sends, come back (exactly the missed messages, once, in order), reload (the session,
the history and the transport remembered for the tab); the status bar says which transport."""

from __future__ import annotations

import threading

import pytest
import trio

from tests.browser import PASSWORD, TIMEOUT_MS, ChatdProcess, bodies, enter, expect, launch, open_channel, require_browser, send, seqs
from tests.helpers import free_port
from tests.transports import CuttingProxy

NO_WS = "delete window.WebSocket;"
NO_WS_NO_SSE = "delete window.WebSocket; delete window.EventSource;"


class ProxyThread:
    """tests/transports.CuttingProxy (refusing WebSocket upgrades, or passing them and eating the
    frames) in a thread of its own: the browser tests are sync code (Playwright's sync API)."""

    def __init__(self, upstream_port: int, port: int, eat: bool = False):
        self.proxy = CuttingProxy(("127.0.0.1", upstream_port), refuse_upgrade=not eat, eat_websocket=eat)
        self.port = port
        self._token = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: trio.run(self._main), daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    async def _main(self):
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        async with trio.open_nursery() as n:
            n.start_soon(trio.serve_listeners, self.proxy._handle, listeners)
            self._ready.set()
            await self._stop.wait()
            n.cancel_scope.cancel()

    def stop(self):
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(10)


def _chat_offline_reload(browser, url, init_script, transport_text, tag, shots_dir=None):
    ctx_a = browser.new_context(viewport={"width": 1000, "height": 700})
    ctx_b = browser.new_context(viewport={"width": 1000, "height": 700})
    for ctx in (ctx_a, ctx_b):
        ctx.set_default_timeout(TIMEOUT_MS)
    if init_script:
        ctx_b.add_init_script(init_script)
    a, b = ctx_a.new_page(), ctx_b.new_page()
    errors = []
    for p in (a, b):
        p.on("pageerror", lambda e: errors.append(str(e)))
        p.on("console", lambda m: "Content Security Policy" in m.text and errors.append(m.text))
    enter(a, url, f"alice{tag}", signup=True)
    enter(b, url, f"bob{tag}", signup=True)
    expect(b.locator("#conn-transport")).to_have_text(transport_text)
    expect(a.locator("#conn-transport")).to_have_text("via WebSocket")
    # chat both ways
    a.fill("#dm-username", f"bob{tag}")
    a.click("#dm-form button")
    send(a, "hi bob")
    row = b.locator("#channel-list button", has_text=f"alice{tag}")
    expect(row.locator(".ch-last")).to_have_text("hi bob")
    open_channel(b, f"alice{tag}")
    send(b, "hi alice")
    mine = b.locator("#message-list .msg", has_text="hi alice")
    expect(mine).to_have_attribute("data-status", "sent")
    expect(a.locator("#message-list .msg", has_text="hi alice")).to_have_count(1)
    expect(a.locator("#message-list .receipt")).to_have_text("Seen")  # bob's read went over POST
    expect(b.locator("#message-list .receipt")).to_have_text("Seen")  # alice's read came in the stream
    a.wait_for_timeout(3100)  # the page sends typing at most every 3 s (main.js TYPING_EVERY_MS): it just did
    a.locator("#composer-input").type("typing to bob")
    expect(b.locator("#typing")).to_have_text(f"alice{tag} is typing…")  # a typing event, in the stream
    a.fill("#composer-input", "")
    # offline while alice sends; back: exactly those, once, in order
    before = bodies(b)
    ctx_b.set_offline(True)
    expect(b.locator("#conn-status")).to_contain_text("Offline")
    five = [f"missed {i}" for i in range(1, 6)]
    for text in five:
        send(a, text)
    expect(a.locator("#message-list .msg[data-status=sent]", has_text="missed 5")).to_have_count(1)
    ctx_b.set_offline(False)
    expect(b.locator("#conn-status")).to_have_text("Connected")
    expect(b.locator("#message-list .msg", has_text="missed 5")).to_have_count(1)
    after = bodies(b)
    assert after[:len(before)] == before and after[len(before):] == five
    got = seqs(b)
    assert got == list(range(1, len(got) + 1))
    # a reload: the session, the history and the transport (remembered for the tab)
    b.reload()
    expect(b.locator("#conn-status")).to_have_text("Connected")
    expect(b.locator("#conn-transport")).to_have_text(transport_text)
    open_channel(b, f"alice{tag}")
    expect(b.locator("#message-list .msg")).to_have_count(len(after))
    assert bodies(b) == after and seqs(b) == got
    send(a, "after reload")
    expect(b.locator("#message-list .msg", has_text="after reload")).to_have_count(1)
    assert not errors, errors
    ctx_a.close()
    ctx_b.close()


@pytest.mark.parametrize("script,transport", [(NO_WS, "via SSE"), (NO_WS_NO_SSE, "via long polling")],
                         ids=["no-websocket", "no-websocket-no-eventsource"])
def test_web_client_without_websocket(tmp_path, script, transport):
    from playwright.sync_api import sync_playwright
    require_browser()
    srv = ChatdProcess(tmp_path, free_port(), free_port())
    try:
        with sync_playwright() as pw:
            browser = launch(pw)
            try:
                _chat_offline_reload(browser, srv.url, script, transport, "n")
            finally:
                browser.close()
    finally:
        srv.stop()


@pytest.mark.parametrize("eat", [False, True], ids=["refuses-upgrade", "eats-websocket-frames"])
def test_web_client_behind_a_proxy_that_breaks_websocket(tmp_path, eat):
    """A proxy that answers the upgrade 403, or one that lets it through and then passes no frame
    (the socket opens and carries nothing: the client gives up on it after 10 s, twice)."""
    from playwright.sync_api import sync_playwright
    require_browser()
    ws_port, proxy_port = free_port(), free_port()
    proxy = ProxyThread(ws_port, proxy_port, eat=eat)
    srv = ChatdProcess(tmp_path, free_port(), ws_port, server_toml=f'public_ws_url = "ws://127.0.0.1:{proxy_port}/"\n')
    try:
        with sync_playwright() as pw:
            browser = launch(pw)
            try:
                # every user is behind the proxy here; bob is the one checked
                _chat_offline_reload_all_proxied(browser, srv.url, eat)
            finally:
                browser.close()
        if not eat:
            assert proxy.proxy.refused >= 2  # the client did try WebSocket first
    finally:
        srv.stop()
        proxy.stop()


def _chat_offline_reload_all_proxied(browser, url, eat):
    ctx_a = browser.new_context()
    ctx_b = browser.new_context()
    for ctx in (ctx_a, ctx_b):
        ctx.set_default_timeout(TIMEOUT_MS)
    a, b = ctx_a.new_page(), ctx_b.new_page()
    for page, name in ((a, "alicep"), (b, "bobp")):  # both sign up, then both wait (at the same time)
        page.goto(url + "/")
        page.fill("#login-username", name)
        page.fill("#login-password", PASSWORD)
        page.click("#signup-button")
        expect(page.locator("#chat-view")).to_be_visible()
    for page in (a, b):
        # silent sockets: two tries of 10 s each before the fallback (the page's documented policy)
        expect(page.locator("#conn-status")).to_have_text("Connected", timeout=(60_000 if eat else TIMEOUT_MS))
    for p in (a, b):
        expect(p.locator("#conn-transport")).to_have_text("via SSE")
    a.fill("#dm-username", "bobp")
    a.click("#dm-form button")
    send(a, "hi bob")
    row = b.locator("#channel-list button", has_text="alicep")
    expect(row.locator(".ch-last")).to_have_text("hi bob")
    open_channel(b, "alicep")
    send(b, "hi alice")
    expect(a.locator("#message-list .msg", has_text="hi alice")).to_have_count(1)
    before = bodies(b)
    ctx_b.set_offline(True)
    expect(b.locator("#conn-status")).to_contain_text("Offline")
    for i in range(1, 4):
        send(a, f"missed {i}")
    expect(a.locator("#message-list .msg[data-status=sent]", has_text="missed 3")).to_have_count(1)
    ctx_b.set_offline(False)
    expect(b.locator("#conn-status")).to_have_text("Connected")
    expect(b.locator("#message-list .msg", has_text="missed 3")).to_have_count(1)
    after = bodies(b)
    assert after[len(before):] == [f"missed {i}" for i in range(1, 4)]
    b.reload()
    expect(b.locator("#conn-status")).to_have_text("Connected")
    expect(b.locator("#conn-transport")).to_have_text("via SSE")
    open_channel(b, "alicep")
    expect(b.locator("#message-list .msg")).to_have_count(len(after))
    ctx_a.close()
    ctx_b.close()
