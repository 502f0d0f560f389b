"""The store's part of the message lifecycle (``Store.append_event``, chatd/store/base.py), one suite on
SQLite and on a real Cassandra: rows take the channel's seqs, fold into their target, dedup like a
send; a delete erases the text of the message and of every edit, and its reactions, from every table
(Cassandra: every table read back; SQLite: the database and WAL files grepped).

The emulated keyspace (tests/conftest_store.py) runs it too: it models the folds' ``USING
TIMESTAMP`` cells and refuses a fold of a row that is not stored (a phantom seq)."""

from __future__ import annotations

import contextlib
import secrets

import pytest
import trio

from chatd.lifecycle import DELETE, EDIT, MEMBER_ADDED, MESSAGE, REACT, UNREACT, EventSpec
from chatd.store.cassandra import open_cassandra
from chatd.store.cql import connect, shutdown
from chatd.store.sqlite import open_sqlite
from chatd.store.cassandra import CassandraStore
from tests.conftest_store import EmulatedKeyspace
from tests.test_store_contract import TEST_BUCKET_SIZE, Backend, cassandra_config, group, users  # noqa: F401


@pytest.fixture(params=["sqlite", "cassandra_emulated", "cassandra"])
def lc_backend(request, tmp_path):
    if request.param == "sqlite":
        return Backend("sqlite", lambda: open_sqlite(str(tmp_path / "chatd.db")))
    if request.param == "cassandra_emulated":
        keyspace = EmulatedKeyspace(TEST_BUCKET_SIZE)

        @contextlib.asynccontextmanager
        async def open_emulated():
            store = CassandraStore(keyspace, bucket_size=TEST_BUCKET_SIZE)
            try:
                yield store
            finally:
                await store.aclose()
        b = Backend("cassandra_emulated", open_emulated)
        b.keyspace = keyspace
        return b
    cfg = request.getfixturevalue("cassandra_config")
    b = Backend("cassandra", lambda: open_cassandra(cfg))
    b.cfg = cfg
    return b


async def _ev(store, ch, user, spec, at):
    return await store.append_event(ch, user.id, secrets.token_hex(6), spec, at)


async def _all_cassandra_text(cfg) -> str:
    """Every row of every table of the keyspace, as text."""
    cluster, session = await connect(cfg, None)
    try:
        def dump():
            out = []
            for table in cluster.metadata.keyspaces[cfg.keyspace].tables:
                out.extend(repr(r) for r in session.execute(f"SELECT * FROM {cfg.keyspace}.{table}"))
            return "\n".join(out)
        return await trio.to_thread.run_sync(dump)
    finally:
        await shutdown(cluster)


async def test_rows_fold_into_their_target_and_a_delete_erases_everything(lc_backend, tmp_path):
    async with lc_backend.open() as store:
        a, b = await users(store, 2)
        ch = await group(store, a, [b])
        secret = f"secret-{secrets.token_hex(8)}"
        edits = [f"edit-{i}-{secrets.token_hex(8)}" for i in range(2)]
        m = (await store.append_message(ch, a.id, "m1", secret, 3000.0)).message
        for i, body in enumerate(edits):
            r = await _ev(store, ch, a, EventSpec(EDIT, target_seq=m.seq, body=body), 3001.0 + i)
            assert (r.message.kind, r.message.target_seq, r.message.seq) == (EDIT, m.seq, m.seq + 1 + i)
        r1 = await _ev(store, ch, a, EventSpec(REACT, target_seq=m.seq, body="🦄"), 3010.0)
        r2 = await _ev(store, ch, b, EventSpec(REACT, target_seq=m.seq, body="🦄"), 3011.0)
        r3 = await _ev(store, ch, b, EventSpec(REACT, target_seq=m.seq, body="👍"), 3012.0)
        assert [x.message.meta["count"] for x in (r1, r2, r3)] == [1, 2, 1]
        r4 = await _ev(store, ch, a, EventSpec(UNREACT, target_seq=m.seq, body="🦄"), 3013.0)
        assert r4.message.meta == {"count": 1}
        reply = await _ev(store, ch, b, EventSpec(MESSAGE, body="answer", reply_to=m.seq), 3014.0)
        assert reply.message.kind == MESSAGE and reply.message.reply_to == m.seq
        sys_row = await _ev(store, ch, a, EventSpec(MEMBER_ADDED, user_id=b.id), 3015.0)
        assert sys_row.message.meta == {"user_id": b.id}
        rows = await store.read_messages(ch, after=0, limit=100)
        assert [x.seq for x in rows] == list(range(1, sys_row.message.seq + 1))
        folded = rows[0]
        assert (folded.body, folded.edited_at, folded.state_seq) == (edits[-1], 3002.0, r4.message.seq)
        assert folded.reactions == (("🦄", (b.id,)), ("👍", (b.id,)))
        assert rows[-2].reply == {"seq": m.seq, "sender_id": a.id, "excerpt": edits[-1]}
        # a resend answers the original row and changes nothing
        cmid = "again"
        first = await store.append_event(ch, b.id, cmid, EventSpec(REACT, target_seq=m.seq, body="🎉"), 3020.0)
        dup = await store.append_event(ch, b.id, cmid, EventSpec(REACT, target_seq=m.seq, body="🎉"), 3021.0)
        assert dup.duplicate and dup.message.seq == first.message.seq and dup.message.kind == REACT
        assert await store.find_sent(ch, b.id, cmid) is not None
        assert await store.find_sent(ch, b.id, "never") is None
        assert await store.head_seq(ch) == first.message.seq
        # the text is in the store before the delete (so the check below can fail)
        assert secret in await _all_text(lc_backend, tmp_path)
        gone = await _ev(store, ch, a, EventSpec(DELETE, target_seq=m.seq), 3030.0)
        rows = await store.read_messages(ch, after=0, limit=100)
        stub = rows[0]
        assert (stub.body, stub.deleted_by, stub.deleted_at, stub.reactions, stub.state_seq) == \
            ("", a.id, 3030.0, (), gone.message.seq)
        assert all(x.body == "" and x.redacted for x in rows if x.kind in (EDIT, REACT, UNREACT))
        assert [x for x in rows if x.seq == reply.message.seq][0].reply == \
            {"seq": m.seq, "sender_id": a.id, "deleted": True, "excerpt": ""}
    everything = await _all_text(lc_backend, tmp_path)
    for t in (secret, *edits, "🦄", "👍", "🎉"):
        assert t not in everything, f"{t!r} is still in the store"


async def _all_text(backend, tmp_path) -> str:
    """Everything the store holds, as text: every table (Cassandra, the emulated keyspace), or the
    bytes of the database file and its WAL (SQLite; closed or open)."""
    if backend.name == "cassandra":
        return await _all_cassandra_text(backend.cfg)
    if backend.name == "cassandra_emulated":
        tables = dict(backend.keyspace.tables)  # (a deleted reaction is a tombstone: not readable)
        tables["reactions"] = {k: backend.keyspace._live_reactions(*k) for k in tables["reactions"]}
        return repr(tables)
    return "".join(f.read_bytes().decode("utf-8", "replace") for f in sorted(tmp_path.glob("chatd.db*")))


async def test_delivered_and_read_positions(lc_backend):
    async with lc_backend.open() as store:
        a, b, c = await users(store, 3)
        ch = await group(store, a, [b])
        for i in range(3):
            await store.append_message(ch, a.id, f"p{i}", "x", 4000.0 + i)
        assert await store.set_delivered(ch, b.id, 2) == 2
        assert await store.set_delivered(ch, b.id, 1) == 2  # never lowers
        assert await store.set_delivered(ch, b.id, 50) == 3  # never past the head
        assert await store.set_read(ch, a.id, 2) == 2  # a read implies received
        assert await store.receipts(ch) == {a.id: (2, 2), b.id: (3, 0)}
        await store.rename_channel(ch, "renamed")
        assert (await store.get_channel(ch)).name == "renamed"
        assert [s.name for s in await store.channels_of(b.id) if s.id == ch] == ["renamed"]
        with pytest.raises(Exception) as info:
            await store.set_delivered(ch, c.id, 1)
        assert getattr(info.value, "code", None) == "not_member"


async def test_unread_counts_new_messages_only(lc_backend):
    async with lc_backend.open() as store:
        a, b = await users(store, 2)
        ch = await group(store, a, [b])
        m1 = (await store.append_message(ch, a.id, "u1", "one", 5000.0)).message
        await store.append_message(ch, a.id, "u2", "two", 5001.0)
        await _ev(store, ch, a, EventSpec(EDIT, target_seq=m1.seq, body="one!"), 5002.0)
        await _ev(store, ch, b, EventSpec(REACT, target_seq=m1.seq, body="👍"), 5003.0)
        await _ev(store, ch, a, EventSpec(MEMBER_ADDED, user_id=b.id), 5004.0)
        [mine] = [s for s in await store.channels_of(b.id) if s.id == ch]
        assert (mine.last_seq, mine.unread) == (5, 2)  # two messages; no edit, reaction or system row
        await _ev(store, ch, a, EventSpec(DELETE, target_seq=m1.seq), 5005.0)
        [mine] = [s for s in await store.channels_of(b.id) if s.id == ch]
        assert mine.unread == 1  # a deleted message stops counting
