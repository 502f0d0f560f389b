"""``chatd run`` as a real OS process: config file, SIGTERM drain and clean exit, kill -9 with every
acked message kept, restart on the same data directory."""

from __future__ import annotations

import os
import signal

import trio

from tests.helpers import ChatdRun, dm, open_client


async def test_sigterm_drains_and_exits_cleanly(tmp_path, nursery):
    p = ChatdRun(tmp_path)
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
    p = ChatdRun(tmp_path)
    await p.start()
    acked: list[tuple[int, str]] = []
    try:
        alice = await p.api.signup_login("alice")
        bob = await p.api.signup_login("bob")
        ch = dm(alice, bob)
        c = await open_client(nursery, alice["ws_url"], alice["token"])
        sent = 0

        def acks() -> int:
            return sum(1 for f in c.inbox if f["type"] == "ack")

        async def writer():
            nonlocal sent
            try:
                for i in range(100_000):  # bounded; the kill below ends it long before
                    while sent - acks() >= 32:  # pipelined, but a window: a reader that lags is not flooded
                        await c.wait_frame()
                    rid = f"k{i}"
                    await c.send({"type": "send", "id": rid, "channel_id": ch, "client_msg_id": rid, "body": f"msg {i}"})
                    sent += 1
            except Exception:
                pass

        async with trio.open_nursery() as n:
            n.start_soon(writer)
            with trio.fail_after(60):
                while acks() < 300:
                    await c.wait_frame()
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
