"""Failover without silence (issue 11), with real ZooKeeper and shard processes: whatever fails
behind a send — its owner killed with -9, frozen (SIGSTOP: a zombie owner), ZooKeeper killed and
started again — the send is answered (``ack``, or ``unavailable`` with ``retry_after_ms``) within
``limits.send_answer_s``; a send stuck on one channel does not hold the same connection's sends
to another channel; and resending as docs/protocol.md says loses, duplicates and reorders
nothing. The bounds asserted are liveness bounds with room for a loaded CI machine."""

from __future__ import annotations

import signal

import pytest
import trio
import trio.testing

from chatd.discovery.view import View
from tests.cluster import Cluster, Device, ZooKeeper, settle, zookeeper_available
from tests.faults import (ANSWER_BOUND_S, NEVER_S, SendLog, check_store, keep_sending, kill_zookeeper,
                          start_zookeeper_again, stored_messages,
                          traffic_flows)
from tests.helpers import dm, eventually, open_client

pytestmark = pytest.mark.skipif(not zookeeper_available(),
                                reason="ZooKeeper not installed (apt-get install zookeeper); .ci/run installs it")

SESSION_S = 2.0  # the test clusters' zk_session_timeout_s
# kill -9 -> first ack by the new owner: the bound is the session timeout + 1 s; +2 s more
# for a loaded CI machine (measured here: see the test's output and docs/operations.md)
TAKEOVER_BOUND_S = SESSION_S + 3.0


async def sender_and_channels(cluster):
    """A sender ``a`` and two partners: ``stuck`` = dm(a, b) is owned by a shard other than a's
    home (the victim), ``free`` = dm(a, c) by a shard that is not the victim."""
    view = View(0, {s: None for s in cluster.shard_ids})
    a = await cluster.api.signup_login("fo-sender")
    stuck = free = None
    for i in range(80):
        p = await cluster.api.signup_login(f"fo-partner{i}")
        ch = dm(a, p)
        owner = view.owner_of(ch)
        if stuck is None and owner != a["shard_id"] and p["shard_id"] != owner:
            stuck, victim = ch, owner
        elif free is None and stuck is not None and owner != victim:
            free = ch
        if stuck and free:
            return a, stuck, free, victim
    pytest.fail("no suitable channels")


@pytest.mark.parametrize("fault", ["kill", "freeze"])
async def test_owner_fault_every_send_answered(fault, zk, tmp_path, nursery):
    cluster = Cluster(zk, tmp_path, n=3, session_timeout_s=SESSION_S, heartbeat_s=0.3)
    try:
        await cluster.start()
        a, stuck, free, victim = await sender_and_channels(cluster)
        dev = Device(cluster, a, "sender")
        dev.follow(stuck, free)
        await dev.connect(nursery)
        log = SendLog()
        for ch in (stuck, free):
            await log.send_until_acked(dev.client, ch, "before", f"before-{ch}")
        zombie_log = SendLog()
        if fault == "freeze":  # another device of the sender, connected to the owner that will freeze
            z = await open_client(nursery, cluster.ws_url(victim),
                                  (await cluster.api.login(a["user"]["username"]))["token"])
        home = a["shard_id"]
        link_down = f"link down: {home} <-> {victim}"
        downs = cluster.log_text(home).count(link_down)
        stop = trio.Event()
        zombie_answered = trio.Event()

        async def to_the_zombie():  # read by the zombie only when it thaws, its session expired
            await zombie_log.send(z, stuck, "to the zombie", "zombie-1")
            zombie_answered.set()
        async with trio.open_nursery() as n:
            n.start_soon(keep_sending, log, dev.client, free, "free", stop)
            await traffic_flows(log, [free])
            t0 = trio.current_time()
            cluster.kill(victim, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
            if fault == "freeze":
                n.start_soon(to_the_zombie)
            # once the sender's home has the victim's link down (a reset at once; a frozen peer's
            # after 3 heartbeats) and before its session expires: one send to the stuck channel (it
            # waits for a link), then one to the free channel, same connection
            await eventually(lambda: cluster.log_text(home).count(link_down) > downs, timeout=SESSION_S)
            answers = {}

            async def one(ch, cmid):
                answers[ch] = await log.send(dev.client, ch, "probe", cmid)
                answers[ch + "@"] = trio.current_time()
            async with trio.open_nursery() as probes:
                probes.start_soon(one, stuck, "probe-stuck")
                await trio.testing.wait_all_tasks_blocked()  # the stuck probe is out, waiting for its answer
                probes.start_soon(one, free, "probe-free")
            assert answers[free]["type"] == "ack", answers
            assert answers[free + "@"] < answers[stuck + "@"], "the free channel's send waited for the stuck one"
            assert answers[stuck] is not None and answers[stuck]["type"] in ("ack", "error")
            if answers[stuck]["type"] == "error":
                assert answers[stuck]["code"] == "unavailable" and answers[stuck]["retry_after_ms"] > 0
            # then, as a client does, resend until the new owner (or the thawed one) acks
            n.start_soon(keep_sending, log, dev.client, stuck, "stuck", stop)
            takeover_s = await eventually(lambda: log.first_ack_after(t0, stuck), timeout=30) - t0
            if fault == "freeze":
                # the new owner acked: the zombie's session has expired; it comes back
                cluster.kill(victim, signal.SIGCONT)
                t_thaw = trio.current_time()
                with trio.fail_after(ANSWER_BOUND_S):
                    await zombie_answered.wait()
                assert zombie_log.records[0].reply is not None, "the thawed zombie never answered"
                # answered in time: 'unavailable' if it noticed first that its session is gone, or
                # an ack if the store took the write it read before noticing - the store, not the
                # process, fences a zombie (seq and dedup are checked by check_store below, where
                # the resend of zombie-1 must name the same seq)
                reply = zombie_log.records[0].reply
                assert reply["type"] == "ack" or reply.get("code") == "unavailable", reply
                print(f"the thawed zombie answered {zombie_log.records[0].answered_at - t_thaw:.2f} s after SIGCONT")
                await log.send_until_acked(z, stuck, "to the zombie", "zombie-1")
            await traffic_flows(log, [stuck, free])  # both channels serve on after the fault
            stop.set()
        print(f"{fault}: first ack by the new owner {takeover_s:.2f} s after the fault; "
              f"{len(log.unavailable())} of {len(log.records)} sends answered unavailable; "
              f"slowest answer {max(r.waited_s for r in log.records):.2f} s")
        assert log.late() == [], [(r.client_msg_id, r.waited_s, r.reply) for r in log.late()]
        assert log.unavailable(), "no send was answered unavailable: the fault was not seen"
        assert takeover_s <= TAKEOVER_BOUND_S, takeover_s
        heads = {ch: await check_store(cluster, ch, a["token"], log) for ch in (stuck, free)}
        if fault == "freeze" and zombie_log.records[0].reply["type"] == "ack":  # the resend names its seq
            resent = [r.reply for r in log.records if r.client_msg_id == "zombie-1" and r.reply
                      and r.reply["type"] == "ack"]
            assert resent and all(x["seq"] == zombie_log.records[0].reply["seq"] for x in resent), resent
        await settle([dev], heads)
        assert dev.anomalies == []
        for ch in (stuck, free):
            assert dev.received[ch] == list(range(1, heads[ch] + 1))
    finally:
        cluster.stop()


async def test_zookeeper_kill_and_restart_writes_resume(tmp_path, nursery):
    zk = ZooKeeper(tmp_path / "own-zk")  # killed and restarted: this test's own server
    cluster = Cluster(zk, tmp_path, n=2, session_timeout_s=SESSION_S, heartbeat_s=0.3)
    try:
        await cluster.start()
        # one channel owned by each shard: every shard must come back (kazoo clients back off
        # independently)
        view = View(0, {s: None for s in cluster.shard_ids})
        a = await cluster.api.signup_login("zkr-a")
        channels: dict[str, str] = {}
        for i in range(40):
            ch = dm(a, await cluster.api.signup_login(f"zkr-{i}"))
            channels.setdefault(view.owner_of(ch), ch)
            if len(channels) == len(cluster.shard_ids):
                break
        dev = Device(cluster, a, "a")
        dev.follow(*channels.values())
        await dev.connect(nursery)
        log = SendLog()
        for ch in channels.values():
            await log.send_until_acked(dev.client, ch, "before", f"before-{ch}")
        stop = trio.Event()
        async with trio.open_nursery() as n:
            for sid, ch in channels.items():
                n.start_soon(keep_sending, log, dev.client, ch, f"zk-{sid}", stop, 0.1)
            await traffic_flows(log, channels.values())
            kill_zookeeper(zk)
            t_kill = trio.current_time()
            await trio.sleep(7.0)  # ZooKeeper down this long is the point: an uncapped backoff would reach seconds
            t_back = await start_zookeeper_again(zk)
            await eventually(lambda: all(log.first_ack_after(t_back, ch) for ch in channels.values()), timeout=30)
            await traffic_flows(log, channels.values())
            stop.set()
        refused = [r for r in log.unavailable() if r.sent_at > t_kill]
        resume_s = max(log.first_ack_after(t_back, ch) for ch in channels.values()) - t_back
        print(f"zookeeper down {t_back - t_kill:.1f} s: writes resumed on every shard {resume_s:.2f} s after it "
              f"was back; {len(refused)} sends answered unavailable; "
              f"slowest answer {max(r.waited_s for r in log.records):.2f} s")
        assert refused, "writes were not refused while ZooKeeper was down"
        assert log.late() == [], [(r.client_msg_id, r.waited_s, r.reply) for r in log.late()]
        assert resume_s <= 3.0, resume_s  # the promise is 2 s; 1 s more for a loaded CI machine
        heads = {ch: await check_store(cluster, ch, a["token"], log) for ch in channels.values()}
        await settle([dev], heads)
        assert dev.anomalies == []
        for ch, head in heads.items():
            assert dev.received[ch] == list(range(1, head + 1))
    finally:
        cluster.stop()
        zk.stop()


async def test_lifecycle_verbs_answered_while_the_owner_is_frozen(zk, tmp_path, nursery):
    """Edits, reactions and deletes share the sends' deadline: with the channel's owner frozen
    (SIGSTOP) each is answered — ``ack`` or ``unavailable`` with ``retry_after_ms`` — within the
    bound, and resent with the same ``client_msg_id`` after the new owner took over, each is
    stored once."""
    cluster = Cluster(zk, tmp_path, n=3, session_timeout_s=SESSION_S, heartbeat_s=0.3)
    try:
        await cluster.start()
        a, stuck, _free, victim = await sender_and_channels(cluster)
        client = await open_client(nursery, a["ws_url"], a["token"])
        log = SendLog()
        target = (await log.send_until_acked(client, stuck, "to edit", "target"))["seq"]
        home = a["shard_id"]
        link_down = f"link down: {home} <-> {victim}"
        downs = cluster.log_text(home).count(link_down)
        cluster.kill(victim, signal.SIGSTOP)
        try:
            await eventually(lambda: cluster.log_text(home).count(link_down) > downs, timeout=SESSION_S + 3)
            verbs = {"e-1": {"type": "edit", "body": "edited"},
                     "r-1": {"type": "react", "emoji": "👍"},
                     "d-1": {"type": "delete"}}
            answers: dict[str, tuple[dict | None, float]] = {}

            async def one(cmid, frame):
                t = trio.current_time()
                reply = await client.request({**frame, "channel_id": stuck, "client_msg_id": cmid,
                                              "target_seq": target}, timeout=NEVER_S)
                answers[cmid] = (reply, trio.current_time() - t)
            async with trio.open_nursery() as n:
                for cmid in ("e-1", "r-1"):
                    n.start_soon(one, cmid, verbs[cmid])
            print({k: (r["type"], r.get("code"), round(w, 2)) for k, (r, w) in answers.items()})
            for cmid, (reply, waited) in answers.items():
                assert waited <= ANSWER_BOUND_S, (cmid, waited, reply)
                assert reply["type"] == "ack" or (reply["code"] == "unavailable" and reply["retry_after_ms"] > 0), reply
            # as a client does: resend after retry_after_ms until the new owner acks
            seqs = {}
            for cmid in ("e-1", "r-1", "d-1"):
                with trio.fail_after(30):
                    while True:
                        t = trio.current_time()
                        reply = await client.request({**verbs[cmid], "channel_id": stuck, "client_msg_id": cmid,
                                                      "target_seq": target}, timeout=NEVER_S)
                        assert trio.current_time() - t <= ANSWER_BOUND_S, (cmid, reply)
                        if reply["type"] == "ack":
                            seqs[cmid] = reply["seq"]
                            break
                        assert reply["code"] == "unavailable" and reply["retry_after_ms"] > 0, reply
                        await trio.sleep(reply["retry_after_ms"] / 1000)
        finally:
            cluster.kill(victim, signal.SIGCONT)
        stored = await stored_messages(cluster, stuck, a["token"])
        rows = [(m["seq"], m.get("kind"), m["client_msg_id"]) for m in stored]
        assert [s for s, _, _ in rows] == list(range(1, len(rows) + 1)), rows  # gap-free
        for cmid, kind in (("e-1", "edit"), ("r-1", "react"), ("d-1", "delete")):
            mine = [r for r in rows if r[2] == cmid]
            assert mine == [(seqs[cmid], kind, cmid)], (cmid, rows)  # stored once, at the acked seq
    finally:
        cluster.stop()
