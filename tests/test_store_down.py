"""Liveness while the store does not answer writes (issue 24, item 4).

A real chatd (in process) whose store does not answer: real SQLite whose writer is stuck in a
write that does not return (tests/faults.py ``sqlite_writes_hang``: a hung disk), and the real
Apache Cassandra of the test session stopped with SIGSTOP (``process_paused``: no answer at all,
as with quorum lost behind a coordinator that waits for its request timeout). One client keeps 60
sends in flight (each resent with its ``client_msg_id`` after ``retry_after_ms`` when answered
``unavailable``, as docs/protocol.md says) and heartbeats every 0.25 s. Every send must be
answered within the send deadline (plus room for a loaded machine) and every heartbeat at once, all
through the fault; once the store answers again, everything is acked and the channel is exact.

The old code freed a send's in-flight slot when its store call returned, not when the deadline
answered it: after 64 unanswered-then-resent sends the session stopped reading, and the
heartbeats (and the sends) behind them lay unread until the store came back.
"""

from __future__ import annotations

import pytest
import trio

from chatd.store.cassandra_schema import drop_keyspace, migrate
from tests.faults import ANSWER_BOUND_S, SendLog, check_store, process_paused, sqlite_writes_hang
from tests.helpers import RunningServer, dm, make_config, open_client

IN_FLIGHT = 60
FAULT_S = 7.0  # > 3 send deadlines: the old code was stuck after one
HEARTBEAT_EVERY_S = 0.25
HEARTBEAT_BOUND_S = 1.5  # a heartbeat is answered by the reader itself: no store, no peer
NO_RATE_LIMIT = {"rate_frames_per_s": 100_000.0, "rate_burst": 100_000}


async def keep_60_in_flight_through(server, nursery, fault) -> None:
    """The load above through ``fault`` (an async context manager: the store does not answer
    while inside), then the checks."""
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
            await log.send_until_acked(client, ch, f"s{k} {i}", f"s{k}-{i}", give_up_s=FAULT_S + 40)
            i += 1

    async with trio.open_nursery() as load:
        async with fault:
            load.start_soon(heartbeat)
            for k in range(IN_FLIGHT):
                load.start_soon(sender, k)
            await trio.sleep(FAULT_S)  # the fault's length (traffic flows meanwhile)
            during = len(log.records)
        stop.set()  # the store answers again: each sender ends once its current message is acked

    late = log.late(ANSWER_BOUND_S)
    slow = [w for w in heartbeats if w is None or w > HEARTBEAT_BOUND_S]
    assert not late and not slow, (f"{len(late)} of {len(log.records)} sends answered late or never "
                                   f"{late[:3]}; {len(slow)} of {len(heartbeats)} heartbeats: {slow[:5]}")
    assert len(heartbeats) >= FAULT_S / HEARTBEAT_EVERY_S / 2, heartbeats
    assert during > 2 * IN_FLIGHT  # the sends were answered (unavailable) and resent during the fault
    assert log.unavailable(), "the fault did not hold any write"
    # Nothing acked is lost, nothing stored twice, gap-free: every message once, each ack exact.
    head = await check_store(server, ch, alice["token"], log)
    assert head == len({r.client_msg_id for r in log.records}), head


async def test_sends_and_heartbeats_answered_while_sqlite_writes_hang(server_with, nursery):
    server = await server_with(**NO_RATE_LIMIT)
    await keep_60_in_flight_through(server, nursery, sqlite_writes_hang(server.node.store))


async def test_sends_and_heartbeats_answered_while_cassandra_is_stopped(nursery, tmp_path, cassandra_server):
    if cassandra_server.pid is None:
        pytest.skip("CHATD_TEST_CASSANDRA names an outside Cassandra: this test stops its node, so it runs "
                    "only against the one the session started")
    ccfg = cassandra_server.config()
    await migrate(ccfg, 1000)
    try:
        cfg = make_config(tmp_path, **NO_RATE_LIMIT)
        cfg.update({"store": {"backend": "cassandra"},
                    "cassandra": {"contact_points": ccfg.contact_points, "port": ccfg.port, "local_dc": ccfg.local_dc,
                                  "keyspace": ccfg.keyspace, "replication": ccfg.replication}}, source="test")
        cfg.validate()
        server = await RunningServer(nursery, cfg).start()
        try:
            await keep_60_in_flight_through(server, nursery, process_paused(cassandra_server.pid))
        finally:
            await server.stop()
    finally:
        await drop_keyspace(ccfg)
