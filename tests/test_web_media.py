"""Media in the web client, in a real browser (Debian's chromium, Playwright): alice sends a photo
(the attach button), bob sees its thumbnail (the placeholder first, then the thumbnail fetched with
his token) and opens the full image; alice records a voice message (MediaRecorder on Chromium's
fake microphone) and bob plays it; files dropped on the conversation or pasted into the composer
are sent too; a file above ``media.max_bytes`` is refused with a sentence
before a byte is sent; a plain file shows as a card with its name and size; a voice message shows
the server's waveform and a video its poster frame; an upload slowed down (DevTools' upload throttling) and cancelled sends
nothing and leaves nothing stored on the server. Screenshots of every
step are under the test's tmp dir (``shots/``)."""

from __future__ import annotations

import io
import os
import time

import pytest
from PIL import Image

from tests.browser import (MEDIA_ARGS, TIMEOUT_MS, ChatdProcess, Shots, bodies, enter, expect, launch,
                           open_channel, require_browser, send)
from tests.helpers import free_port
from tests.test_media_av import video

MAX_BYTES = 2 * 1024 * 1024


@pytest.fixture
def chatd_proc(tmp_path):
    require_browser()
    srv = ChatdProcess(tmp_path, free_port(), free_port(), f"[media]\nmax_bytes = {MAX_BYTES}\n")
    yield srv
    srv.stop()


def photo(path, size=(1600, 1200)):
    im = Image.new("RGB", size, "orange")
    im.paste(Image.new("RGB", (size[0] // 2, size[1] // 2), "navy"), (0, 0))
    buf = io.BytesIO()
    im.save(buf, "JPEG")
    path.write_bytes(buf.getvalue())
    return path


def test_photo_voice_file_and_too_large(chatd_proc, tmp_path):
    from playwright.sync_api import sync_playwright
    shots = Shots(tmp_path / "shots")
    url = chatd_proc.url
    with sync_playwright() as pw:
        browser = launch(pw, MEDIA_ARGS)
        try:
            ctx_a = browser.new_context(viewport={"width": 1000, "height": 800})
            ctx_b = browser.new_context(viewport={"width": 1000, "height": 800})
            for ctx in (ctx_a, ctx_b):
                ctx.set_default_timeout(TIMEOUT_MS)
            a, b = ctx_a.new_page(), ctx_b.new_page()
            errors = []
            for p in (a, b):
                p.on("pageerror", lambda e: errors.append(str(e)))
                p.on("console", lambda m: "Content Security Policy" in m.text and errors.append(m.text))
            enter(a, url, "alice", signup=True)
            enter(b, url, "bob", signup=True)
            a.fill("#dm-username", "bob")
            a.click("#dm-form button")
            expect(a.locator("#channel-title")).to_have_text("bob")
            send(a, "a photo for you")
            open_channel(b, "alice")

            # --- a photo through the attach button: bob sees the thumbnail, opens the full image
            a.set_input_files("#file-input", str(photo(tmp_path / "holiday.jpg")))
            img = b.locator("#message-list .att-image img")
            expect(img).to_have_attribute("data-loaded", "thumbnail")
            assert img.evaluate("i => i.src").startswith("blob:")
            assert img.evaluate("i => i.naturalWidth") == 320  # the 320-px thumbnail, not the photo
            expect(a.locator("#message-list .att-image img")).to_have_count(1)
            expect(b.locator("#channel-list .ch-last")).to_have_text("alice: Photo".split(": ")[1])
            shots(b, "bob-sees-thumbnail")
            b.locator("#message-list .att-image").click()
            full = b.locator("#lightbox img")
            expect(full).to_be_visible()
            b.wait_for_function("() => document.querySelector('#lightbox img').naturalWidth === 1600")
            shots(b, "bob-opens-full-image")
            b.click("#lightbox .lightbox-close")
            expect(b.locator("#lightbox")).to_have_count(0)

            # --- a voice message: recorded on the fake microphone, played on the other side
            a.click("#record-button")
            expect(a.locator("#record-button")).to_have_attribute("aria-pressed", "true")
            a.wait_for_timeout(1500)  # (what is recorded is real time: 1.5 s of the fake tone)
            a.click("#record-button")
            audio = b.locator("#message-list audio")
            expect(audio).to_have_count(1)
            b.wait_for_function("() => { const a = document.querySelector('#message-list audio');"
                                " return a && a.src.startsWith('blob:'); }")
            b.evaluate("() => document.querySelector('#message-list audio').play()")
            b.wait_for_function("() => document.querySelector('#message-list audio').currentTime > 0.2")
            # the server's waveform of what was recorded: 64 bars, some of them played already
            bars = b.locator("#message-list .att-wave rect")
            expect(bars).to_have_count(64)
            expect(b.locator("#message-list .att-wave rect.played").first).to_be_attached()
            assert max(int(h) for h in bars.evaluate_all("rs => rs.map(r => r.getAttribute('height'))")) > 1
            shots(b, "bob-plays-voice")

            # --- a video: bob's player shows the server's poster frame (fetched with his token)
            video(tmp_path / "clip.webm", "webm", "libvpx")
            a.set_input_files("#file-input", str(tmp_path / "clip.webm"))
            b.wait_for_function("() => { const v = document.querySelector('#message-list video');"
                                " return v && v.poster.startsWith('blob:') && v.src.startsWith('blob:'); }")
            shots(b, "bob-sees-video-poster")

            # --- a plain file: a card with its name and size
            (tmp_path / "notes.txt").write_text("plain text notes\n" * 100)
            a.set_input_files("#file-input", str(tmp_path / "notes.txt"))
            card = b.locator("#message-list .att-file")
            expect(card.locator(".att-name")).to_have_text("notes.txt")
            expect(card.locator(".att-size")).to_have_text("1.7 KB")

            # --- drag-and-drop onto the conversation, and paste into the composer: the same upload
            a.evaluate("""() => { const dt = new DataTransfer();
                dt.items.add(new File(["dropped bytes"], "dropped.txt", { type: "text/plain" }));
                document.getElementById("channel-pane").dispatchEvent(
                  new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true })); }""")
            expect(b.locator("#message-list .att-file .att-name", has_text="dropped.txt")).to_have_count(1)
            a.evaluate("""() => { const dt = new DataTransfer();
                dt.items.add(new File(["pasted bytes"], "pasted.txt", { type: "text/plain" }));
                document.getElementById("composer-input").dispatchEvent(
                  new ClipboardEvent("paste", { clipboardData: dt, bubbles: true, cancelable: true })); }""")
            expect(b.locator("#message-list .att-file .att-name", has_text="pasted.txt")).to_have_count(1)
            expect(a.locator("#composer-input")).to_have_value("")  # the file was not pasted as text

            # --- too large: refused with a sentence, nothing uploaded
            big = tmp_path / "big.bin"
            big.write_bytes(b"\0" * (MAX_BYTES + 1))
            a.set_input_files("#file-input", str(big))
            expect(a.locator("#toasts .toast").last).to_contain_text("That file is too large to send")
            shots(a, "alice-too-large")
            expect(b.locator("#message-list .msg")).to_have_count(7)  # text, photo, voice, video, 3 files
            assert errors == [], errors
        finally:
            browser.close()


def stored_objects(data_dir) -> list[str]:
    root = data_dir / "media"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_cancelling_an_upload_sends_nothing_and_stores_nothing(chatd_proc, tmp_path):
    from playwright.sync_api import sync_playwright
    shots = Shots(tmp_path / "shots")
    data_dir = tmp_path / "data"
    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            ctx_a, ctx_b = browser.new_context(), browser.new_context()
            for ctx in (ctx_a, ctx_b):
                ctx.set_default_timeout(TIMEOUT_MS)
            a, b = ctx_a.new_page(), ctx_b.new_page()
            errors = []
            a.on("pageerror", lambda e: errors.append(str(e)))
            enter(a, chatd_proc.url, "alice", signup=True)
            enter(b, chatd_proc.url, "bob", signup=True)
            a.fill("#dm-username", "bob")
            a.click("#dm-form button")
            expect(a.locator("#channel-title")).to_have_text("bob")
            send(a, "before")
            open_channel(b, "alice")
            expect(b.locator("#message-list .msg")).to_have_count(1)
            before = stored_objects(data_dir)
            # 1.9 MB at 64 KB/s: half a minute on the wire, unless cancelled
            cdp = ctx_a.new_cdp_session(a)
            cdp.send("Network.enable")
            cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0,
                                                         "downloadThroughput": -1, "uploadThroughput": 64 * 1024})
            big = tmp_path / "slow.bin"
            big.write_bytes(os.urandom(MAX_BYTES - 100_000))
            a.set_input_files("#file-input", str(big))
            row = a.locator("#uploads .upload", has_text="slow.bin")
            expect(row).to_be_visible()
            # the body is on its way: the server has begun to receive it
            deadline = time.monotonic() + 20
            while not any(p.startswith("tmp/") for p in stored_objects(data_dir)):
                assert time.monotonic() < deadline, "the upload never reached the server"
                time.sleep(0.1)
            shots(a, "alice-uploading")
            row.locator(".upload-cancel").click()
            expect(a.locator("#uploads")).to_be_hidden()  # the UI is back to normal
            cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0,
                                                         "downloadThroughput": -1, "uploadThroughput": -1})
            # the server dropped the partial upload: nothing new under media/ (no object, no tmp file)
            deadline = time.monotonic() + 20
            while stored_objects(data_dir) != before:
                assert time.monotonic() < deadline, stored_objects(data_dir)
                time.sleep(0.1)
            send(a, "after")  # the composer still works; no attachment was sent in between
            expect(b.locator("#message-list .msg")).to_have_count(2)
            assert b.locator("#message-list .att").count() == 0 and a.locator("#message-list .att").count() == 0
            assert bodies(b) == ["before", "after"]
            assert a.locator("#toasts .toast").count() == 0  # a cancel is not an error
            shots(a, "alice-after-cancel")
            assert errors == [], errors
        finally:
            browser.close()
