"""Liveness while the store does not answer writes (issue 24, item 4).

A real chatd (in process, real SQLite) whose store's writer is stuck in a write that does not
return (tests/faults.py: ``sqlite_writes_hang``). One client keeps 60 sends in flight (each resent
with its ``client_msg_id`` after ``retry_after_ms`` when answered ``unavailable``, as
docs/protocol.md says) and heartbeats every 0.25 s. Every send must be answered within the send
deadline (plus room for a loaded machine) and every heartbeat at once, all through the fault; once
the store answers again, everything is acked and the channel is exact.

The old code freed a send's in-flight slot when its store call returned, not when the deadline
answered it: after 64 unanswered-then-resent sends the session stopped reading, and the
heartbeats (and the sends) behind them lay unread until the store came back.
"""

from __future__ import annotations

import trio

from tests.faults import ANSWER_BOUND_S, SendLog, check_store, sqlite_writes_hang
from tests.helpers import dm, open_client

IN_FLIGHT = 60
FAULT_S = 7.0  # > 3 send deadlines: the old code was stuck after one
HEARTBEAT_EVERY_S = 0.25
HEARTBEAT_BOUND_S = 1.5  # a heartbeat is answered by the reader itself: no store, no peer


async def test_sends_and_heartbeats_answered_while_store_writes_hang(server_with, nursery):
    server = await server_with(rate_frames_per_s=100_000.0, rate_burst=100_000)
    alice = await server.api.signup_login("alice")
    bob = await server.api.signup_login("bob")
    ch = dm(alice, bob)
    client = await open_client(nursery, alice["ws_url"], alice["token"])
    log = SendLog()
    await log.send_until_acked(client, ch, "before", "before")  # the channel is loaded and cached

    heartbeats: list[float | None] = []  # how long each heartbeat waited for its answer (None: never)
    stop = trio.Event()

    async def heartbeat() -> None:
        while not stop.is_set():
            t = trio.current_time()
            try:
                reply = await client.request({"type": "heartbeat"}, timeout=FAULT_S + 5)
                assert reply["type"] == "heartbeat", reply
                heartbeats.append(trio.current_time() - t)
            except trio.TooSlowError:
                heartbeats.append(None)
            await trio.sleep(HEARTBEAT_EVERY_S)

    async def sender(k: int) -> None:
        i = 0
        while not stop.is_set():
            await log.send_until_acked(client, ch, f"s{k} {i}", f"s{k}-{i}", give_up_s=FAULT_S + 30)
            i += 1

    async with trio.open_nursery() as load:
        async with sqlite_writes_hang(server.node.store):
            load.start_soon(heartbeat)
            for k in range(IN_FLIGHT):
                load.start_soon(sender, k)
            await trio.sleep(FAULT_S)  # the fault's length (traffic flows meanwhile)
            during = len(log.records)
        stop.set()  # the store answers again: each sender ends once its current message is acked

    late = log.late(ANSWER_BOUND_S)
    assert not late, f"{len(late)} of {len(log.records)} sends answered late or never: {late[:3]}"
    slow = [w for w in heartbeats if w is None or w > HEARTBEAT_BOUND_S]
    assert not slow, f"{len(slow)} of {len(heartbeats)} heartbeats answered late or never: {slow[:5]}"
    assert len(heartbeats) >= FAULT_S / HEARTBEAT_EVERY_S / 2, heartbeats
    assert during > 2 * IN_FLIGHT  # the sends were answered (unavailable) and resent during the fault
    assert log.unavailable(), "the fault did not hold any write"
    # Nothing acked is lost, nothing stored twice, gap-free: every message once, each ack exact.
    head = await check_store(server, ch, alice["token"], log)
    assert head == len({r.client_msg_id for r in log.records}), head
