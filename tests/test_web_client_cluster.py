"""The web client against bin/chatd-local-cluster (ZooKeeper + 3 shards + API): two people whose
connections live on different shards exchange DMs in the browser; then one person's shard is
stopped (SIGTERM: close 1001), the client asks the API where to reconnect (GET /v1/connect), lands
on a live shard and shows what was sent meanwhile exactly once, in order."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.browser import (PASSWORD, TIMEOUT_MS, Shots, bodies, enter, expect, http, launch, open_channel,
                           require_browser, send, seqs)
from tests.cluster import zookeeper_available
from tests.helpers import free_port

SCRIPT = Path(__file__).parent.parent / "bin" / "chatd-local-cluster"
pytestmark = pytest.mark.skipif(not zookeeper_available(),
                                reason="ZooKeeper not installed (apt-get install zookeeper); .ci/run installs it")


@pytest.fixture
def cluster(tmp_path):
    require_browser()
    env = dict(os.environ, CLUSTER_DIR=str(tmp_path / "lc"), ZK_PORT=str(free_port()), API_PORT=str(free_port()),
               WS_BASE_PORT=str(free_port()), CHATD=str(Path(sys.executable).parent / "chatd"))

    def run(cmd):
        return subprocess.run([str(SCRIPT), cmd], env=env, capture_output=True, text=True, timeout=120)

    started = run("start")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield f"http://127.0.0.1:{env['API_PORT']}", tmp_path / "lc"
    finally:
        stopped = run("stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def test_web_client_on_local_cluster(cluster, tmp_path):
    from playwright.sync_api import sync_playwright
    url, cluster_dir = cluster
    shots = Shots(tmp_path / "shots")
    shard_of = {}
    while len(set(shard_of.values())) < 2:  # two people served by different shards
        name = f"web{len(shard_of)}"
        http("POST", url + "/v1/users", {"username": name, "password": PASSWORD})
        status, body = http("POST", url + "/v1/login", {"username": name, "password": PASSWORD})
        assert status == 200, body
        shard_of[name] = body["shard_id"]
    a_name = next(iter(shard_of))
    b_name = next(n for n, s in shard_of.items() if s != shard_of[a_name])
    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            ctx_a, ctx_b = browser.new_context(), browser.new_context()
            a, b = ctx_a.new_page(), ctx_b.new_page()
            for p in (a, b):
                p.set_default_timeout(TIMEOUT_MS)
            enter(a, url, a_name)
            enter(b, url, b_name)
            a.fill("#dm-username", b_name)
            a.click("#dm-form button")
            send(a, f"{shard_of[a_name]} to {shard_of[b_name]}")
            open_channel(b, a_name)
            expect(b.locator("#message-list .msg .body")).to_have_text([f"{shard_of[a_name]} to {shard_of[b_name]}"])
            send(b, "and back")
            expect(a.locator("#message-list .msg .body").last).to_have_text("and back")
            expect(a.locator("#message-list .receipt")).to_have_text("Seen")
            shots(a, "cluster-dm")

            # stop b's shard: b reconnects to a live one, found through GET /v1/connect
            first_url = b.evaluate("chatd.session.ws_url")
            pid = int((cluster_dir / "run" / f"{shard_of[b_name]}.pid").read_text())
            os.kill(pid, signal.SIGTERM)
            expect(b.locator("#conn-status")).not_to_have_text("Connected")
            expect(b.locator("#conn-status")).to_have_text("Connected")
            assert b.evaluate("chatd.session.ws_url") != first_url
            three = [f"after failover {i}" for i in range(1, 4)]
            for text in three:
                send(a, text)
            # a send the moved channel's new owner could not take yet is "failed — retry": retry it
            for _ in range(20):
                failed = a.locator("#message-list .msg[data-status=failed] button.retry")
                if failed.count() == 0:
                    break
                failed.first.click()
                a.wait_for_timeout(500)
            expect(a.locator("#message-list .msg[data-status=sent]", has_text="after failover 3")).to_have_count(1)
            expect(b.locator("#message-list .msg", has_text="after failover 3")).to_have_count(1)
            assert bodies(b)[-3:] == three and len(bodies(b)) == 5
            assert seqs(b) == [1, 2, 3, 4, 5]
            shots(b, "cluster-after-failover")
        finally:
            browser.close()
