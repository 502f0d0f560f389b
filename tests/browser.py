"""Helpers for the browser tests: Debian's chromium driven by Playwright's sync API, and a chatd
started as a real process (sync code: these tests are plain functions, not trio ones, because
Playwright's sync API runs its own event loop)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import PASSWORD

CHROMIUM = "/usr/bin/chromium"
TIMEOUT_MS = 30_000  # for every wait on the page: generous, for a loaded CI machine
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]  # containers often have a tiny /dev/shm


def require_browser():
    """Skip (saying why) where the browser or Playwright is missing; CI installs both."""
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")


def http(method: str, url: str, body=None, token: str | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout_s: float = 60, shards: int = 1):
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc is None or proc.poll() is None, "chatd exited during start-up"
        try:
            status, body = http("GET", url + "/healthz")
            if status == 200 and len(body["shards"]) >= shards:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{url} not healthy after {timeout_s} s"
        time.sleep(0.1)


class ChatdProcess:
    """``chatd run`` in a subprocess with a temporary data directory and free ports."""

    def __init__(self, tmp_path: Path, api_port: int, ws_port: int, extra_toml: str = "", server_toml: str = ""):
        self.url = f"http://127.0.0.1:{api_port}"
        config = tmp_path / "chatd.toml"
        config.write_text(f'data_dir = "{tmp_path / "data"}"\n'
                          f"[server]\napi_port = {api_port}\nws_port = {ws_port}\n{server_toml}"
                          f"[auth]\nscrypt_n = 1024\nsignups_unthrottled = [\"127.0.0.0/8\"]\n{extra_toml}")
        self.log = open(tmp_path / "chatd.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "chatd.cli", "run", "--config", str(config)],
                                     stdout=self.log, stderr=self.log)
        wait_healthy(self.url, self.proc)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# a microphone and camera that are a test tone and pattern, granted without asking; audio may play
MEDIA_ARGS = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
              "--autoplay-policy=no-user-gesture-required"]


def launch(playwright, extra_args=()):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, *extra_args])


class Shots:
    """Numbered screenshots of every step under the test's tmp dir."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(exist_ok=True)
        self.n = 0

    def __call__(self, page, name: str) -> Path:
        self.n += 1
        path = self.dir / f"{self.n:02d}-{name}.png"
        page.screenshot(path=str(path))
        return path


# ---- the web client's page, as a person uses it --------------------------------------------------

def expect(*a, **kw):
    from playwright.sync_api import expect as pw_expect
    pw_expect.set_options(timeout=TIMEOUT_MS)
    return pw_expect(*a, **kw)


def enter(page, url: str, username: str, signup: bool = False):
    """Open the client, sign up (or log in) and wait until it is connected."""
    page.goto(url + "/")
    page.fill("#login-username", username)
    page.fill("#login-password", PASSWORD)
    page.click("#signup-button" if signup else "#login-button")
    expect(page.locator("#conn-status")).to_have_text("Connected")


def bodies(page) -> list[str]:
    """The texts of the open channel's messages, top to bottom."""
    return page.locator("#message-list .msg .body").all_inner_texts()


def seqs(page) -> list[int]:
    """The seqs of the open channel's stored messages, top to bottom."""
    return [int(s) for s in page.locator("#message-list .msg[data-seq]").evaluate_all(
        "els => els.map(e => e.dataset.seq)")]


def send(page, text: str):
    page.fill("#composer-input", text)
    page.press("#composer-input", "Enter")


def open_channel(page, name: str):
    page.locator("#channel-list button", has=page.locator(".ch-name", has_text=name)).click()
    expect(page.locator("#channel-title")).to_have_text(name)
