"""``chatd store backup`` of a live ``chatd run`` (real process, real WebSocket senders writing all the
while) and ``chatd store restore``: the restored store holds every message acked before the backup
began, with each channel's seqs gap-free; restore refuses a store in use, and an existing one
without --force (keeping it beside itself with --force)."""

from __future__ import annotations

import signal
import subprocess
import sys

import trio

from chatd.store.sqlite import open_sqlite
from tests.helpers import ChatdRun, dm, eventually, open_client


def chatd(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chatd.cli", *args], capture_output=True, text=True, timeout=120)


async def test_backup_under_load_restores_every_acked_message_gap_free(tmp_path, nursery):
    (tmp_path / "run").mkdir()
    run = ChatdRun(tmp_path / "run")
    await run.start()
    acked: list[tuple[str, int, str]] = []
    stop = trio.Event()
    try:
        alice = await run.api.signup_login("alice")
        bob = await run.api.signup_login("bob")
        r = await run.api.call("POST", "/v1/groups", {"name": "g", "members": [bob["user"]["id"]]},
                               token=alice["token"])
        group, ab = r.body["channel"]["id"], dm(alice, bob)

        async def sender(creds, channel, name):
            client = await open_client(nursery, creds["ws_url"], creds["token"])
            i = 0
            while not stop.is_set():
                i += 1
                body = f"{name} {i}"
                reply = await client.send_message(channel, body, f"{name}-{i}")
                assert reply["type"] == "ack", reply
                acked.append((channel, reply["seq"], body))
        async with trio.open_nursery() as senders:
            senders.start_soon(sender, alice, ab, "a-dm")
            senders.start_soon(sender, bob, ab, "b-dm")
            senders.start_soon(sender, alice, group, "a-g")
            await eventually(lambda: len(acked) >= 150)
            before = list(acked)  # every ack received before the backup starts
            backup = tmp_path / "backup.db"
            proc = await trio.to_thread.run_sync(lambda: chatd("store", "backup", "--config", str(run.config),
                                                               str(backup)))
            during = len(acked) - len(before)
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.startswith(f"backed up {tmp_path / 'run' / 'data' / 'chatd.db'} to {backup}")
            await eventually(lambda: len(acked) >= len(before) + during + 60)  # writes go on after it
            # the running store cannot be restored over
            busy = await trio.to_thread.run_sync(lambda: chatd("store", "restore", "--config", str(run.config),
                                                               "--force", str(backup)))
            assert busy.returncode == 1 and "is in use by a running process" in busy.stderr, busy
            stop.set()
    finally:
        stop.set()
        run.proc.send_signal(signal.SIGTERM)
        assert await run.wait_exit() == 0

    fresh = tmp_path / "restored.toml"
    fresh.write_text(f'data_dir = "{tmp_path / "restored"}"\n')
    proc = await trio.to_thread.run_sync(lambda: chatd("store", "restore", "--config", str(fresh), str(backup)))
    assert proc.returncode == 0, proc.stderr
    async with open_sqlite(str(tmp_path / "restored" / "chatd.db")) as store:
        stored = {}
        for ch in (ab, group):
            msgs = await store.read_messages(ch, after=0, limit=100_000)
            assert [m.seq for m in msgs] == list(range(1, len(msgs) + 1)), f"{ch}: seqs not gap-free"
            assert await store.head_seq(ch) == len(msgs)
            stored.update({(ch, m.seq): m.body for m in msgs})
    missing = [a for a in before if stored.get(a[:2]) != a[2]]
    assert not missing, f"{len(missing)} messages acked before the backup are not in it: {missing[:5]}"
    assert len(stored) < len(acked)  # (the messages sent after the backup are not in it)

    # restore over the stopped original: refused without --force, kept aside with it
    refused = await trio.to_thread.run_sync(lambda: chatd("store", "restore", "--config", str(run.config), str(backup)))
    assert refused.returncode == 1 and "pass --force" in refused.stderr, refused
    forced = await trio.to_thread.run_sync(lambda: chatd("store", "restore", "--config", str(run.config), "--force",
                                                         str(backup)))
    assert forced.returncode == 0 and "the old store is kept as" in forced.stdout, forced
    kept = forced.stdout.rsplit("kept as ", 1)[1].strip()
    async with open_sqlite(kept) as old:
        assert await old.head_seq(ab) + await old.head_seq(group) == len(acked)  # everything, as it was
