"""``chatd run`` as a real OS process: config file, SIGTERM drain and clean exit, kill -9 with every
acked message kept, restart on the same data directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import trio

from tests.cluster import free_port
from tests.helpers import API, open_client


class Proc:
    def __init__(self, tmp_path):
        self.api_port, self.ws_port = free_port(), free_port()
        self.config = tmp_path / "chatd.toml"
        self.config.write_text(
            f'data_dir = "{tmp_path / "data"}"\n'
            f"[server]\napi_port = {self.api_port}\nws_port = {self.ws_port}\n"
            "[auth]\nscrypt_n = 1024\n"
            # the kill -9 test sends as fast as it can
            "[limits]\nrate_frames_per_s = 100000.0\nrate_burst = 100000\n")
        self.log = open(tmp_path / "chatd.log", "ab")
        self.proc: subprocess.Popen | None = None
        self.api = API(f"http://127.0.0.1:{self.api_port}")

    async def start(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "chatd.cli", "run", "--config", str(self.config)],
                                     stdout=self.log, stderr=self.log)
        with trio.fail_after(30):
            while True:
                assert self.proc.poll() is None, "chatd exited during start-up"
                try:
                    if (await self.api.call("GET", "/healthz")).status == 200:
                        return
                except OSError:
                    pass
                await trio.sleep(0.1)

    async def wait_exit(self, timeout=20) -> int:
        with trio.fail_after(timeout):
            while self.proc.poll() is None:
                await trio.sleep(0.05)
        return self.proc.returncode


async def test_sigterm_drains_and_exits_cleanly(tmp_path, nursery):
    p = Proc(tmp_path)
    await p.start()
    try:
        alice = await p.api.signup_login("alice")
        c = await open_client(nursery, alice["ws_url"], alice["token"])
        p.proc.send_signal(signal.SIGTERM)
        reason = await c.wait_closed()
        assert reason.code == 1001  # going away: reconnect elsewhere
        assert await p.wait_exit() == 0
    finally:
        if p.proc.poll() is None:
            p.proc.kill()


async def test_kill_9_loses_no_acked_message(tmp_path, nursery):
    p = Proc(tmp_path)
    await p.start()
    acked: list[tuple[int, str]] = []
    try:
        alice = await p.api.signup_login("alice")
        bob = await p.api.signup_login("bob")
        ch = f"dm:{alice['user']['id']}:{bob['user']['id']}"
        c = await open_client(nursery, alice["ws_url"], alice["token"])
        sent = 0

        def acks() -> int:
            return sum(1 for f in c.inbox if f["type"] == "ack")

        async def writer():
            nonlocal sent
            try:
                for i in range(100_000):  # bounded; the kill below ends it long before
                    while sent - acks() >= 32:  # pipelined, but a window: a reader that lags is not flooded
                        await trio.sleep(0.001)
                    rid = f"k{i}"
                    await c.send({"type": "send", "id": rid, "channel_id": ch, "client_msg_id": rid, "body": f"msg {i}"})
                    sent += 1
            except Exception:
                pass

        async with trio.open_nursery() as n:
            n.start_soon(writer)
            with trio.fail_after(60):
                while acks() < 300:
                    await trio.sleep(0.01)
            os.kill(p.proc.pid, signal.SIGKILL)
            await p.wait_exit()
            n.cancel_scope.cancel()
        acked = [(f["seq"], f["client_msg_id"]) for f in c.inbox if f["type"] == "ack"]
        assert len(acked) >= 300
        await p.start()
        r = await p.api.call("GET", f"/v1/channels/{ch}/messages?limit=500&after=0", token=bob["token"])
        stored = r.body["messages"]
        while r.body["more"]:
            r = await p.api.call("GET", f"/v1/channels/{ch}/messages?limit=500&after={stored[-1]['seq']}",
                                 token=bob["token"])
            stored += r.body["messages"]
        seqs = [m["seq"] for m in stored]
        assert seqs == list(range(1, len(seqs) + 1))  # gap-free
        by_seq = {m["seq"]: m["client_msg_id"] for m in stored}
        for seq, cmid in acked:  # every acked message is there, under the seq we were told
            assert by_seq[seq] == cmid
        # resending everything we sent (acked or not) stores nothing twice and fills nothing wrongly
        c2 = await open_client(nursery, alice["ws_url"], alice["token"])
        for seq, cmid in acked[-5:]:
            again = await c2.send_message(ch, "ignored", cmid)
            assert again["duplicate"] is True and again["seq"] == seq
    finally:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGTERM)
            await p.wait_exit()
