"""The Cassandra backend without a server: bucket arithmetic, row mapping, the statement text, the
driver-future -> trio bridge (with fake futures completed from other threads), error mapping, and the
backend's crash/takeover behaviour over the emulated keyspace (tests/conftest_store.py)."""

from __future__ import annotations

import random
import re
import threading
from pathlib import Path

import pytest
import trio
import trio.testing
from cassandra import (ConsistencyLevel, InvalidRequest, OperationTimedOut, ReadTimeout, Unavailable,
                       WriteTimeout, WriteType)
from cassandra.cluster import NoHostAvailable
from cassandra.connection import ConnectionException
from click.testing import CliRunner

from chatd.cli import main as cli_main
from chatd.config import CassandraConfig, Config, LimitsConfig
from chatd.errors import ChatError
from chatd.ids import new_group_id
from chatd.store import open_store
from chatd.store.base import ChannelSummary
from chatd.store.sqlite import SCHEMA_VERSION as SQLITE_SCHEMA_VERSION
from chatd.store.cassandra import CassandraStore
from chatd.store.cassandra_schema import (DEFAULT_BUCKET_SIZE, MAX_USER_ID, MIGRATIONS, SCHEMA_VERSION,
                                          STATEMENTS, bucket_first_seq, bucket_last_seq, bucket_of,
                                          channel_from_row, check_schema, keyspace_ddl, message_from_row,
                                          migration_ddl, new_user_id, summary_from_rows, user_from_row,
                                          username_key)
from chatd.store.cql import (LWT, READ, WRITE, CqlSession, await_response, check_keyspace_name,
                             consistency_level, parse_contact_points)
from tests.conftest_store import EmulatedKeyspace


# ---- bucket arithmetic ----------------------------------------------------------------------------
def test_bucket_arithmetic():
    assert [bucket_of(s, 4) for s in range(1, 13)] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    assert [(bucket_first_seq(b, 4), bucket_last_seq(b, 4)) for b in range(3)] == [(1, 3), (4, 7), (8, 11)]
    assert (bucket_of(999, 1000), bucket_of(1000, 1000), bucket_of(123_456_789, 1000)) == (0, 1, 123_456)
    for size in (2, 4, 1000):
        for seq in range(1, 5000, 7):
            b = bucket_of(seq, size)
            assert bucket_first_seq(b, size) <= seq <= bucket_last_seq(b, size)


def test_default_bucket_bounds_a_partition():
    """docs/cassandra.md: at most 1000 messages of at most 100,000 characters per partition."""
    assert DEFAULT_BUCKET_SIZE == 1000
    assert DEFAULT_BUCKET_SIZE * LimitsConfig().max_body_chars == 100_000_000  # ~100 MB if all ASCII
    assert DEFAULT_BUCKET_SIZE * 150 <= 200_000  # a typical ~150-byte row: ~150 KB per partition


# ---- mapping --------------------------------------------------------------------------------------
def test_username_key_folds_ascii_only_like_sqlite_nocase():
    assert username_key("Alice_X.9-") == "alice_x.9-"
    assert username_key("ÄBC") == "Äbc"  # NOCASE folds ASCII letters only
    assert username_key(username_key("MiXeD")) == "mixed"


def test_row_mapping():
    u = user_from_row({"id": 7, "username": "Ann", "password_hash": "h", "display_name": None, "about": None,
                       "created_at": 1.5})
    assert (u.id, u.username, u.password_hash, u.display_name, u.about, u.created_at) == (7, "Ann", "h", "", "", 1.5)
    m = message_from_row("g:1", {"seq": 3, "sender_id": 7, "client_msg_id": "c", "body": "b", "created_at": 2.5,
                                 "channel_id": "ignored", "bucket": 0})
    assert (m.channel_id, m.seq, m.sender_id, m.client_msg_id, m.body, m.created_at) == ("g:1", 3, 7, "c", "b", 2.5)
    ch = channel_from_row({"id": "dm:1:2", "kind": "dm", "name": None, "owner_id": None, "created_at": 4.0}, 9)
    assert (ch.id, ch.kind, ch.name, ch.owner_id, ch.created_at, ch.last_seq) == ("dm:1:2", "dm", "", None, 4.0, 9)
    uc = {"channel_id": "g:1", "kind": "group", "name": "team", "created_at": 10.0}
    assert summary_from_rows(uc, None, None) == ChannelSummary("g:1", "group", "team", 0, 0, 10.0)
    assert summary_from_rows(uc, {"last_seq": 5, "last_at": 12.0}, 2) == ChannelSummary("g:1", "group", "team",
                                                                                         5, 2, 12.0)


def test_new_user_ids_are_json_safe_int64():
    ids = [new_user_id() for _ in range(2000)]
    assert all(1 <= i < MAX_USER_ID == 2**53 for i in ids)
    assert len(set(ids)) == len(ids)


# ---- statement and schema text ----------------------------------------------------------------------
def _tables() -> dict[str, dict]:
    """table -> {"pk": [partition key columns], "ddl": text}, parsed from the migrations."""
    out = {}
    for _, stmts in MIGRATIONS:
        for ddl in stmts:
            if ddl.startswith("ALTER TABLE"):
                continue
            name = re.search(r"CREATE TABLE IF NOT EXISTS \{ks\}\.(\w+)", ddl).group(1)
            m = re.search(r"PRIMARY KEY \(\((.*?)\)", ddl)
            if m:
                pk = [c.strip() for c in m.group(1).split(",")]
            else:
                pk = [re.search(r"(\w+) \w+ PRIMARY KEY", ddl).group(1)]
            out[name] = {"pk": pk, "ddl": ddl}
    return out


def test_no_statement_filters_or_scans():
    tables = _tables()
    everything = [cql for _, cql in STATEMENTS.values()] + [d for _, s in MIGRATIONS for d in s]
    assert not [c for c in everything if "ALLOW FILTERING" in c.upper()]
    for name, (kind, cql) in STATEMENTS.items():
        table = re.search(r"(?:FROM|INTO|UPDATE)\s+(\w+)", cql).group(1)
        assert table in tables, (name, table)
        pk = tables[table]["pk"]
        if cql.startswith("INSERT"):
            cols = re.search(r"\((.*?)\)", cql).group(1)
            assert all(c in [x.strip() for x in cols.split(",")] for c in pk), name
        else:  # SELECT / UPDATE / DELETE: the whole partition key bound with "= ?"
            where = cql.split(" WHERE ", 1)[1]
            assert all(re.search(rf"\b{c} = \?", where) for c in pk), (name, pk)
        assert "'" not in cql, f"{name}: literal value in a statement; bind it"


def test_message_reads_are_bounded():
    for name, (kind, cql) in STATEMENTS.items():
        if cql.startswith("SELECT") and "FROM messages" in cql:  # one partition, and a LIMIT or one row
            assert "channel_id = ? AND bucket = ?" in cql and (" LIMIT " in cql or cql.endswith("AND seq = ?")), name
    ddl = _tables()["messages"]["ddl"]
    assert "PRIMARY KEY ((channel_id, bucket), seq)" in ddl
    assert "CLUSTERING ORDER BY (seq DESC)" in ddl


def test_statement_kinds_match_their_text():
    for name, (kind, cql) in STATEMENTS.items():
        assert kind in (READ, WRITE, LWT), name
        assert (kind == READ) == cql.startswith("SELECT"), name
        assert (kind == LWT) == bool(re.search(r" IF (NOT EXISTS|EXISTS|\w+ [=<])", cql)), name


def test_emulated_keyspace_implements_every_statement():
    assert EmulatedKeyspace(4).handlers_missing() == []


def test_keyspace_ddl_and_names():
    ddl = keyspace_ddl("chatd", "{'class': 'NetworkTopologyStrategy', 'dc1': 3}")
    assert ddl == ("CREATE KEYSPACE IF NOT EXISTS chatd WITH replication = "
                   "{'class': 'NetworkTopologyStrategy', 'dc1': 3} AND durable_writes = true")
    for bad in ("", "1abc", "chatd; DROP KEYSPACE x", "a-b", "x" * 49):
        with pytest.raises(ValueError):
            check_keyspace_name(bad)
    with pytest.raises(ValueError):
        keyspace_ddl("chatd", "SimpleStrategy")
    first = migration_ddl("ks1", 0)
    assert [v for v, _ in first] == list(range(1, SCHEMA_VERSION + 1))
    assert all("{ks}" not in d and " ks1." in d for _, stmts in first for d in stmts)
    assert migration_ddl("ks1", SCHEMA_VERSION) == []
    assert set(_tables()) >= {"users", "users_by_name", "devices", "channels", "channel_heads", "members_by_channel",
                              "channels_by_user", "read_cursors", "messages", "message_dedup", "schema_version"}


def test_schema_version_check():
    assert check_schema({"version": SCHEMA_VERSION, "bucket_size": 16}, "ks") == 16
    with pytest.raises(RuntimeError, match="no chatd schema; run `chatd store migrate`"):
        check_schema(None, "ks")
    with pytest.raises(RuntimeError, match=f"has schema v0, this chatd needs v{SCHEMA_VERSION}; run"):
        check_schema({"version": 0, "bucket_size": 16}, "ks")
    with pytest.raises(RuntimeError, match="newer than this chatd supports"):
        check_schema({"version": SCHEMA_VERSION + 1, "bucket_size": 16}, "ks")
    with pytest.raises(RuntimeError, match="invalid bucket_size"):
        check_schema({"version": SCHEMA_VERSION, "bucket_size": None}, "ks")


def test_config_helpers():
    assert consistency_level("local_quorum") == ConsistencyLevel.LOCAL_QUORUM
    assert consistency_level(" LOCAL_SERIAL ") == ConsistencyLevel.LOCAL_SERIAL
    with pytest.raises(ValueError, match="unknown consistency level 'QUORUMISH'"):
        consistency_level("QUORUMISH")
    assert parse_contact_points("a, b:9043,[::1]:9044,[fe80::1]", 9042) == [
        ("a", 9042), ("b", 9043), ("::1", 9044), ("fe80::1", 9042)]
    with pytest.raises(ValueError):
        parse_contact_points(" , ", 9042)


def test_example_config_is_valid():
    cfg = Config.load(Path(__file__).resolve().parent.parent / "config" / "cassandra.toml", env={})
    assert cfg.store.backend == "cassandra"
    consistency_level(cfg.cassandra.read_consistency)
    consistency_level(cfg.cassandra.serial_consistency)
    keyspace_ddl(cfg.cassandra.keyspace, cfg.cassandra.replication)


# ---- the future -> trio bridge -----------------------------------------------------------------------
class FakeFuture:
    """What ``await_response`` uses of a driver ``ResponseFuture``: callbacks run on whichever thread
    completes it, or at once if it is already complete; ``result()`` returns or raises."""

    def __init__(self):
        self._lock = threading.Lock()
        self._done = False
        self._value = self._error = None
        self._callbacks = []
        self.callback_threads: list[int] = []

    def add_callbacks(self, callback, errback):
        with self._lock:
            if not self._done:
                self._callbacks.append((callback, errback))
                return
        self._run(callback, errback)

    def _run(self, callback, errback):
        self.callback_threads.append(threading.get_ident())
        if self._error is not None:
            errback(self._error)
        else:
            callback(self._value)

    def complete(self, value=None, error=None):
        with self._lock:
            self._done, self._value, self._error = True, value, error
            callbacks, self._callbacks = self._callbacks, []
        for cb, eb in callbacks:
            self._run(cb, eb)

    def result(self):
        if self._error is not None:
            raise self._error
        return self._value


def complete_from_thread(fut, **kw) -> threading.Thread:
    t = threading.Thread(target=fut.complete, kwargs=kw)
    t.start()
    return t


async def test_bridge_wakes_trio_from_a_driver_thread_without_blocking_it():
    fut, got, ticks = FakeFuture(), [], []

    async def waiter():
        got.append(await await_response(fut))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        for i in range(5):  # the loop keeps running while the query is out
            await trio.sleep(0)
            ticks.append(i)
        assert got == []
        thread = complete_from_thread(fut, value=["row"])
    thread.join()
    assert got == [["row"]] and ticks == [0, 1, 2, 3, 4]
    assert fut.callback_threads == [thread.ident] != [threading.get_ident()]


async def test_bridge_raises_the_driver_error():
    fut = FakeFuture()
    thread = complete_from_thread(fut, error=WriteTimeout("write timed out", write_type=WriteType.SIMPLE))
    with pytest.raises(WriteTimeout):
        await await_response(fut)
    thread.join()


async def test_bridge_with_an_already_completed_future():
    fut = FakeFuture()
    fut.complete(value=[1, 2])
    assert await await_response(fut) == [1, 2]


async def test_bridge_cancelled_waiter_ignores_the_late_result():
    fut = FakeFuture()
    with trio.move_on_after(0.01) as scope:
        await await_response(fut)
    assert scope.cancelled_caught
    complete_from_thread(fut, value=["late"]).join()
    await trio.sleep(0)  # the late wake-up runs and is dropped
    await trio.testing.wait_all_tasks_blocked()
    assert fut.callback_threads  # the callback did run


def test_bridge_result_after_trio_has_finished():
    fut = FakeFuture()

    async def abandon():
        with trio.move_on_after(0):
            await await_response(fut)
    trio.run(abandon)
    fut.complete(value=["late"])  # RunFinishedError is swallowed in the callback
    assert len(fut.callback_threads) == 1


async def test_bridge_many_futures_from_many_threads():
    futures = [FakeFuture() for _ in range(200)]
    results = {}

    async def waiter(i):
        results[i] = await await_response(futures[i])

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(waiter, i)
        await trio.testing.wait_all_tasks_blocked()
        order = list(range(200))
        random.Random(5).shuffle(order)

        def finish(part):
            for i in part:
                futures[i].complete(value=i)
        threads = [threading.Thread(target=finish, args=(order[k::4],)) for k in range(4)]
        for t in threads:
            t.start()
    for t in threads:
        t.join()
    assert results == {i: i for i in range(200)}


# ---- CqlSession over a fake driver session: paging, LWT results, error mapping -----------------------
class FakeResultSet:
    def __init__(self, rows, paging_state):
        self.current_rows, self.paging_state = rows, paging_state


class FakePrepared:
    def __init__(self, cql):
        self.cql = cql
        self.consistency_level = self.serial_consistency_level = None
        self.is_idempotent = False

    def bind(self, params):
        bound = FakePrepared(self.cql)
        bound.params, bound.fetch_size = tuple(params), None
        return bound


class FakeDriverSession:
    """Answers from ``pages`` (a list of row lists), completing each future on a new thread."""

    def __init__(self, pages=(), error=None):
        self.pages, self.error, self.requests = list(pages), error, []
        self.threads: list[threading.Thread] = []

    def prepare(self, cql):
        return FakePrepared(cql)

    def execute_async(self, bound, paging_state=None):
        self.requests.append((bound.params, bound.fetch_size, paging_state))
        fut = FakeFuture()
        if self.error is not None:
            kw = {"error": self.error}
        else:
            i = int(paging_state or b"0")
            kw = {"value": FakeResultSet(self.pages[i], str(i + 1).encode() if i + 1 < len(self.pages) else None)}
        self.threads.append(complete_from_thread(fut, **kw))
        return fut


async def _session(driver) -> CqlSession:
    cfg = CassandraConfig(read_consistency="ONE", write_consistency="LOCAL_QUORUM", serial_consistency="SERIAL")
    return await CqlSession.prepare(driver, {"r": (READ, "SELECT a FROM t WHERE k = ?"),
                                             "w": (WRITE, "INSERT INTO t (k) VALUES (?)"),
                                             "l": (LWT, "INSERT INTO t (k) VALUES (?) IF NOT EXISTS")}, cfg)


async def test_cql_session_prepares_with_the_configured_consistency():
    cql = await _session(FakeDriverSession())
    r, w, lwt = (cql._prepared[n] for n in "rwl")
    assert (r.consistency_level, r.serial_consistency_level, r.is_idempotent) == (ConsistencyLevel.ONE, None, True)
    assert (w.consistency_level, w.serial_consistency_level) == (ConsistencyLevel.LOCAL_QUORUM, None)
    assert (lwt.consistency_level, lwt.serial_consistency_level) == (ConsistencyLevel.LOCAL_QUORUM,
                                                                     ConsistencyLevel.SERIAL)


async def test_cql_session_follows_paging_state():
    driver = FakeDriverSession(pages=[[{"a": 1}, {"a": 2}], [{"a": 3}], [{"a": 4}]])
    cql = await _session(driver)
    assert await cql.rows("r", (9,)) == [{"a": 1}, {"a": 2}, {"a": 3}, {"a": 4}]
    assert [(p, s) for p, _, s in driver.requests] == [((9,), None), ((9,), b"1"), ((9,), b"2")]
    assert {f for _, f, _ in driver.requests} == {500}


async def test_cql_session_reads_lwt_results():
    cql = await _session(FakeDriverSession(pages=[[{"[applied]": False, "k": 9, "v": "x"}]]))
    assert await cql.lwt("l", (9,)) == (False, {"k": 9, "v": "x"})
    cql = await _session(FakeDriverSession(pages=[[{"[applied]": True}]]))
    assert await cql.lwt("l", (9,)) == (True, {})


@pytest.mark.parametrize("error", [OperationTimedOut("t"), Unavailable("u"), WriteTimeout("w", write_type=WriteType.CAS), ReadTimeout("r"),
                                   NoHostAvailable("none", {}), ConnectionException("c"), InvalidRequest("i")])
async def test_driver_errors_become_unavailable(error):
    cql = await _session(FakeDriverSession(error=error))
    with pytest.raises(ChatError) as info:
        await cql.one("r", (1,))
    assert info.value.code == "unavailable"
    assert info.value.__cause__ is error


async def test_a_bug_is_not_disguised_as_unavailable():
    cql = await _session(FakeDriverSession(error=ValueError("bug")))
    with pytest.raises(ValueError):
        await cql.one("r", (1,))


# ---- the backend over the emulated keyspace: cost, crashes, takeover, paging -------------------------
@pytest.fixture
def keyspace():
    return EmulatedKeyspace(bucket_size=4)


async def _setup(keyspace, members=2):
    store = CassandraStore(keyspace, bucket_size=4)
    people = [await store.create_user(f"u{i}", "h", f"U{i}", 1.0) for i in range(members)]
    gid = new_group_id()
    await store.create_group(gid, "g", people[0].id, [p.id for p in people[1:]], 1.0, 100)
    return store, people, gid


async def test_cost_of_a_message(keyspace):
    store, (a, _), gid = await _setup(keyspace)
    await store.append_message(gid, a.id, "first", "x", 1.0)  # loads the channel
    keyspace.calls.clear()
    for i in range(10):
        await store.append_message(gid, a.id, f"c{i}", "x", 2.0 + i)
    # one by one: a dedup read, one conditional batch (the only LWT), the dedup row, the head hint
    assert keyspace.calls == {"dedup_get": 10, "batch": 10, "dedup_put": 10, "head_set": 10}
    keyspace.calls.clear()
    assert (await store.append_message(gid, a.id, "c3", "x", 99.0)).duplicate
    assert keyspace.calls == {"dedup_get": 1, "msg_get": 1}  # a resend: two reads, no write


async def test_queued_appends_of_a_channel_share_one_conditional_batch(keyspace):
    store, (a, b), gid = await _setup(keyspace)
    await store.append_message(gid, a.id, "first", "x", 1.0)
    keyspace.calls.clear()
    results = {}

    async def send(i):
        results[i] = await store.append_message(gid, (a, b)[i % 2].id, f"c{i}", f"body {i}", 2.0)
    async with trio.open_nursery() as nursery:
        for i in range(30):
            nursery.start_soon(send, i)
    assert store.stats["seq_conflicts"] == 0
    # the first call leads alone; the 29 queued meanwhile go in the next batches (4-wide buckets:
    # a batch never crosses a bucket, so 29 messages from seq 3 take 8 batches)
    assert keyspace.calls["batch"] <= 1 + 8 and keyspace.calls["dedup_put"] == 30
    assert keyspace.stored_seqs(gid) == list(range(1, 32))
    assert sorted(r.message.seq for r in results.values()) == list(range(2, 32))


async def test_a_resend_queued_behind_its_original_is_answered_as_a_duplicate(keyspace):
    store, (a, _), gid = await _setup(keyspace)
    async with trio.open_nursery() as nursery:
        out = []
        for body in ("one", "one again"):
            nursery.start_soon(lambda body=body: _collect(out, store.append_message(gid, a.id, "same", body, 1.0)))
    # whichever trio ran first is stored; the other is answered with it
    first = next(r for r in out if not r.duplicate).message
    assert sorted((r.message.seq, r.duplicate, r.message.body) for r in out) == [(1, False, first.body),
                                                                                (1, True, first.body)]
    assert keyspace.stored_seqs(gid) == [1]


async def _collect(out, coro):
    out.append(await coro)


async def test_history_reads_touch_only_the_partitions_they_need(keyspace):
    store, (a, _), gid = await _setup(keyspace)
    for i in range(10):  # buckets 0: 1-3, 1: 4-7, 2: 8-10
        await store.append_message(gid, a.id, f"c{i}", "x", float(i))
    keyspace.calls.clear()
    assert [m.seq for m in await store.read_messages(gid, after=8, limit=10)] == [9, 10]
    assert [m.seq for m in await store.read_messages(gid, after=2, limit=2)] == [3, 4]
    assert [m.seq for m in await store.read_messages(gid, after=0, before=3, limit=10)] == [1, 2]
    assert keyspace.calls == {"msg_asc": 1 + 2 + 1}
    keyspace.calls.clear()
    assert [m.seq for m in await store.read_messages(gid, before=9, limit=2)] == [7, 8]
    assert keyspace.calls == {"head_get": 1, "msg_top": 1, "msg_desc": 2}


async def test_batch_lost_before_it_applied_then_resend(keyspace):
    old, (a, b), gid = await _setup(keyspace)
    await old.append_message(gid, a.id, "m0", "zero", 1.0)
    keyspace.fail["bucket_advance"] = "before"  # the batch never reaches the replicas
    with pytest.raises(ChatError):
        await old.append_message(gid, a.id, "m1", "one", 2.0)
    assert keyspace.stored_seqs(gid) == [1]
    new = CassandraStore(keyspace, bucket_size=4)  # the new owner
    r = await new.append_message(gid, a.id, "m1", "one", 2.0)
    assert (r.duplicate, r.message.seq, r.message.body) == (False, 2, "one")
    assert keyspace.stored_seqs(gid) == [1, 2]


async def test_timeout_after_the_batch_applied(keyspace):
    store, (a, _), gid = await _setup(keyspace)
    keyspace.fail["bucket_advance"] = "after"  # stored, but the owner never heard back
    with pytest.raises(ChatError):
        await store.append_message(gid, a.id, "m0", "zero", 1.0)
    # the resend's batch finds the bucket advanced: it reads what was written and finds itself
    r = await store.append_message(gid, a.id, "m0", "zero again", 2.0)
    assert (r.duplicate, r.message.seq, r.message.body, r.message.created_at) == (True, 1, "zero", 1.0)
    assert (await store.append_message(gid, a.id, "m1", "one", 3.0)).message.seq == 2
    assert keyspace.stored_seqs(gid) == [1, 2]


async def test_owner_died_before_indexing_its_batch(keyspace):
    old, (a, _), gid = await _setup(keyspace)
    await old.append_message(gid, a.id, "m0", "zero", 1.0)
    keyspace.fail["dedup_put"] = "before"  # stored and acked; its dedup row never written
    assert (await old.append_message(gid, a.id, "m1", "one", 2.0)).message.seq == 2
    assert (gid, a.id, "m1") not in keyspace.tables["message_dedup"]
    assert keyspace.tables["channel_heads"][gid]["last_seq"] == 1  # the hint waits for the row
    new = CassandraStore(keyspace, bucket_size=4)  # the owner died; a new one takes over
    # it indexes what lies above the head hint before it appends: the resend is found
    r = await new.append_message(gid, a.id, "m1", "one (resent)", 3.0)
    assert (r.duplicate, r.message.seq, r.message.body) == (True, 2, "one")
    assert keyspace.tables["message_dedup"][(gid, a.id, "m1")]["seq"] == 2
    assert keyspace.stored_seqs(gid) == [1, 2]


async def test_a_resend_before_its_dedup_row_is_written_is_found_in_memory(keyspace):
    store, (a, _), gid = await _setup(keyspace)
    keyspace.fail["dedup_put"] = "before"
    assert (await store.append_message(gid, a.id, "m0", "zero", 1.0)).message.seq == 1
    r = await store.append_message(gid, a.id, "m0", "zero (resent)", 2.0)
    assert (r.duplicate, r.message.seq, r.message.body) == (True, 1, "zero")
    # that batch wrote the missing row again, and the hint followed
    assert keyspace.tables["message_dedup"][(gid, a.id, "m0")]["seq"] == 1
    assert keyspace.tables["channel_heads"][gid]["last_seq"] == 1
    assert keyspace.stored_seqs(gid) == [1]


async def test_an_old_owner_with_a_stale_head_catches_up_and_finds_its_resend(keyspace):
    old, (a, b), gid = await _setup(keyspace)
    await old.append_message(gid, a.id, "m0", "zero", 1.0)
    new = CassandraStore(keyspace, bucket_size=4)
    assert (await new.append_message(gid, b.id, "x", "other", 3.0)).message.seq == 2
    assert (await new.append_message(gid, a.id, "m1", "one", 4.0)).message.seq == 3
    # the old owner (head cached at 1) gets the resend of m1 and a new message in one batch
    out = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_collect, out, old.append_message(gid, a.id, "m1", "one", 5.0))
        nursery.start_soon(_collect, out, old.append_message(gid, a.id, "m2", "two", 5.0))
    got = sorted((r.message.seq, r.duplicate, r.message.client_msg_id) for r in out)
    assert got == [(3, True, "m1"), (4, False, "m2")]
    assert keyspace.stored_seqs(gid) == [1, 2, 3, 4]
    assert [m.client_msg_id for m in await new.read_messages(gid, after=0, limit=10)] == ["m0", "x", "m1", "m2"]


async def test_a_bucket_written_before_schema_v3_is_continued_without_overwriting(keyspace):
    store, (a, b), gid = await _setup(keyspace)
    # schema v2 wrote rows with no bucket_head, and a dedup claim for every message (some of them
    # intents that never got their message: here m9 claims seq 3, which holds another message)
    for seq, (sender, cmid) in enumerate([(a, "m0"), (b, "m1"), (a, "m2")], start=1):
        keyspace.w_msg_put(gid, 0, seq, sender.id, cmid, f"v2 {seq}", float(seq))
        keyspace.w_dedup_put(gid, sender.id, cmid, seq)
    keyspace.w_dedup_put(gid, a.id, "m9", 3)
    keyspace.w_head_set(3, 3, 3.0, gid)
    r = await store.append_message(gid, a.id, "m1", "dup?", 9.0)  # another sender's id: not a resend
    assert (r.duplicate, r.message.seq) == (False, 4)
    assert (await store.append_message(gid, b.id, "m1", "resend", 9.0)).duplicate
    r = await store.append_message(gid, a.id, "m9", "nine", 9.0)  # its stale claim names seq 3
    assert (r.duplicate, r.message.seq) == (False, 5)
    assert keyspace.stored_seqs(gid) == [1, 2, 3, 4, 5]
    assert [m.body for m in await store.read_messages(gid, after=0, limit=9)][:3] == ["v2 1", "v2 2", "v2 3"]


async def test_lagging_head_hint_is_found_and_repaired(keyspace):
    store, (a, _), gid = await _setup(keyspace)
    for i in range(10):
        await store.append_message(gid, a.id, f"c{i}", "x", float(i))
    assert keyspace.tables["channel_heads"][gid]["ts"] == 10  # USING TIMESTAMP = seq
    keyspace.tables["channel_heads"][gid] = {"ts": 1, "last_seq": 1, "last_at": 0.0}  # as if writers died
    new = CassandraStore(keyspace, bucket_size=4)
    keyspace.calls.clear()
    assert await new.head_seq(gid) == 10
    assert keyspace.calls["msg_top"] == 3  # buckets 0 (full up to 3), 1 (full up to 7), 2 (ends at 10)
    assert keyspace.calls["dedup_put"] == 9  # seqs 2..10 indexed again before the hint moves
    assert keyspace.tables["channel_heads"][gid]["last_seq"] == 10  # repaired
    assert keyspace.tables["channel_heads"][gid]["last_at"] == 9.0
    assert [m.seq for m in await new.read_messages(gid, limit=3)] == [8, 9, 10]
    assert (await new.append_message(gid, a.id, "next", "x", 11.0)).message.seq == 11


async def test_lost_head_write_does_not_lose_the_message(keyspace):
    store, (a, _), gid = await _setup(keyspace)
    await store.append_message(gid, a.id, "m0", "zero", 1.0)
    keyspace.fail["head_set"] = "before"
    assert (await store.append_message(gid, a.id, "m1", "one", 2.0)).message.seq == 2  # stored, acked
    assert keyspace.tables["channel_heads"][gid]["last_seq"] == 1
    other = CassandraStore(keyspace, bucket_size=4)
    assert await other.head_seq(gid) == 2
    assert keyspace.tables["channel_heads"][gid]["last_seq"] == 2  # repaired by the reader
    r = await store.append_message(gid, a.id, "m1", "one", 3.0)
    assert (r.duplicate, r.message.seq) == (True, 2)


async def test_an_old_owners_late_head_write_cannot_lower_the_head(keyspace):
    store, (a, _), gid = await _setup(keyspace)
    for i in range(5):
        await store.append_message(gid, a.id, f"c{i}", "x", float(i))
    keyspace.w_head_set(3, 3, 2.0, gid)  # arrives last, written with timestamp = its seq
    assert keyspace.tables["channel_heads"][gid]["last_seq"] == 5


async def test_repeating_a_membership_change_repairs_its_by_user_rows(keyspace):
    store, (a, b, c), gid = await _setup(keyspace, members=3)
    keyspace.fail["user_channel_delete"] = "before"  # removed from the group, died before the by-user row
    with pytest.raises(ChatError):
        await store.remove_member(gid, b.id)
    assert await store.members(gid) == sorted([a.id, c.id])
    assert [s.id for s in await store.channels_of(b.id)] == [gid]  # stale until repeated
    assert await store.remove_member(gid, b.id) is False
    assert await store.channels_of(b.id) == []

    keyspace.fail["user_channel_insert"] = "before"  # joined, died before the by-user row
    with pytest.raises(ChatError):
        await store.add_member(gid, b.id, 100, 5.0)
    assert b.id in await store.members(gid)
    assert await store.channels_of(b.id) == []
    assert await store.add_member(gid, b.id, 100, 6.0) is False
    assert [s.id for s in await store.channels_of(b.id)] == [gid]


async def test_paging_is_followed_everywhere(keyspace):
    keyspace.page_rows = 2
    store, people, gid = await _setup(keyspace, members=7)
    assert await store.members(gid) == sorted(p.id for p in people)
    for i in range(9):
        await store.append_message(gid, people[0].id, f"c{i}", "x", float(i))
    assert [m.seq for m in await store.read_messages(gid, after=0, limit=100)] == list(range(1, 10))
    assert [m.seq for m in await store.read_messages(gid, limit=100)] == list(range(1, 10))
    more = [new_group_id() for _ in range(4)]
    for g in more:
        await store.create_group(g, "g", people[0].id, [], 2.0, 10)
    assert sorted(s.id for s in await store.channels_of(people[0].id)) == sorted([gid, *more])
    assert keyspace.calls["members_get"] > 1 and keyspace.calls["msg_asc"] > 3


async def test_aclose_waits_for_running_calls_then_refuses(keyspace):
    store, (a, _), gid = await _setup(keyspace)
    release = trio.Event()
    original = keyspace.execute

    async def slow_execute(name, params, **kw):
        if name == "dedup_get":
            await release.wait()
        return await original(name, params, **kw)
    keyspace.execute = slow_execute
    results, closed = [], []

    async def append():
        results.append(await store.append_message(gid, a.id, "c", "x", 1.0))

    async def close():
        await store.aclose()
        closed.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(append)
        await trio.testing.wait_all_tasks_blocked()  # parked inside the append
        nursery.start_soon(close)
        await trio.testing.wait_all_tasks_blocked()
        assert closed == []
        release.set()
    assert closed == [True]
    assert [r.message.seq for r in results] == [1]
    with pytest.raises(ChatError) as info:
        await store.head_seq(gid)
    assert info.value.code == "unavailable"


# ---- wiring ---------------------------------------------------------------------------------------
async def test_open_store_with_an_unreachable_cluster_is_a_clear_error():
    cfg = Config.from_mapping({"store": {"backend": "cassandra"},
                               "cassandra": {"contact_points": "127.0.0.1", "port": 1, "connect_timeout_s": 1.0}})
    with pytest.raises(RuntimeError, match=r"cannot connect to Cassandra at 127.0.0.1 \(port 1\)"):
        async with open_store(cfg):
            pass


def test_cli_store_migrate_sqlite(tmp_path):
    runner = CliRunner()
    first = runner.invoke(cli_main, ["store", "migrate", "--data-dir", str(tmp_path)], env={})
    assert first.exit_code == 0, first.output
    assert f"sqlite {tmp_path / 'chatd.db'}: schema v0 -> v{SQLITE_SCHEMA_VERSION}" in first.output
    again = runner.invoke(cli_main, ["store", "migrate", "--data-dir", str(tmp_path)], env={})
    assert f"schema v{SQLITE_SCHEMA_VERSION} -> v{SQLITE_SCHEMA_VERSION}" in again.output


async def test_a_bad_consistency_level_stops_start_up_clearly():
    cfg = Config.from_mapping({"store": {"backend": "cassandra"}, "cassandra": {"read_consistency": "MOSTLY"}})
    with pytest.raises(RuntimeError, match="cassandra configuration: unknown consistency level 'MOSTLY'"):
        async with open_store(cfg):
            pass
