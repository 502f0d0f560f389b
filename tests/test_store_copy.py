"""``chatd store copy`` (and ``--verify``) between real stores: SQLite files and keyspaces on the
session's real Apache Cassandra, through the real CLI (``python -m chatd.cli``, OS processes).

What a copy must keep is checked through the ordinary ``Store`` interface on both sides (users and
their password hashes, devices and sessions, invites, channels, members and read cursors, every
message with its seq and client_msg_id, push tokens, outbox and marks, group departures and
invitations back, the groups a user created within the hour, the message lifecycle folded as a client
reads it (an edit, a delete that erased a message and its edit's text, reactions with who and how
many, a reply's excerpt), receipts, media records, references and attachments), not through the export code
under test. Media objects are copied fs -> fs and, against a real SeaweedFS, fs -> s3 -> fs, then
downloaded through a ``chatd run`` on the copy. The end-to-end test (a ``chatd run`` store -> Cassandra -> a 3-shard cluster with a client
syncing from old cursors) is in tests/test_store_copy_cluster.py."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest
import trio
from PIL import Image

from chatd.config import Config
from chatd.ids import dm_channel_id
from chatd.lifecycle import DELETE, EDIT, MESSAGE, REACT, UNREACT, EventSpec
from chatd.media.s3 import S3Backend
from chatd.store.base import MediaRecord, PushEntry, PushToken, push_slot
from chatd.store.sqlite import open_sqlite
from tests.cassandra_server import fresh_keyspace
from tests.helpers import PASSWORD, RunningServer, eventually

FAR = time.time() + 30 * 24 * 3600

# the media objects of populate's uploads (an image with a thumbnail, a file): key -> bytes
_IMAGE, _THUMB, _FILE = b"\x89PNG fake image " * 5000, b"\x89PNG thumbnail", b"plain file\n"


def _key(media_id: str, data: bytes, ext: str) -> str:
    return f"{media_id}/{hashlib.sha256(data).hexdigest()}.{ext}"


OBJECTS = {_key("media-attached", _IMAGE, "png"): _IMAGE, _key("media-attached", _THUMB, "png"): _THUMB,
           _key("media-orphan", _FILE, "bin"): _FILE}


def write_objects(data_dir) -> None:
    """What the fs media backend of ``data_dir`` holds for populate's uploads."""
    for key, data in OBJECTS.items():
        path = data_dir / "media" / "objects" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def objects_in(data_dir) -> dict:
    root = data_dir / "media" / "objects"
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def chatd(*args, timeout=170) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chatd.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def sqlite_config(tmp_path, name: str):
    path = tmp_path / f"{name}.toml"
    path.write_text(f'data_dir = "{tmp_path / name}"\n')
    return path


def cassandra_config(tmp_path, server, keyspace: str):
    path = tmp_path / f"{keyspace}.toml"
    path.write_text(f'data_dir = "{tmp_path / keyspace}"\n' + server.toml(keyspace))
    return path


async def populate(store, n_group_messages: int = 40) -> dict:
    """A bit of everything a store holds; returns what the snapshot needs to look it up."""
    users = [await store.create_user(f"user{i}", f"scrypt$hash-of-{i}", f"User {i}", 1000.0 + i) for i in range(4)]
    a, b, c, d = (u.id for u in users)
    await store.add_device(a, "dev-a1", 1001.0)
    await store.add_device(a, "dev-a1", 1010.5)  # a later login of the same device
    await store.add_device(a, "dev-a2", 1002.0)
    await store.revoke_before(a, "dev-a2", 1003.0, FAR)  # logged out: no longer listed, its tokens cut off
    await store.add_device(b, "dev-b1", 1004.0)
    await store.revoke_before(c, None, 1005.0, FAR)  # logout-all
    await store.revoke_token("token-key-1", a, "dev-a1", FAR)
    assert await store.use_invite("invite-1", 3, FAR)
    assert await store.use_invite("invite-1", 3, FAR)
    await store.create_group("g-one", "Group one", a, [b, c], 1006.0, 100)
    await store.create_group("g-empty", "", b, [d], time.time() - 60, 100)  # counted by the hourly cap
    ab = dm_channel_id(a, b)
    for i in range(5):
        await store.append_message(ab, a if i % 2 else b, f"dm-{i}", f"dm body {i} ✓", 1100.0 + i, dm_pair=(a, b))
    for i in range(n_group_messages):
        await store.append_message("g-one", [a, b, c][i % 3], f"g-{i}", f"group body {i}", 1200.0 + i)
    await store.set_read(ab, a, 3)
    await store.set_read("g-one", c, 17)
    await store.set_last_active(a, 1300.25)
    await store.add_push_token(PushToken(b, "dev-b1", "fcm", "push-token-b", "app.one", 1301.0))
    await store.enqueue_pushes([PushEntry(b, "g-one", n_group_messages, a, "", 1302.0)])
    await store.set_push_mark(b, "g-one", "push-token-b", 2)
    await store.remove_member("g-one", c, left_at=1250.0)  # left on their own
    await store.remove_member("g-empty", d, left_at=1260.0)
    assert await store.invite_back("g-empty", d, b, 1270.0)  # ... and invited back
    media = await populate_lifecycle_and_media(store, a, b, ab)
    return {"users": [a, b, c, d], "channels": [ab, "g-one", "g-empty"], "names": [u.username for u in users],
            "media": media}


LIFECYCLE_ROWS = 10  # rows populate_lifecycle_and_media adds to the 1:1 channel (after its 5 messages)


async def populate_lifecycle_and_media(store, a: int, b: int, ab: str) -> list[str]:
    """In the 1:1 channel (seqs 1-5: b, a, b, a, b): seq 2 edited, a message with an attachment,
    a reply to seq 2, reactions on seq 4 (one taken back), seq 3 reacted, edited and deleted
    (redacted); receipts of both members; an upload attached (and referenced), an orphan upload."""
    now = time.time()
    image, thumb, file = (_key(m, data, ext) for m, data, ext in (("media-attached", _IMAGE, "png"),
                                                                  ("media-attached", _THUMB, "png"),
                                                                  ("media-orphan", _FILE, "bin")))
    attached = MediaRecord("media-attached", b, now - 60, len(_IMAGE), {
        "kind": "image", "mime": "image/png", "sha256": hashlib.sha256(_IMAGE).hexdigest(), "key": image,
        "thumbnails": [{"px": 320, "width": 3, "height": 2, "mime": "image/png", "size": len(_THUMB),
                        "sha256": hashlib.sha256(_THUMB).hexdigest(), "key": thumb}]})
    orphan = MediaRecord("media-orphan", a, 1000.0, len(_FILE), {"kind": "file", "mime": "text/plain", "key": file,
                                                                  "sha256": hashlib.sha256(_FILE).hexdigest()})
    for r in (attached, orphan):
        await store.add_media(r)
    att = json.dumps([{"id": attached.id, "kind": "image", "mime": "image/png", "size": len(_IMAGE)}])

    async def event(sender, cmid, spec, at):
        r = await store.append_event(ab, sender, cmid, spec, at, dm_pair=(a, b))
        assert not r.duplicate
        return r.message.seq
    assert await event(a, "ev-edit-2", EventSpec(EDIT, target_seq=2, body="dm body 1, edited ✎"), 1110.0) == 6
    sent = await store.append_message(ab, b, "with-attachment", "look", 1111.0, dm_pair=(a, b), attachments=att)
    await store.add_media_refs([attached.id], ab, f"{b}:with-attachment")
    await event(a, "reply-2", EventSpec(MESSAGE, body="a reply", reply_to=2), 1112.0)
    await event(b, "react-4b", EventSpec(REACT, target_seq=4, body="👍"), 1113.0)
    await event(a, "react-4a", EventSpec(REACT, target_seq=4, body="👍"), 1114.0)
    await event(a, "react-4a2", EventSpec(REACT, target_seq=4, body="🎉"), 1115.0)
    await event(a, "unreact-4a2", EventSpec(UNREACT, target_seq=4, body="🎉"), 1116.0)
    await event(a, "react-3", EventSpec(REACT, target_seq=3, body="🔥"), 1117.0)
    await event(b, "ev-edit-3", EventSpec(EDIT, target_seq=3, body="secret edit"), 1118.0)
    assert await event(b, "ev-delete-3", EventSpec(DELETE, target_seq=3), 1119.0) == 5 + LIFECYCLE_ROWS
    assert sent.message.seq == 7
    await store.set_delivered(ab, a, 12)
    await store.set_delivered(ab, b, 15)
    await store.set_read(ab, b, 9)
    return [attached.id, orphan.id]


async def snapshot(store, seen: dict) -> dict:
    """Everything ``populate`` wrote, read back through the Store interface."""
    out: dict = {}
    for uid, name in zip(seen["users"], seen["names"]):
        user = await store.get_user_by_name(name)
        out[f"user {uid}"] = (user.id, user.username, user.password_hash, user.display_name, user.created_at)
        out[f"devices {uid}"] = [(d.id, d.created_at, d.last_login_at) for d in await store.devices_of(uid)]
        out[f"channels {uid}"] = [(s.id, s.kind, s.name, s.last_seq, s.read_seq, s.last_at)
                                  for s in await store.channels_of(uid)]
        out[f"tokens {uid}"] = [t.public() for t in await store.push_tokens(uid)]
        out[f"outbox {uid}"] = [(e.channel_id, e.seq, e.sender_id, e.queued_at)
                                for e in await store.pending_pushes(push_slot(uid), 100) if e.user_id == uid]
        out[f"marks {uid}"] = await store.push_marks(uid, "g-one")
        out[f"invitations {uid}"] = [(i.channel_id, i.left_at, i.invited_by, i.invited_at)
                                     for i in await store.invitations_of(uid, 100)]
        out[f"recent groups {uid}"] = await store.groups_created_since(uid, time.time() - 3600, 100)
    a, b, c, _ = seen["users"]
    out["active"] = await store.get_last_active(seen["users"])
    out["revoked"] = [await store.token_revoked("token-key-1"),
                      await store.token_revoked("other", a, "dev-a2", 1002.5),  # device cut-off
                      await store.token_revoked("other", a, "dev-a1", 1002.5),
                      await store.token_revoked("other", c, "dev-x", 1004.0),  # user cut-off
                      await store.token_revoked("other", b, "dev-b1", 1004.0)]
    for ch in seen["channels"]:
        got = await store.get_channel(ch)
        out[f"channel {ch}"] = (got.kind, got.name, got.owner_id, got.created_at, got.last_seq)
        out[f"members {ch}"] = await store.members(ch)
        out[f"departures {ch}"] = [await store.departure(ch, u) for u in seen["users"]]
        out[f"history {ch}"] = [(m.seq, m.sender_id, m.client_msg_id, m.body, m.created_at, m.kind, m.target_seq,
                                 m.reply_to, m.meta, m.edited_at, m.deleted_by, m.deleted_at, m.state_seq,
                                 m.reactions, m.reply, m.attachments)
                                for m in await store.read_messages(ch, after=0, limit=10_000)]
        out[f"receipts {ch}"] = await store.receipts(ch)
    out["media"] = await store.get_media(seen["media"])
    out["media channels"] = [await store.media_channels(m) for m in seen["media"]]
    out["orphans"] = [r.id for r in await store.orphan_media(time.time(), 100)]
    out["media usage"] = [await store.media_usage(u, time.time() - 3600) for u in seen["users"]]
    return out


def check_lifecycle(snap: dict, seen: dict) -> None:
    """The folded history of the 1:1 channel is what populate_lifecycle_and_media made (so the
    snapshots compared are not vacuous)."""
    a, b = seen["users"][:2]
    history = {m[0]: m for m in snap[f"history {seen['channels'][0]}"]}
    assert len(history) == 5 + LIFECYCLE_ROWS
    assert history[2][3] == "dm body 1, edited ✎" and history[2][9] == 1110.0  # edited
    assert history[3][3] == "" and (history[3][10], history[3][11]) == (b, 1119.0)  # deleted, no text left
    assert history[14][3] == "" and history[13][3] == ""  # the deleted message's edit and reaction redacted
    assert history[3][13] == ()  # ... and its reactions dropped
    assert history[4][13] == (("👍", tuple(sorted((a, b)))),) and history[12][8] == {"count": 0}
    assert history[8][7] == 2 and history[8][14]["excerpt"] == "dm body 1, edited ✎"  # the reply's excerpt
    assert "media-attached" in history[7][15]
    assert snap[f"receipts {seen['channels'][0]}"] == {a: (12, 3), b: (15, 9)}
    assert set(snap["media"]) == set(seen["media"]) and snap["media"]["media-attached"].info["key"] in OBJECTS
    assert snap["media channels"] == [[seen["channels"][0]], []] and snap["orphans"] == ["media-orphan"]
    assert snap["media usage"][1] == (1, len(_IMAGE))


async def invite_uses_left(store) -> int:
    n = 0
    while await store.use_invite("invite-1", 3, FAR):
        n += 1
    return n


def copy_cmd(src, dst, tmp_path, *extra):
    return chatd("store", "copy", "--from", str(src), "--to", str(dst),
                 "--checkpoint", str(tmp_path / f"{src.stem}-to-{dst.stem}.json"), *extra)


async def test_sqlite_to_sqlite_copy_keeps_everything_and_verify_catches_tampering(tmp_path):
    src, dst = sqlite_config(tmp_path, "src"), sqlite_config(tmp_path, "dst")
    async with open_sqlite(str(tmp_path / "src" / "chatd.db")) as store:
        seen = await populate(store)
        before = await snapshot(store, seen)
    check_lifecycle(before, seen)
    write_objects(tmp_path / "src")
    proc = await trio.to_thread.run_sync(lambda: copy_cmd(src, dst, tmp_path, "--verify"))
    assert proc.returncode == 0, proc.stderr
    assert f"verify: ok: 3 channels, {45 + LIFECYCLE_ROWS} messages" in proc.stdout, proc.stdout
    assert "copied 3 media objects" in proc.stdout and objects_in(tmp_path / "dst") == OBJECTS, proc.stdout
    async with open_sqlite(str(tmp_path / "dst" / "chatd.db")) as store:
        assert await snapshot(store, seen) == before

    # A media object lost in the destination: verify names it; copying again (the records are
    # complete, says the checkpoint) copies only that object.
    lost = next(iter(OBJECTS))
    (tmp_path / "dst" / "media" / "objects" / lost).unlink()
    gone = await trio.to_thread.run_sync(lambda: copy_cmd(src, dst, tmp_path, "--verify-only"))
    assert gone.returncode == 1 and f"verify: media object {lost}: missing in fs:" in gone.stderr, gone
    assert "verify failed: 1 difference " in gone.stderr, gone.stderr[-600:]
    again = await trio.to_thread.run_sync(lambda: copy_cmd(src, dst, tmp_path))
    assert again.returncode == 0 and "already complete" in again.stdout, again
    assert "copied 1 media objects" in again.stdout and "2 were there already" in again.stdout, again.stdout
    assert objects_in(tmp_path / "dst") == OBJECTS

    # One message body changed in the copy: verify names the channel and fails.
    db = sqlite3.connect(tmp_path / "dst" / "chatd.db")
    db.execute("UPDATE messages SET body = 'tampered' WHERE channel_id = 'g-one' AND seq = 7")
    db.commit()
    db.close()
    bad = await trio.to_thread.run_sync(lambda: copy_cmd(src, dst, tmp_path, "--verify-only"))
    assert bad.returncode == 1, bad
    assert "channel g-one: 40 messages in the source, 40 in the destination, their contents differ" in bad.stderr
    assert "verify failed: 1 difference " in bad.stderr, bad.stderr[-600:]
    async with open_sqlite(str(tmp_path / "dst" / "chatd.db")) as store:
        assert await invite_uses_left(store) == 1  # 2 of 3 uses were taken before the copy


async def test_a_corrupt_or_missing_media_object_is_named_and_not_copied(tmp_path):
    src, dst = sqlite_config(tmp_path, "src"), sqlite_config(tmp_path, "dst")
    async with open_sqlite(str(tmp_path / "src" / "chatd.db")) as store:
        await populate(store)
    write_objects(tmp_path / "src")
    image, thumb, file = OBJECTS
    (tmp_path / "src" / "media" / "objects" / image).write_bytes(b"not what the record says")
    (tmp_path / "src" / "media" / "objects" / file).unlink()
    proc = await trio.to_thread.run_sync(lambda: copy_cmd(src, dst, tmp_path))
    assert proc.returncode == 1, proc
    assert f"media: object {image}: 24 bytes with SHA-256" in proc.stderr, proc.stderr
    assert f"media: object {file}: missing in the source" in proc.stderr, proc.stderr
    assert "Error: 2 media objects not copied" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert objects_in(tmp_path / "dst") == {thumb: OBJECTS[thumb]}  # the good one is copied, nothing half


async def test_copy_refuses_a_destination_that_is_not_empty(tmp_path):
    src, dst = sqlite_config(tmp_path, "src"), sqlite_config(tmp_path, "dst")
    for name in ("src", "dst"):
        async with open_sqlite(str(tmp_path / name / "chatd.db")) as store:
            await store.create_user(f"someone-{name}", "h", "", 1.0)
    proc = await trio.to_thread.run_sync(lambda: copy_cmd(src, dst, tmp_path))
    assert proc.returncode == 1
    assert "is not empty" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


async def test_copy_sqlite_cassandra_keyspace_sqlite_interrupted_and_resumed(tmp_path, cassandra_server):
    """SQLite -> Cassandra (killed with SIGKILL in the middle of the messages, then resumed) ->
    another keyspace -> SQLite: every step verified, each store reads back the same through the
    Store interface, and the sequences go on after the copy (new seq N+1, a resend deduplicated)."""
    from chatd.store.cassandra import open_cassandra
    from chatd.store.cassandra_schema import drop_keyspace

    src = sqlite_config(tmp_path, "src")
    async with open_sqlite(str(tmp_path / "src" / "chatd.db")) as store:
        seen = await populate(store, n_group_messages=300)
        before = await snapshot(store, seen)
    check_lifecycle(before, seen)
    write_objects(tmp_path / "src")
    a, b, c, d = seen["users"]
    assert before[f"invitations {d}"] == [("g-empty", 1260.0, b, 1270.0)], before
    assert [x and (x.user_id, x.invited_at) for x in before["departures g-one"]] == [None, None, (c, None), None]
    assert len(before[f"recent groups {b}"]) == 1, before
    ks1, ks2 = fresh_keyspace(), fresh_keyspace()
    c1, c2 = cassandra_config(tmp_path, cassandra_server, ks1), cassandra_config(tmp_path, cassandra_server, ks2)
    back = sqlite_config(tmp_path, "back")
    try:
        # a small bucket size: the history spans many partitions, each with its bucket_head
        migrated = await trio.to_thread.run_sync(lambda: chatd("store", "migrate", "--config", str(c1),
                                                               "--bucket-size", "16"))
        assert migrated.returncode == 0, migrated.stderr
        await interrupted_copy(tmp_path, src, c1)
        resumed = await trio.to_thread.run_sync(lambda: copy_cmd(src, c1, tmp_path, "--verify"))
        assert resumed.returncode == 0, resumed.stderr
        assert "(resumed)" in resumed.stdout and f"verify: ok: 3 channels, {305 + LIFECYCLE_ROWS} messages" in resumed.stdout

        async with open_cassandra(cassandra_server.config(ks1)) as store:
            assert store.bucket_size == 16
            assert await snapshot(store, seen) == before
            assert await invite_uses_left(store) == 1

        # keyspace -> keyspace, interrupted too (the source position is the driver's paging state)
        await interrupted_copy(tmp_path, c1, c2)
        for a, b in ((c1, c2), (c2, back)):
            step = await trio.to_thread.run_sync(lambda: copy_cmd(a, b, tmp_path, "--verify"))
            assert step.returncode == 0, step.stderr
            assert f"verify: ok: 3 channels, {305 + LIFECYCLE_ROWS} messages" in step.stdout, step.stdout
        async with open_cassandra(cassandra_server.config(ks2)) as store:
            assert await snapshot(store, seen) == before
            # the sequence goes on where the source stopped; a resend of an old message is found
            new = await store.append_message("g-one", seen["users"][0], "after-copy", "new", 2000.0)
            assert (new.message.seq, new.duplicate) == (301, False)
            old = await store.append_message("g-one", seen["users"][1], "g-1", "group body 1", 2001.0)
            assert (old.message.seq, old.duplicate) == (2, True)
            await events_after_the_copy(store, seen)
        async with open_sqlite(str(tmp_path / "back" / "chatd.db")) as store:
            assert await snapshot(store, seen) == before
        assert objects_in(tmp_path / "back") == OBJECTS  # through both keyspaces' media directories
    finally:
        for ks in (ks1, ks2):
            await drop_keyspace(cassandra_server.config(ks))


async def events_after_the_copy(store, seen) -> None:
    """Events appended to a copied keyspace win over the folds the copy wrote (on Cassandra the
    folds carry USING TIMESTAMP = the event's seq: a copy that wrote them at 'now' would hide every
    later edit, unreaction and delete)."""
    a, b = seen["users"][:2]
    ab = seen["channels"][0]
    n = 5 + LIFECYCLE_ROWS

    async def event(sender, cmid, spec):
        return (await store.append_event(ab, sender, cmid, spec, 3000.0, dm_pair=(a, b))).message.seq
    assert await event(a, "after-edit-2", EventSpec(EDIT, target_seq=2, body="edited after the copy")) == n + 1
    await event(b, "after-unreact-4", EventSpec(UNREACT, target_seq=4, body="👍"))
    await event(b, "after-delete-7", EventSpec(DELETE, target_seq=7))
    history = {m.seq: m for m in await store.read_messages(ab, after=0, limit=100)}
    assert (history[2].body, history[2].edited_at, history[2].state_seq) == ("edited after the copy", 3000.0, n + 1)
    assert history[4].reactions == (("👍", (a,)),)
    assert (history[7].body, history[7].attachments, history[7].deleted_by) == ("", "", b)


async def interrupted_copy(tmp_path, src, dst) -> None:
    """Start a slow copy (10 records a page, 60 a second), SIGKILL it in the middle of the messages,
    and check its checkpoint says so."""
    checkpoint = tmp_path / f"{src.stem}-to-{dst.stem}.json"
    slow = subprocess.Popen([sys.executable, "-m", "chatd.cli", "store", "copy", "--from", str(src), "--to",
                             str(dst), "--checkpoint", str(checkpoint), "--page-rows", "10",
                             "--max-rows-per-s", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        def in_messages():
            if not checkpoint.exists():
                return False
            state = json.loads(checkpoint.read_text())
            return state["kind"] == "messages" and state["rows"]["messages"] >= 30
        await eventually(in_messages, timeout=120)
        slow.send_signal(signal.SIGKILL)
    finally:
        slow.kill()
        slow.wait()
    state = json.loads(checkpoint.read_text())
    assert not state["complete"] and 30 <= state["rows"]["messages"] < 305, state


TAMPERED = {  # how a Cassandra copy is damaged -> what verify must say
    "body": ("UPDATE messages SET body = 'tampered' WHERE channel_id = 'g-one' AND bucket = 0 AND seq = 5",
             "channel g-one: 12 messages in the source, 12 in the destination, their contents differ"),
    "missing": ("DELETE FROM messages WHERE channel_id = 'g-one' AND bucket = 0 AND seq = 5",
                "channel g-one: 12 messages in the source, 11 in the destination"),
    "departure": ("DELETE FROM group_departures WHERE channel_id = 'g-one'",
                  "group_departures: 2 in the source, 1 in the destination"),
    "invitation": ("DELETE FROM invitations_by_user WHERE user_id = {d}",
                   "user {d}: 1 invitations back in the source, 0 in the destination"),
    "reaction": ("DELETE FROM reactions WHERE channel_id = '{ab}' AND bucket = 0 AND seq = 4 AND emoji = '👍' "
                 "AND user_id = {a}", "channel {ab}: 15 messages in the source, 15 in the destination, their "
                                      "contents differ"),
}


@pytest.mark.parametrize("tamper", sorted(TAMPERED))
async def test_verify_catches_a_tampered_cassandra_copy(tmp_path, cassandra_server, tamper):
    from chatd.store.cassandra_schema import drop_keyspace
    from chatd.store.cql import connect, shutdown

    src = sqlite_config(tmp_path, "src")
    async with open_sqlite(str(tmp_path / "src" / "chatd.db")) as store:
        seen = await populate(store, n_group_messages=12)
    write_objects(tmp_path / "src")
    cql, want = (t.format(a=seen["users"][0], d=seen["users"][3], ab=seen["channels"][0]) for t in TAMPERED[tamper])
    ks = fresh_keyspace()
    dst = cassandra_config(tmp_path, cassandra_server, ks)
    try:
        ok = await trio.to_thread.run_sync(lambda: copy_cmd(src, dst, tmp_path, "--verify"))
        assert ok.returncode == 0, ok.stderr
        cluster, session = await connect(cassandra_server.config(ks), ks)
        try:
            await trio.to_thread.run_sync(session.execute, cql)
        finally:
            await shutdown(cluster)
        bad = await trio.to_thread.run_sync(lambda: copy_cmd(src, dst, tmp_path, "--verify-only"))
        assert bad.returncode == 1, bad.stdout
        assert want in bad.stderr, bad.stderr
    finally:
        await drop_keyspace(cassandra_server.config(ks))


# ---- media objects between fs and a real S3 server (SeaweedFS) ------------------------------------
def media_run_config(tmp_path, name: str, media_toml: str = ""):
    """A ``chatd run`` config (loopback, free ports) with its data under ``tmp_path/name``."""
    path = tmp_path / f"{name}.toml"
    path.write_text(f'data_dir = "{tmp_path / name}"\n[server]\napi_port = 0\nws_port = 0\n'
                    f'[auth]\nscrypt_n = 1024\nsignups_unthrottled = ["127.0.0.0/8"]\n{media_toml}')
    return path


async def download_all(config_path, want: dict) -> None:
    """Start ``chatd run`` on ``config_path``; alice downloads every URL of ``want`` (url -> sha256)."""
    async with trio.open_nursery() as nursery:
        srv = await RunningServer(nursery, Config.load(config_path)).start()
        try:
            r = await srv.api.call("POST", "/v1/login", {"username": "alice", "password": PASSWORD})
            async with httpx.AsyncClient(base_url=srv.info.api_url, timeout=60,
                                         headers={"Authorization": f"Bearer {r.body['token']}"}) as http:
                for url, sha256 in want.items():
                    got = await http.get(url)
                    assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == sha256, url
        finally:
            await srv.stop()


async def test_media_objects_copy_fs_to_s3_and_back(tmp_path, s3_server, s3_bucket):
    """``chatd store copy`` from an ``fs`` chatd to one on SeaweedFS and from there to ``fs`` again:
    every object (a photo's served copy and thumbnails, a plain file) arrives sha256-checked, and the
    copy serves it through chatd."""
    src, via_s3, back = (media_run_config(tmp_path, "src"), media_run_config(tmp_path, "s3", s3_server.toml(s3_bucket)),
                         media_run_config(tmp_path, "back"))
    photo = io.BytesIO()
    Image.new("RGB", (1600, 1200), "teal").save(photo, "JPEG")
    want = {}  # url -> sha256 of what chatd served from the source
    keys = []
    async with trio.open_nursery() as nursery:
        srv = await RunningServer(nursery, Config.load(src)).start()
        try:
            alice = await srv.api.signup_login("alice")
            async with httpx.AsyncClient(base_url=srv.info.api_url, timeout=60,
                                         headers={"Authorization": f"Bearer {alice['token']}"}) as http:
                for name, data in (("photo.jpg", photo.getvalue()), ("notes.txt", b"plain notes\n" * 1000)):
                    media = (await http.post("/v1/media", params={"name": name}, content=data)).json()["media"]
                    for url in [media["url"], *(t["url"] for t in media["thumbnails"])]:
                        got = await http.get(url)
                        want[url] = hashlib.sha256(got.content).hexdigest()
                    record = (await srv.node.store.get_media([media["id"]]))[media["id"]]
                    keys += [record.info["key"], *(t["key"] for t in record.info["thumbnails"])]
        finally:
            await srv.stop()
    assert len(want) == 4 == len(keys)  # the photo, its two thumbnails, the file

    proc = await trio.to_thread.run_sync(lambda: copy_cmd(src, via_s3, tmp_path, "--verify"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "copied 4 media objects" in proc.stdout and "verify: ok" in proc.stdout, proc.stdout
    bucket = S3Backend(s3_server.endpoint, s3_bucket, s3_server.region, s3_server.access_key, s3_server.secret_key)
    try:
        for key in keys:  # in the bucket, byte for byte (the key names the sha256 of its bytes)
            data = b"".join([c async for c in bucket.read(key, 0, 1 << 30)])
            assert hashlib.sha256(data).hexdigest() == key.split("/")[1].split(".")[0], key
    finally:
        await bucket.aclose()
    await download_all(via_s3, want)

    proc = await trio.to_thread.run_sync(lambda: copy_cmd(via_s3, back, tmp_path, "--verify"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "copied 4 media objects" in proc.stdout and "verify: ok" in proc.stdout, proc.stdout
    assert sorted(objects_in(tmp_path / "back")) == sorted(keys)
    assert objects_in(tmp_path / "back") == objects_in(tmp_path / "src")
    await download_all(back, want)
