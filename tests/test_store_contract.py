"""The store contract: one suite every backend must pass (chatd/store/base.py is the specification).

Backends (the ``backend`` fixture):

* ``sqlite``: always, on a fresh file per test.
* ``cassandra_emulated``: always; ``CassandraStore`` over an in-memory model of its keyspace
  (tests/conftest_store.py). It runs the backend's own logic - sequencing, dedup, buckets, paging -
  but not the CQL or the driver.
* ``cassandra``: a real Apache Cassandra, started for the session by tests/cassandra_server.py (or the
  server named by ``CHATD_TEST_CASSANDRA=host:port``). The session creates a keyspace
  ``chatd_test_<random>`` (bucket size 4, SimpleStrategy RF 1) and drops it at the end; tests share it,
  so every name and id a test creates is fresh.

Buckets are 4 messages wide in both Cassandra variants, so ten messages cross two bucket boundaries.
"""

from __future__ import annotations

import contextlib
import secrets
import time

import pytest
import trio

from chatd.errors import ChatError
from chatd.ids import dm_channel_id, new_group_id
from chatd.store.base import Channel, ChannelSummary, Departure, Device, PushEntry, PushToken, push_slot
from chatd.store.cassandra import CassandraStore, open_cassandra
from chatd.store.cassandra_schema import drop_keyspace, migrate
from chatd.store.sqlite import open_sqlite
from tests.conftest_store import EmulatedKeyspace

TEST_BUCKET_SIZE = 4
NO_SUCH_ID = 2**62 + 12345  # above every id either backend hands out


# ---- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def cassandra_config(cassandra_server):
    """A fresh keyspace on the session's real Cassandra (tests/cassandra_server.py), dropped after."""
    cfg = cassandra_server.config()
    try:
        trio.run(migrate, cfg, TEST_BUCKET_SIZE)
        yield cfg
    finally:
        trio.run(drop_keyspace, cfg)


class Backend:
    """Opens stores on one backing storage; two stores opened here see the same data (like the old
    and the new owner of a channel during a takeover)."""

    def __init__(self, name: str, opener):
        self.name = name
        self.open = opener


@pytest.fixture(params=["sqlite", "cassandra_emulated", "cassandra_emulated_bg", "cassandra"])
def backend(request, tmp_path):
    if request.param == "sqlite":
        return Backend("sqlite", lambda: open_sqlite(str(tmp_path / "chatd.db")))
    if request.param.startswith("cassandra_emulated"):
        keyspace = EmulatedKeyspace(TEST_BUCKET_SIZE)

        @contextlib.asynccontextmanager
        async def open_emulated():
            # _bg: with a background nursery, as open_cassandra runs it (the task-free appends,
            # dedup rows and head hints after the answer); without one, each caller does its own
            async with trio.open_nursery() as background:
                store = CassandraStore(keyspace, bucket_size=TEST_BUCKET_SIZE,
                                       background=background if request.param.endswith("_bg") else None)
                try:
                    yield store
                finally:
                    await store.aclose()
        return Backend(request.param, open_emulated)
    cfg = request.getfixturevalue("cassandra_config")
    return Backend("cassandra", lambda: open_cassandra(cfg))


@pytest.fixture
async def store(backend):
    async with backend.open() as s:
        yield s


# ---- helpers --------------------------------------------------------------------------------------
def uniq(base: str) -> str:
    return f"{base}_{secrets.token_hex(4)}"


async def users(store, n: int):
    return [await store.create_user(uniq(f"user{i}"), f"hash{i}", f"User {i}", 1000.0 + i) for i in range(n)]


def fields(m):
    return (m.channel_id, m.seq, m.sender_id, m.client_msg_id, m.body, m.created_at)


async def group(store, owner, others=(), created_at=2000.0, max_members=100):
    channel = await store.create_group(new_group_id(), "team", owner.id, [u.id for u in others], created_at,
                                       max_members)
    return channel.id


async def send(store, channel_id, sender, n, start_at=3000.0, prefix="m"):
    out = []
    for i in range(n):
        r = await store.append_message(channel_id, sender.id, f"{prefix}{i}", f"body {i}", start_at + i)
        out.append(r)
    return out


async def expect_error(code, coro):
    with pytest.raises(ChatError) as info:
        await coro
    assert info.value.code == code
    return info.value


# ---- users and devices --------------------------------------------------------------------------
async def test_create_user_and_lookup(store):
    name = uniq("Alice")
    u = await store.create_user(name, "hash-a", "Alice A", 1000.5)
    assert isinstance(u.id, int) and 0 < u.id < 2**63
    assert (u.username, u.password_hash, u.display_name, u.about, u.created_at) == \
        (name, "hash-a", "Alice A", "", 1000.5)
    assert await store.get_user(u.id) == u
    assert await store.get_user_by_name(name) == u
    assert await store.get_user_by_name(name.upper()) == u
    assert await store.get_user_by_name(name.lower()) == u
    assert await store.get_user_by_name(uniq("nobody")) is None
    assert await store.get_user(NO_SUCH_ID) is None


async def test_username_taken_is_case_insensitive(store):
    name = uniq("Bob")
    first = await store.create_user(name, "h1", "Bob", 1.0)
    await expect_error("username_taken", store.create_user(name.upper(), "h2", "Other", 2.0))
    await expect_error("username_taken", store.create_user(name, "h3", "Other", 3.0))
    assert await store.get_user_by_name(name.swapcase()) == first
    other = await store.create_user(name + "x", "h4", "Bob X", 4.0)
    assert other.id != first.id


async def test_user_ids_are_distinct_int64(store):
    created = await users(store, 6)
    ids = [u.id for u in created]
    assert len(set(ids)) == 6
    assert all(isinstance(i, int) and 0 < i < 2**63 for i in ids)


async def test_get_users(store):
    a, b, c = await users(store, 3)
    assert await store.get_users([a.id, NO_SUCH_ID, b.id, a.id]) == {a.id: a, b.id: b}
    assert await store.get_users([]) == {}
    assert await store.get_users([NO_SUCH_ID]) == {}


async def test_update_profile(store):
    (u,) = await users(store, 1)
    u1 = await store.update_profile(u.id, "New Name", None)
    assert (u1.id, u1.username, u1.display_name, u1.about, u1.created_at, u1.password_hash) == \
        (u.id, u.username, "New Name", "", u.created_at, u.password_hash)
    u2 = await store.update_profile(u.id, None, "about me")
    assert (u2.display_name, u2.about) == ("New Name", "about me")
    u3 = await store.update_profile(u.id, "", "")
    assert (u3.display_name, u3.about) == ("", "")
    assert await store.update_profile(u.id, None, None) == u3
    assert await store.get_user(u.id) == u3
    await expect_error("no_such_user", store.update_profile(NO_SUCH_ID, "x", None))
    assert await store.get_user(NO_SUCH_ID) is None  # no half-made user appeared


async def test_devices_keep_their_first_owner(store):
    a, b = await users(store, 2)
    device = uniq("dev")
    assert await store.device_owner(device) is None
    await store.add_device(a.id, device, 5.0)
    assert await store.device_owner(device) == a.id
    await store.add_device(a.id, device, 6.0)
    await store.add_device(b.id, device, 7.0)
    assert await store.device_owner(device) == a.id


async def test_set_password_hash(store):
    a, b = await users(store, 2)
    await store.set_password_hash(a.id, "scrypt$new")
    assert (await store.get_user(a.id)).password_hash == "scrypt$new"
    assert (await store.get_user_by_name(a.username)).password_hash == "scrypt$new"
    assert (await store.get_user(b.id)).password_hash == b.password_hash  # only that user's
    await store.set_password_hash(NO_SUCH_ID, "scrypt$x")
    assert await store.get_user(NO_SUCH_ID) is None  # no half-made user appeared


# ---- channels and membership --------------------------------------------------------------------
async def test_create_group(store):
    a, b, c = await users(store, 3)
    gid = new_group_id()
    ch = await store.create_group(gid, "team", a.id, [b.id, c.id, b.id, a.id], 2000.0, 3)
    assert ch == Channel(gid, "group", "team", a.id, 2000.0, 0)
    assert await store.get_channel(gid) == ch
    assert await store.members(gid) == sorted([a.id, b.id, c.id])
    assert await store.get_channel(new_group_id()) is None
    assert await store.members(new_group_id()) == []


async def test_create_group_errors_store_nothing(store):
    a, b, c = await users(store, 3)
    gid = new_group_id()
    await expect_error("group_full", store.create_group(gid, "big", a.id, [b.id, c.id], 1.0, 2))
    await expect_error("no_such_user", store.create_group(gid, "x", a.id, [b.id, NO_SUCH_ID], 1.0, 10))
    assert await store.get_channel(gid) is None
    assert await store.members(gid) == []
    assert await store.channels_of(a.id) == []


async def test_add_and_remove_members(store):
    a, b, c, d = await users(store, 4)
    gid = await group(store, a, max_members=3)
    assert await store.add_member(gid, b.id, 3, 10.0) is True
    assert await store.add_member(gid, b.id, 3, 11.0) is False
    assert await store.add_member(gid, c.id, 3, 12.0) is True
    await expect_error("group_full", store.add_member(gid, d.id, 3, 13.0))
    assert await store.members(gid) == sorted([a.id, b.id, c.id])
    await expect_error("no_such_user", store.add_member(gid, NO_SUCH_ID, 3, 14.0))
    await expect_error("no_such_channel", store.add_member(new_group_id(), d.id, 3, 15.0))
    await expect_error("no_such_channel", store.add_member(new_group_id(), NO_SUCH_ID, 3, 15.0))

    assert await store.remove_member(gid, b.id) is True
    assert await store.remove_member(gid, b.id) is False
    assert await store.remove_member(new_group_id(), b.id) is False
    assert await store.members(gid) == sorted([a.id, c.id])
    assert await store.add_member(gid, d.id, 3, 16.0) is True
    assert await store.members(gid) == sorted([a.id, c.id, d.id])
    assert [s.id for s in await store.channels_of(b.id)] == []
    assert [s.id for s in await store.channels_of(d.id)] == [gid]


async def test_groups_created_since_counts_the_owners_recent_groups(store):
    """limits.groups_created_per_hour counts from here (every API server reads the same)."""
    a, b = await users(store, 2)
    assert await store.groups_created_since(a.id, 0.0, 10) == []
    for at in (100.0, 200.0, 300.0, 400.0):
        await group(store, a, [b], created_at=at)
    await group(store, b, [a], created_at=250.0)  # b's, not a's
    assert await store.groups_created_since(a.id, 150.0, 10) == [200.0, 300.0, 400.0]
    assert await store.groups_created_since(a.id, 0.0, 2) == [100.0, 200.0]  # the oldest first
    assert await store.groups_created_since(b.id, 0.0, 10) == [250.0]
    await store.append_message(dm_channel_id(a.id, b.id), a.id, "d", "hi", 500.0,
                               dm_pair=tuple(sorted((a.id, b.id))))  # a 1:1 channel is no group
    assert await store.groups_created_since(a.id, 450.0, 10) == []


async def test_a_departure_is_kept_until_the_user_rejoins(store):
    a, b, c = await users(store, 3)
    gid = await group(store, a, [b, c])
    assert await store.departure(gid, b.id) is None
    assert await store.remove_member(gid, c.id) is True  # removed by the owner: no departure
    assert await store.departure(gid, c.id) is None
    assert await store.remove_member(gid, b.id, left_at=50.0) is True  # b leaves
    assert await store.departure(gid, b.id) == Departure(gid, b.id, 50.0, None, None)
    assert await store.invite_back(gid, b.id, a.id, 60.0) is True
    assert await store.departure(gid, b.id) == Departure(gid, b.id, 50.0, a.id, 60.0)
    assert await store.invitations_of(b.id, 10) == [Departure(gid, b.id, 50.0, a.id, 60.0)]
    assert await store.invitations_of(c.id, 10) == []
    assert await store.invite_back(gid, c.id, a.id, 60.0) is False  # never left on their own
    assert await store.departure(gid, c.id) is None
    assert await store.add_member(gid, b.id, 100, 70.0) is True  # accepting clears it
    assert await store.departure(gid, b.id) is None
    assert await store.invitations_of(b.id, 10) == []
    assert await store.invite_back(gid, b.id, a.id, 80.0) is False
    assert await store.remove_member(gid, b.id, left_at=90.0) is True  # a second leave: no old invitation
    assert await store.departure(gid, b.id) == Departure(gid, b.id, 90.0, None, None)
    assert await store.invitations_of(b.id, 10) == []  # the old invitation went with the rejoin


async def test_invitations_of_lists_the_latest_first(store):
    a, b = await users(store, 2)
    gids = [await group(store, a, [b]) for _ in range(3)]
    for i, gid in enumerate(gids):
        assert await store.remove_member(gid, b.id, left_at=10.0 + i) is True
    await store.invite_back(gids[0], b.id, a.id, 30.0)
    await store.invite_back(gids[2], b.id, a.id, 20.0)
    assert [d.channel_id for d in await store.invitations_of(b.id, 10)] == [gids[0], gids[2]]
    assert [d.channel_id for d in await store.invitations_of(b.id, 1)] == [gids[0]]
    assert await store.remove_member(gids[0], b.id, left_at=40.0) is False  # left again: the invitation is void
    assert [d.channel_id for d in await store.invitations_of(b.id, 10)] == [gids[2]]


async def test_channels_page_walks_every_channel_once_in_id_order(store):
    a, b = await users(store, 2)
    gids = [await group(store, a, [b], created_at=10.0 + i) for i in range(5)]
    dm = dm_channel_id(a.id, b.id)
    await store.append_message(dm, b.id, "d1", "hi", 40.0, dm_pair=tuple(sorted((a.id, b.id))))
    assert await store.set_read(dm, a.id, 1) == 1
    seen, after = [], None
    while True:
        page = await store.channels_page(a.id, after, 2)
        assert len(page) <= 2
        if not page:
            break
        seen.extend(page)
        after = page[-1].id
        await store.append_message(gids[0], b.id, f"x{len(seen)}", "moves it to the top", 50.0 + len(seen))
    assert [s.id for s in seen] == sorted([*gids, dm])
    by_id = {s.id: s for s in seen}
    assert (by_id[dm].kind, by_id[dm].last_seq, by_id[dm].read_seq, by_id[dm].unread) == ("dm", 1, 1, 0)
    assert await store.channels_page(a.id, sorted(gids)[-1], 10) == [s for s in seen if s.id > sorted(gids)[-1]]
    assert {s.id for s in await store.channels_page(a.id, None, 100)} == {s.id for s in await store.channels_of(a.id)}


async def test_removing_everyone_leaves_the_group(store):
    a, b = await users(store, 2)
    gid = await group(store, a, [b])
    assert await store.remove_member(gid, a.id) is True
    assert await store.remove_member(gid, b.id) is True
    assert await store.members(gid) == []
    assert (await store.get_channel(gid)).id == gid
    assert await store.add_member(gid, b.id, 100, 9.0) is True
    assert await store.members(gid) == [b.id]


async def test_rejoining_resets_the_read_cursor(store):
    a, b = await users(store, 2)
    gid = await group(store, a, [b])
    await send(store, gid, a, 3)
    assert await store.set_read(gid, b.id, 3) == 3
    assert await store.remove_member(gid, b.id) is True
    assert await store.add_member(gid, b.id, 100, 50.0) is True
    (summary,) = await store.channels_of(b.id)
    assert (summary.last_seq, summary.read_seq, summary.unread) == (3, 0, 3)
    assert await store.set_read(gid, b.id, 2) == 2


async def test_channels_of_is_current_while_the_head_hint_lags(backend):
    """On Cassandra the head hint (``channel_heads``) is written after the ack, in the store's
    background: until it lands, ``channels_of`` reports the head this process appended *and that
    message's created_at* (it once gave the head's seq with the previous message's time: a
    fresh-clone CI run of test_channels_of_order_and_unread). The hint writes are held back here
    until the end, on the real server; SQLite has no hint and must give the same answer."""
    async with backend.open() as store:
        release = trio.Event()
        if backend.name == "cassandra":
            write = store._cql.write

            async def held_write(name, params):
                if name == "head_set":
                    await release.wait()
                await write(name, params)
            store._cql.write = held_write
        try:
            a, b = await users(store, 2)
            g = await group(store, a, [b], created_at=10.0)
            await store.append_message(g, b.id, "x1", "hi", 30.0)
            await store.append_message(g, b.id, "x2", "there", 31.0)
            (summary,) = await store.channels_of(a.id)
            assert (summary.last_seq, summary.last_at) == (2, 31.0)
        finally:
            release.set()


async def test_channels_of_order_and_unread(store):
    a, b = await users(store, 2)
    g1 = await group(store, a, [b], created_at=10.0)
    g2 = await group(store, a, [b], created_at=20.0)
    assert await store.channels_of(a.id) == [ChannelSummary(g2, "group", "team", 0, 0, 20.0),
                                             ChannelSummary(g1, "group", "team", 0, 0, 10.0)]
    await store.append_message(g1, b.id, "x1", "hi", 30.0)
    await store.append_message(g1, b.id, "x2", "there", 31.0)
    assert await store.channels_of(a.id) == [ChannelSummary(g1, "group", "team", 2, 0, 31.0),
                                             ChannelSummary(g2, "group", "team", 0, 0, 20.0)]
    assert await store.set_read(g1, a.id, 1) == 1
    dm = dm_channel_id(a.id, b.id)
    await store.append_message(dm, a.id, "d1", "psst", 40.0, dm_pair=tuple(sorted((a.id, b.id))))
    mine = await store.channels_of(a.id)
    assert mine == [ChannelSummary(dm, "dm", "", 1, 0, 40.0),
                    ChannelSummary(g1, "group", "team", 2, 1, 31.0),
                    ChannelSummary(g2, "group", "team", 0, 0, 20.0)]
    assert [s.unread for s in mine] == [1, 1, 0]
    assert [s.id for s in await store.channels_of(b.id)] == [dm, g1, g2]


async def test_channels_of_ties_are_ordered_by_id(store):
    (a,) = await users(store, 1)
    ids = [await group(store, a, created_at=7.0) for _ in range(4)]
    assert [s.id for s in await store.channels_of(a.id)] == sorted(ids)


# ---- messages -------------------------------------------------------------------------------------
async def test_append_is_gap_free(store):
    a, b = await users(store, 2)
    gid = await group(store, a, [b])
    results = []
    for i in range(12):
        sender = (a, b)[i % 2]
        results.append(await store.append_message(gid, sender.id, f"c{i}", f"body {i}", 100.0 + i))
    assert [r.duplicate for r in results] == [False] * 12
    assert [fields(r.message) for r in results] == [
        (gid, i + 1, (a, b)[i % 2].id, f"c{i}", f"body {i}", 100.0 + i) for i in range(12)]
    assert await store.head_seq(gid) == 12
    assert (await store.get_channel(gid)).last_seq == 12
    stored = await store.read_messages(gid, after=0, limit=100)
    assert [fields(m) for m in stored] == [fields(r.message) for r in results]


async def test_submitted_appends_keep_the_callers_order_and_answer_once(store, backend):
    """``submit_append`` (the task-free send path) on the backends that queue without a task:
    seqs in the order submitted, a resend in the same burst answered as the duplicate, each
    callback once; what the stores without it answer (False) is that they queued nothing."""
    a, b = await users(store, 2)
    gid = await group(store, a, [b])
    answers: dict[int, list] = {}  # submit number -> its callbacks' arguments
    done = trio.Event()
    cmids = [f"c{i}" for i in range(20)] + ["c3"]  # the resend of c3 rides in the same burst

    def callback_for(i):
        def answered(result, error):
            answers.setdefault(i, []).append((result, error))
            if sum(len(v) for v in answers.values()) == len(cmids):
                done.set()
        return answered
    taken = [store.submit_append(gid, a.id, c, f"body {c}", 100.0 + i, None, callback_for(i))
             for i, c in enumerate(cmids)]
    if backend.name in ("sqlite", "cassandra", "cassandra_emulated_bg"):
        assert taken == [True] * len(cmids)
    if not any(taken):
        assert await store.head_seq(gid) == 0
        return
    with trio.fail_after(30):
        await done.wait()
    assert sorted(answers) == list(range(len(cmids))) and all(len(v) == 1 for v in answers.values()), answers
    results = [answers[i][0] for i in range(len(cmids))]
    assert all(error is None for _, error in results), results
    assert [r.message.seq for r, _ in results[:20]] == list(range(1, 21))
    assert [r.duplicate for r, _ in results] == [False] * 20 + [True]
    assert fields(results[20][0].message) == fields(results[3][0].message)  # the original, body and all
    assert await store.head_seq(gid) == 20
    stored = await store.read_messages(gid, after=0, limit=100)
    assert [m.client_msg_id for m in stored] == cmids[:20]


async def test_append_deduplicates_client_msg_id(store):
    a, b = await users(store, 2)
    gid = await group(store, a, [b])
    other = await group(store, a, [b])
    first = await store.append_message(gid, a.id, "c1", "hello", 100.0)
    again = await store.append_message(gid, a.id, "c1", "a different body", 200.0)
    assert again.duplicate is True
    assert fields(again.message) == fields(first.message) == (gid, 1, a.id, "c1", "hello", 100.0)
    assert await store.head_seq(gid) == 1
    assert [fields(m) for m in await store.read_messages(gid, after=0, limit=10)] == [fields(first.message)]
    # the key is (channel, sender, client_msg_id)
    by_b = await store.append_message(gid, b.id, "c1", "from b", 101.0)
    assert (by_b.duplicate, by_b.message.seq) == (False, 2)
    elsewhere = await store.append_message(other, a.id, "c1", "other channel", 102.0)
    assert (elsewhere.duplicate, elsewhere.message.seq) == (False, 1)
    nxt = await store.append_message(gid, a.id, "c2", "next", 103.0)
    assert (nxt.duplicate, nxt.message.seq) == (False, 3)


async def test_first_dm_message_creates_the_channel(store):
    a, b = await users(store, 2)
    pair = tuple(sorted((a.id, b.id)))
    dm = dm_channel_id(a.id, b.id)
    assert await store.get_channel(dm) is None
    assert await store.members(dm) == []
    r1 = await store.append_message(dm, b.id, "m1", "hi", 50.0, dm_pair=pair)
    assert fields(r1.message) == (dm, 1, b.id, "m1", "hi", 50.0)
    assert await store.get_channel(dm) == Channel(dm, "dm", "", None, 50.0, 1)
    assert await store.members(dm) == list(pair)
    assert await store.channels_of(a.id) == [ChannelSummary(dm, "dm", "", 1, 0, 50.0)]
    r2 = await store.append_message(dm, a.id, "m2", "hey", 51.0, dm_pair=pair)
    assert (r2.duplicate, r2.message.seq) == (False, 2)
    assert await store.members(dm) == list(pair)
    assert await store.channels_of(b.id) == [ChannelSummary(dm, "dm", "", 2, 0, 51.0)]


async def test_unknown_channels(store):
    a, b = await users(store, 2)
    gid = new_group_id()
    await expect_error("no_such_channel", store.append_message(gid, a.id, "c", "x", 1.0))
    await expect_error("no_such_channel", store.append_message(dm_channel_id(a.id, b.id), a.id, "c", "x", 1.0))
    assert await store.get_channel(gid) is None
    assert await store.get_channel(dm_channel_id(a.id, b.id)) is None
    assert await store.head_seq(gid) == 0
    assert await store.read_messages(gid, after=0, limit=10) == []
    assert await store.read_messages(gid, limit=10) == []


async def test_concurrent_appends_to_one_channel(store):
    a, b = await users(store, 2)
    gid = await group(store, a, [b])
    results = []

    async def one(i):
        sender = (a, b)[i % 2]
        results.append(await store.append_message(gid, sender.id, f"c{i}", f"body {i}", 10.0 + i))

    async with trio.open_nursery() as nursery:
        for i in range(40):
            nursery.start_soon(one, i)
    assert sorted(r.message.seq for r in results) == list(range(1, 41))
    assert not any(r.duplicate for r in results)
    stored = await store.read_messages(gid, after=0, limit=100)
    assert [m.seq for m in stored] == list(range(1, 41))
    assert sorted(m.client_msg_id for m in stored) == sorted(f"c{i}" for i in range(40))
    assert {m.seq: fields(m) for m in stored} == {r.message.seq: fields(r.message) for r in results}
    assert await store.head_seq(gid) == 40


async def test_concurrent_resends_store_one_message(store):
    (a,) = await users(store, 1)
    gid = await group(store, a)
    results = []

    async def one(i):
        results.append(await store.append_message(gid, a.id, "same", f"try {i}", 10.0 + i))

    async with trio.open_nursery() as nursery:
        for i in range(15):
            nursery.start_soon(one, i)
    assert sorted(r.duplicate for r in results) == [False] + [True] * 14
    assert {fields(r.message) for r in results} == {fields(next(r for r in results if not r.duplicate).message)}
    assert await store.head_seq(gid) == 1
    assert len(await store.read_messages(gid, after=0, limit=10)) == 1


async def test_two_owners_never_reuse_a_seq(backend, store):
    """A second store on the same data (a new owner taking over while the old one still runs)."""
    a, b = await users(store, 2)
    gid = await group(store, a, [b])
    async with backend.open() as other:
        assert [r.message.seq for r in await send(store, gid, a, 3, prefix="old")] == [1, 2, 3]
        assert await other.head_seq(gid) == 3
        assert (await other.append_message(gid, b.id, "new0", "n", 50.0)).message.seq == 4
        assert (await store.append_message(gid, a.id, "old3", "o", 51.0)).message.seq == 5  # stale head
        assert (await other.append_message(gid, b.id, "new1", "n", 52.0)).message.seq == 6
        # a resend reaching the other owner is still a duplicate
        again = await other.append_message(gid, a.id, "old0", "again", 53.0)
        assert (again.duplicate, again.message.seq) == (True, 1)
        results = []

        async def one(s, sender, i):
            results.append(await s.append_message(gid, sender.id, f"race{i}", "r", 60.0 + i))

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, (store, other)[i % 2], (a, b)[i % 2], i)
        assert sorted(r.message.seq for r in results) == list(range(7, 27))
        assert await store.head_seq(gid) == await other.head_seq(gid) == 26
    stored = await store.read_messages(gid, after=0, limit=100)
    assert [m.seq for m in stored] == list(range(1, 27))
    assert len({m.client_msg_id for m in stored}) == 26


async def test_read_messages_windows(store):
    (a,) = await users(store, 1)
    gid = await group(store, a)
    await send(store, gid, a, 10)

    async def seqs(**kw):
        return [m.seq for m in await store.read_messages(gid, **kw)]

    assert await seqs(after=0, limit=3) == [1, 2, 3]
    assert await seqs(after=2, limit=5) == [3, 4, 5, 6, 7]
    assert await seqs(after=3, limit=100) == [4, 5, 6, 7, 8, 9, 10]
    assert await seqs(after=3, before=9, limit=100) == [4, 5, 6, 7, 8]
    assert await seqs(after=3, before=9, limit=2) == [4, 5]
    assert await seqs(after=7, before=8, limit=10) == []
    assert await seqs(after=9, limit=10) == [10]
    assert await seqs(after=10, limit=10) == []
    assert await seqs(after=1000, limit=10) == []
    assert await seqs(after=-5, limit=2) == [1, 2]
    assert await seqs(limit=3) == [8, 9, 10]
    assert await seqs(limit=100) == list(range(1, 11))
    assert await seqs(before=6, limit=3) == [3, 4, 5]
    assert await seqs(before=5, limit=4) == [1, 2, 3, 4]
    assert await seqs(before=3, limit=10) == [1, 2]
    assert await seqs(before=1, limit=10) == []
    assert await seqs(before=1000, limit=3) == [8, 9, 10]
    page = await store.read_messages(gid, after=4, limit=1)
    assert [fields(m) for m in page] == [(gid, 5, a.id, "m4", "body 4", 3004.0)]


async def test_head_seq(store):
    (a,) = await users(store, 1)
    gid = await group(store, a)
    assert await store.head_seq(gid) == 0
    for n in range(1, 10):
        await store.append_message(gid, a.id, f"c{n}", "x", float(n))
        assert await store.head_seq(gid) == n


async def test_set_read(store):
    a, b, c = await users(store, 3)
    gid = await group(store, a, [b])
    assert await store.set_read(gid, b.id, 5) == 0  # nothing to read yet
    await send(store, gid, a, 5)
    assert await store.set_read(gid, b.id, 3) == 3
    assert await store.set_read(gid, b.id, 2) == 3  # never lowered
    assert await store.set_read(gid, b.id, 99) == 5  # capped at the head
    assert await store.set_read(gid, b.id, -1) == 5
    summary = {s.id: s for s in await store.channels_of(b.id)}[gid]
    assert (summary.last_seq, summary.read_seq, summary.unread) == (5, 5, 0)
    assert {s.id: s for s in await store.channels_of(a.id)}[gid].read_seq == 0
    await expect_error("not_member", store.set_read(gid, c.id, 1))
    await expect_error("not_member", store.set_read(new_group_id(), a.id, 1))


async def test_concurrent_set_read_keeps_the_highest(store):
    a, b = await users(store, 2)
    gid = await group(store, a, [b])
    await send(store, gid, a, 20)
    async with trio.open_nursery() as nursery:
        for seq in [5, 17, 3, 20, 11, 19, 1]:
            nursery.start_soon(store.set_read, gid, b.id, seq)
    assert await store.set_read(gid, b.id, 0) == 20


async def test_concurrent_adds_respect_the_member_cap(store):
    owner, *others = await users(store, 9)
    gid = await group(store, owner, max_members=5)
    outcomes: dict[int, list] = {u.id: [] for u in others}

    async def join(u):
        try:
            outcomes[u.id].append(await store.add_member(gid, u.id, 5, 9.0))
        except ChatError as e:
            outcomes[u.id].append(e.code)

    async with trio.open_nursery() as nursery:
        for u in others + others[:3]:  # three of them try twice
            nursery.start_soon(join, u)
    members = await store.members(gid)
    assert len(members) == 5 and owner.id in members
    for u in others:
        if u.id in members:  # joined exactly once; a second try saw it joined or the group full
            assert outcomes[u.id].count(True) == 1
            assert set(outcomes[u.id]) <= {True, False, "group_full"}
        else:
            assert set(outcomes[u.id]) == {"group_full"}


async def test_last_active_is_monotonic(store):
    a = await store.create_user("presence-a", "h", "", 1.0)
    b = await store.create_user("presence-b", "h", "", 1.0)
    assert await store.get_last_active([a.id, b.id]) == {}
    await store.set_last_active(a.id, 100.5)
    await store.set_last_active(a.id, 50.0)  # a late, older report never moves it back
    await store.set_last_active(b.id, 7.25)
    assert await store.get_last_active([a.id, b.id, a.id, 999_999]) == {a.id: 100.5, b.id: 7.25}
    await store.set_last_active(a.id, 200.0)
    assert await store.get_last_active([a.id]) == {a.id: 200.0}


# ---- push notifications ---------------------------------------------------------------------------
def token_of(user, device, token, provider="fcm", app_id="com.example.chat", at=10.0):
    return PushToken(user.id, device, provider, token, app_id, at)


async def test_push_token_holder_names_whoever_holds_it(store):
    a, b = await users(store, 2)
    t = uniq("tok")
    assert await store.push_token_holder(t) is None
    await store.add_push_token(token_of(a, "phone", t))
    assert await store.push_token_holder(t) == token_of(a, "phone", t)
    await store.add_push_token(token_of(b, "other-phone", t, at=11.0))
    assert await store.push_token_holder(t) == token_of(b, "other-phone", t, at=11.0)
    assert await store.remove_push_token(b.id, t) is True
    assert await store.push_token_holder(t) is None


async def test_push_tokens_register_list_remove(store):
    a, b = await users(store, 2)
    t1, t2, t3 = uniq("tok1"), uniq("tok2"), uniq("tok3")
    assert await store.push_tokens(a.id) == []
    await store.add_push_token(token_of(a, "phone", t1))
    await store.add_push_token(token_of(a, "tablet", t2, provider="apns", app_id="com.example.ios"))
    assert await store.push_tokens(a.id) == sorted([token_of(a, "phone", t1),
                                                    token_of(a, "tablet", t2, "apns", "com.example.ios")],
                                                   key=lambda t: t.token)
    # registering again replaces the row
    await store.add_push_token(token_of(a, "phone", t1, app_id="other", at=11.0))
    assert token_of(a, "phone", t1, app_id="other", at=11.0) in await store.push_tokens(a.id)
    assert len(await store.push_tokens(a.id)) == 2
    # a device has one token: a new one replaces the device's old one
    await store.add_push_token(token_of(a, "phone", t3))
    assert sorted(t.token for t in await store.push_tokens(a.id)) == sorted([t2, t3])
    # a token names one device: registered by another user, it moves
    await store.add_push_token(token_of(b, "b-phone", t2))
    assert [t.token for t in await store.push_tokens(a.id)] == [t3]
    assert await store.push_tokens(b.id) == [token_of(b, "b-phone", t2)]
    # only the holder removes it
    assert await store.remove_push_token(a.id, t2) is False
    assert await store.push_tokens(b.id) == [token_of(b, "b-phone", t2)]
    assert await store.remove_push_token(b.id, t2) is True
    assert await store.remove_push_token(b.id, t2) is False
    assert await store.push_tokens(b.id) == []
    assert await store.remove_push_token(a.id, t3) is True
    assert await store.push_tokens(a.id) == []


async def test_push_outbox(store):
    a, b = await users(store, 2)
    ch1, ch2 = new_group_id(), new_group_id()

    def entry(u, ch, seq, at=100.0):
        return PushEntry(u.id, ch, seq, 7, f"body {seq}", at)

    async def mine(user, limit=1000):
        return [e for e in await store.pending_pushes(push_slot(user.id), limit) if e.user_id == user.id]

    await store.enqueue_pushes([entry(a, ch2, 2), entry(a, ch1, 5), entry(a, ch1, 3), entry(b, ch1, 3)])
    await store.enqueue_pushes([entry(a, ch1, 3, at=200.0)])  # the same (user, channel, seq): one row
    await store.enqueue_pushes([])
    expected_a = sorted([entry(a, ch2, 2), entry(a, ch1, 5), entry(a, ch1, 3)],
                        key=lambda e: (e.channel_id, e.seq))
    assert [(e.user_id, e.channel_id, e.seq, e.sender_id, e.body) for e in await mine(a)] == \
        [(e.user_id, e.channel_id, e.seq, e.sender_id, e.body) for e in expected_a]
    assert [e.seq for e in await mine(b)] == [3]
    if push_slot(a.id) != push_slot(b.id):
        assert [e.user_id for e in await store.pending_pushes(push_slot(a.id), 1000)].count(b.id) == 0
    assert len(await store.pending_pushes(push_slot(a.id), 2)) == 2

    await store.delete_pushes(a.id, ch1, 3)
    assert [(e.channel_id, e.seq) for e in await mine(a)] == sorted([(ch1, 5), (ch2, 2)])
    await store.delete_pushes(a.id, ch1, 99)
    assert [(e.channel_id, e.seq) for e in await mine(a)] == [(ch2, 2)]
    assert [e.seq for e in await mine(b)] == [3]  # other users keep theirs
    await store.delete_pushes(a.id, ch2, 1)
    assert [(e.channel_id, e.seq) for e in await mine(a)] == [(ch2, 2)]


async def test_push_marks_only_rise(store):
    (a,) = await users(store, 1)
    ch, t1, t2 = new_group_id(), uniq("t1"), uniq("t2")
    assert await store.push_marks(a.id, ch) == {}
    await store.set_push_mark(a.id, ch, t1, 5)
    await store.set_push_mark(a.id, ch, t1, 3)
    await store.set_push_mark(a.id, ch, t2, 1)
    assert await store.push_marks(a.id, ch) == {t1: 5, t2: 1}
    await store.set_push_mark(a.id, ch, t1, 9)
    assert await store.push_marks(a.id, ch) == {t1: 9, t2: 1}
    assert await store.push_marks(a.id, new_group_id()) == {}


async def test_push_slot_leases(store):
    one, two = uniq("owner-a"), uniq("owner-b")
    assert await store.claim_push_slots(one, [], 10.0, 100.0) == []
    assert await store.claim_push_slots(one, [1, 2], 10.0, 100.0) == [1, 2]
    assert await store.claim_push_slots(two, [2, 3], 10.0, 105.0) == [3]  # 2 is held until 110
    assert await store.claim_push_slots(one, [1, 2], 10.0, 108.0) == [1, 2]  # renewed until 118
    assert await store.claim_push_slots(two, [2], 10.0, 117.0) == []
    assert await store.claim_push_slots(two, [2], 10.0, 119.0) == [2]  # expired: taken over
    assert await store.claim_push_slots(one, [1, 2], 10.0, 120.0) == [1]
    await store.release_push_slots(two, [2, 1])  # 1 is not two's: untouched
    assert await store.claim_push_slots(one, [1, 2], 10.0, 121.0) == [1, 2]
    assert await store.claim_push_slots(two, [1, 2, 3], 10.0, 122.0) == [3]


# ---- token revocation (logout) ----------------------------------------------------------------------
async def test_revoked_tokens(store):
    import time
    (a,) = await users(store, 1)
    k1, k2, old = uniq("key1"), uniq("key2"), uniq("old")
    assert not await store.token_revoked(k1)
    await store.revoke_token(k1, a.id, "phone", time.time() + 3600)
    await store.revoke_token(k1, a.id, "phone", time.time() + 3600)  # again: harmless
    assert await store.token_revoked(k1)
    assert not await store.token_revoked(k2)  # one token, not the device or the user
    # a record may be forgotten once its token has expired (it is refused as expired anyway)
    await store.revoke_token(old, a.id, "phone", time.time() - 3600)
    await store.revoke_token(k2, a.id, "tablet", time.time() + 3600)
    assert await store.token_revoked(k2) and await store.token_revoked(k1)


async def test_cutoffs_revoke_what_was_issued_before_them(store):
    (a, b) = await users(store, 2)
    key, until = uniq("key"), time.time() + 3600
    assert not await store.token_revoked(key, a.id, "phone", 100.0)
    await store.revoke_before(a.id, "phone", 100.5, until)
    assert await store.token_revoked(key, a.id, "phone", 100.0)  # issued before: revoked
    assert await store.token_revoked(key, a.id, "phone", 0.0)  # no iat: older than any cut-off
    assert not await store.token_revoked(key, a.id, "phone", 100.5)  # issued at the cut-off: not
    assert not await store.token_revoked(key, a.id, "tablet", 100.0)  # another device
    assert not await store.token_revoked(key, b.id, "phone", 100.0)  # another user
    assert not await store.token_revoked(key)  # the key alone was never revoked
    await store.revoke_before(a.id, "phone", 50.0, until)  # an earlier cut-off never lowers it
    assert await store.token_revoked(key, a.id, "phone", 99.0)
    await store.revoke_before(a.id, None, 200.0, until)  # every device of the user
    for device in ("phone", "tablet", "laptop"):
        assert await store.token_revoked(key, a.id, device, 150.0)
        assert not await store.token_revoked(key, a.id, device, 200.0)
    assert not await store.token_revoked(key, b.id, "tablet", 150.0)
    await store.revoke_token(key, a.id, "phone", until)  # by key, whatever the issue time
    assert await store.token_revoked(key, a.id, "phone", 1e12) and await store.token_revoked(key)


async def test_devices_are_listed_from_login_to_logout(store):
    a, b = await users(store, 2)
    phone, tablet, until = uniq("phone"), uniq("tablet"), time.time() + 3600
    assert await store.devices_of(a.id) == []
    await store.add_device(a.id, phone, 10.0)
    await store.add_device(a.id, tablet, 11.0)
    await store.add_device(a.id, phone, 12.0)  # a later login of the phone
    await store.add_device(b.id, phone, 13.0)  # not b's: changes nothing
    assert await store.devices_of(a.id) == sorted([Device(phone, 10.0, 12.0), Device(tablet, 11.0, 11.0)],
                                                  key=lambda d: d.id)
    assert await store.devices_of(b.id) == []
    await store.revoke_before(a.id, phone, 20.0, until)  # the phone logged out
    assert await store.devices_of(a.id) == [Device(tablet, 11.0, 11.0)]
    await store.add_device(a.id, phone, 21.0)  # and in again: first login kept
    assert await store.devices_of(a.id) == sorted([Device(phone, 10.0, 21.0), Device(tablet, 11.0, 11.0)],
                                                  key=lambda d: d.id)
    await store.revoke_before(a.id, None, 30.0, until)  # every device
    assert await store.devices_of(a.id) == []
    await store.add_device(a.id, tablet, 31.0)
    assert await store.devices_of(a.id) == [Device(tablet, 11.0, 31.0)]
    assert await store.device_owner(phone) == a.id  # a logged-out device keeps its owner


# ---- invites ------------------------------------------------------------------------------------
async def test_invite_uses_are_counted(store):
    until = time.time() + 3600
    once, thrice = uniq("inv"), uniq("inv")
    assert await store.use_invite(once, 1, until)
    assert not await store.use_invite(once, 1, until)
    assert [await store.use_invite(thrice, 3, until) for _ in range(4)] == [True, True, True, False]
    assert await store.use_invite(uniq("inv"), 2, until)  # counted per invite


async def test_concurrent_uses_never_share_the_last_use(store):
    invite, until = uniq("inv"), time.time() + 3600
    results = []

    async def use():
        results.append(await store.use_invite(invite, 3, until))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(use)
    assert sorted(results) == [False] * 7 + [True] * 3


# ---- operators (chatd admin) --------------------------------------------------------------------
async def test_disable_and_enable_a_user(store):
    u = await store.create_user("dis-" + secrets.token_hex(4), "h", "", 1.0)
    assert not (await store.get_user(u.id)).disabled
    assert await store.set_user_disabled(u.id, True)
    assert (await store.get_user(u.id)).disabled and (await store.get_user_by_name(u.username)).disabled
    assert await store.set_user_disabled(u.id, False)
    assert not (await store.get_users([u.id]))[u.id].disabled
    assert not await store.set_user_disabled(NO_SUCH_ID, True)


async def test_rename_user_frees_the_old_name(store):
    tag = secrets.token_hex(4)
    u = await store.create_user("old-" + tag, "h", "", 1.0)
    other = await store.create_user("other-" + tag, "h", "", 1.0)
    with pytest.raises(ChatError) as e:
        await store.rename_user(u.id, "OTHER-" + tag)
    assert e.value.code == "username_taken"
    renamed = await store.rename_user(u.id, "new-" + tag)
    assert (renamed.id, renamed.username, renamed.password_hash) == (u.id, "new-" + tag, "h")
    assert (await store.get_user_by_name("NEW-" + tag)).id == u.id
    assert await store.get_user_by_name("old-" + tag) is None
    again = await store.create_user("old-" + tag, "h2", "", 2.0)  # the old name is free
    assert again.id not in (u.id, other.id)
    with pytest.raises(ChatError) as e:
        await store.rename_user(NO_SUCH_ID, "x-" + tag)
    assert e.value.code == "no_such_user"


async def test_set_owner_of_a_group(store):
    a = await store.create_user("own-a-" + secrets.token_hex(4), "h", "", 1.0)
    b = await store.create_user("own-b-" + secrets.token_hex(4), "h", "", 1.0)
    g = new_group_id()
    await store.create_group(g, "g", a.id, [b.id], 1.0, 10)
    await store.set_owner(g, b.id)
    assert (await store.get_channel(g)).owner_id == b.id
    with pytest.raises(ChatError) as e:
        await store.set_owner(new_group_id(), b.id)
    assert e.value.code == "no_such_channel"


async def test_expire_messages_keeps_one_gap_free_range_and_the_sequence(store):
    """Retention: the oldest messages go (across buckets), what is kept reads as one range up to the
    head, and the channel goes on with head + 1, also once every message expired."""
    a = await store.create_user("ret-" + secrets.token_hex(4), "h", "", 1.0)
    g = new_group_id()
    await store.create_group(g, "g", a.id, [], 1.0, 10)
    for i in range(1, 11):
        await store.append_message(g, a.id, f"r{i}", f"m{i}", 100.0 + i)
    assert await store.expire_messages(g, 106.5) == 6  # created_at 101..106
    assert [m.seq for m in await store.read_messages(g, after=0, limit=100)] == [7, 8, 9, 10]
    assert [m.seq for m in await store.read_messages(g, after=2, limit=2)] == [7, 8]
    assert [m.seq for m in await store.read_messages(g, limit=100)] == [7, 8, 9, 10]
    assert [m.seq for m in await store.read_messages(g, before=9, limit=100)] == [7, 8]
    assert await store.read_messages(g, before=7, limit=100) == []
    assert await store.head_seq(g) == 10
    assert await store.expire_messages(g, 106.5) == 0  # nothing more is that old
    assert (await store.append_message(g, a.id, "r11", "m11", 200.0)).message.seq == 11
    assert await store.expire_messages(g, 1000.0) == 5
    assert await store.read_messages(g, after=0, limit=100) == [] and await store.head_seq(g) == 11
    assert (await store.append_message(g, a.id, "r12", "m12", 300.0)).message.seq == 12
    assert [m.seq for m in await store.read_messages(g, after=0, limit=100)] == [12]
    assert [m.seq for m in await store.read_messages(g, limit=100)] == [12]


# ---- media (chatd/media) ----------------------------------------------------------------------------
def media_record(owner, created_at, size=100, **info):
    from chatd.store.base import MediaRecord
    return MediaRecord(secrets.token_urlsafe(16), owner.id, created_at, size,
                       {"kind": "file", "mime": "application/octet-stream", "name": "a.bin", "sha256": "0" * 64,
                        "key": "k", "thumbnails": [], **info})


async def test_media_records_round_trip_and_usage(store):
    (a, b) = await users(store, 2)
    now = time.time()
    r1 = media_record(a, now - 10, 100, width=3)
    r2 = media_record(a, now - 5, 50)
    old = media_record(a, now - 7200, 1000)
    for r in (r1, r2, old):
        await store.add_media(r)
    got = await store.get_media([r1.id, r2.id, "nope"])
    assert set(got) == {r1.id, r2.id} and got[r1.id] == r1 and got[r1.id].info["width"] == 3
    assert await store.media_usage(a.id, now - 3600) == (2, 150)
    assert await store.media_usage(b.id, now - 3600) == (0, 0)


async def test_media_references_orphans_and_delete(store):
    (a,) = await users(store, 1)
    now = time.time()
    attached, orphan, young = media_record(a, now - 100), media_record(a, now - 100), media_record(a, now)
    for r in (attached, orphan, young):
        await store.add_media(r)
    ch = dm_channel_id(a.id, a.id + 1)
    assert await store.media_channels(attached.id) == []
    await store.add_media_refs([attached.id], ch, f"{a.id}:m1")
    await store.add_media_refs([attached.id], ch, f"{a.id}:m1")  # idempotent
    await store.add_media_refs([attached.id], "g:0123456789abcdef", f"{a.id}:m2")
    assert sorted(await store.media_channels(attached.id)) == sorted([ch, "g:0123456789abcdef"])
    orphans = [r.id for r in await store.orphan_media(now - 50, 100)]
    assert orphan.id in orphans and attached.id not in orphans and young.id not in orphans
    # releasing one of two references leaves it referenced; the second frees it
    assert await store.remove_media_refs([attached.id], ch, f"{a.id}:m1") == []
    assert await store.remove_media_refs([attached.id], "g:0123456789abcdef", f"{a.id}:m2") == [attached.id]
    await store.delete_media(orphan.id)
    assert await store.get_media([orphan.id]) == {}
    assert orphan.id not in [r.id for r in await store.orphan_media(now - 50, 100)]


async def test_message_attachments_are_stored_and_read_back(store):
    (a, b) = await users(store, 2)
    ch = dm_channel_id(a.id, b.id)
    att = '[{"id":"x","kind":"image"}]'
    r = await store.append_message(ch, a.id, "with-att", "", 5000.0, dm_pair=(a.id, b.id), attachments=att)
    plain = await store.append_message(ch, a.id, "plain", "text", 5001.0, dm_pair=(a.id, b.id))
    assert r.message.attachments == att and plain.message.attachments == ""
    again = await store.append_message(ch, a.id, "with-att", "", 5002.0, dm_pair=(a.id, b.id), attachments=att)
    assert again.duplicate and again.message.attachments == att
    msgs = await store.read_messages(ch, after=0, limit=10)
    assert [m.attachments for m in msgs] == [att, ""]
