"""``chatd admin`` against real processes: a ``chatd run`` (SQLite), and a 3-shard cluster with an API
server on both store backends (SQLite, real Cassandra), where the effects must reach the shard that
holds the user's connection (revocations close sockets with 4001, a removed member gets nothing
more). Every command prints one line, or one error line and exit status 1."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time

import trio

from tests.cluster import Cluster
from tests.helpers import PASSWORD, ChatdRun, TEST_TOKEN_SECRET, dm, open_client


def admin_cmd(config, *args, api: str | None = None) -> subprocess.CompletedProcess:
    extra = ["--api", api] if api else []
    return subprocess.run([sys.executable, "-m", "chatd.cli", "admin", *args, "--config", str(config), *extra],
                          capture_output=True, text=True, timeout=120)


async def admin(config, *args, api=None, ok=True) -> str:
    proc = await trio.to_thread.run_sync(lambda: admin_cmd(config, *args, api=api))
    if ok:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.count("\n") == 1 or "--json" in args, proc.stdout  # one line
        return proc.stdout.strip()
    assert proc.returncode == 1, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    return lines[0][len("Error: "):]


async def _row(client, kind: str, channel_id: str, **fields) -> dict:
    """The next live row of ``kind`` in the channel with these fields (other frames stay queued)."""
    return await client._wait_for(lambda f: f.get("type") == "message" and f.get("kind") == kind
                                  and f["channel_id"] == channel_id
                                  and all(f.get(k) == v for k, v in fields.items()), 10)


async def _delete_row(client, channel_id, target_seq) -> dict:
    return await _row(client, "delete", channel_id, target_seq=target_seq)


async def login_status(api, name, password=PASSWORD):
    r = await api.call("POST", "/v1/login", {"username": name, "password": password})
    return r.status, (r.body.get("error", {}).get("code") if isinstance(r.body, dict) else None)


async def test_admin_commands_against_chatd_run(tmp_path, nursery):
    run = ChatdRun(tmp_path)
    await run.start()
    cfg = run.config
    try:
        alice = await run.api.signup_login("alice")
        bob = await run.api.signup_login("bob")
        mallory = await run.api.signup_login("mallory")
        r = await run.api.call("POST", "/v1/groups", {"name": "team", "members": [bob["user"]["id"]]},
                               token=alice["token"])
        group = r.body["channel"]["id"]
        ab = dm(alice, bob)

        assert await admin(cfg, "users", "list") == "3 users"
        listed = json.loads(await admin(cfg, "users", "list", "--json"))
        assert [u["username"] for u in listed["users"]] == ["alice", "bob", "mallory"]
        assert "password_hash" not in json.dumps(listed)
        assert await admin(cfg, "users", "search", "MAL") == "1 users matching 'mal'"
        assert await admin(cfg, "users", "show", "bob") == \
            f"user {bob['user']['id']} 'bob': enabled, 1 devices, 1 channels"
        assert await admin(cfg, "users", "show", "nobody", ok=False) == \
            "no_such_user: no user 'nobody' (give an id or a username)"

        # disable: the open connection is closed (4001), logins are refused; enable lets them back
        cm = await open_client(nursery, mallory["ws_url"], mallory["token"])
        line = await admin(cfg, "users", "disable", "mallory")
        assert line.startswith(f"disabled user {mallory['user']['id']} 'mallory': logins refused, 1 devices")
        with trio.fail_after(10):
            await cm.wait_closed()
        assert cm.closed_reason.code == 4001
        assert await login_status(run.api, "mallory") == (403, "account_disabled")
        r = await run.api.call("GET", "/v1/users/me", token=mallory["token"])
        assert r.status == 401  # the old token is revoked on the HTTP side too
        await admin(cfg, "users", "enable", str(mallory["user"]["id"]))
        assert (await login_status(run.api, "mallory"))[0] == 200

        # reset-password: every session goes, the old password no longer works
        cb = await open_client(nursery, bob["ws_url"], bob["token"])
        answer = json.loads(await admin(cfg, "users", "reset-password", "bob", "--json"))
        assert answer["done"].startswith(f"reset the password of user {bob['user']['id']} 'bob'")
        with trio.fail_after(10):
            await cb.wait_closed()
        assert await login_status(run.api, "bob") == (401, "bad_credentials")
        assert (await login_status(run.api, "bob", answer["password"]))[0] == 200

        # devices: list and revoke one
        r = await run.api.call("POST", "/v1/login", {"username": "bob", "password": answer["password"]})
        bob2 = r.body
        cb2 = await open_client(nursery, bob2["ws_url"], bob2["token"])
        assert await admin(cfg, "devices", "list", "bob") == f"user {bob['user']['id']} 'bob' has 2 devices"
        phone = bob2["device_id"]
        assert await admin(cfg, "devices", "revoke", "bob", phone) == \
            f"logged out device {phone} of user {bob['user']['id']} 'bob'"
        with trio.fail_after(10):
            await cb2.wait_closed()
        assert await admin(cfg, "devices", "revoke", "bob", phone, ok=False) == \
            f"not_found: user {bob['user']['id']} has no device '{phone}' logged in"

        # channels: list, show, add, transfer, remove (the removed member hears of it and may not send)
        assert await admin(cfg, "channels", "list") == "1 channels"  # the group (a DM exists from its first message on)
        assert await admin(cfg, "channels", "show", group) == \
            f"group {group} 'team': 2 members, owner {alice['user']['id']}, 0 messages"
        assert await admin(cfg, "channels", "add-member", group, "mallory") == \
            f"added user {mallory['user']['id']} 'mallory' to {group}"
        await admin(cfg, "channels", "transfer", group, "bob")
        r = await run.api.call("GET", f"/v1/channels/{group}/members", token=alice["token"])
        assert r.body["owner_id"] == bob["user"]["id"] and mallory["user"]["id"] in r.body["members"]
        mallory2 = await run.api.login("mallory")
        cm2 = await open_client(nursery, mallory2["ws_url"], mallory2["token"])
        assert (await cm2.send_message(group, "hi"))["type"] == "ack"
        assert await admin(cfg, "channels", "remove-member", group, "mallory") == \
            f"removed user {mallory['user']['id']} 'mallory' from {group}"
        event = await _row(cm2, "member_removed", group)  # (a system row of the channel's log)
        assert (event["user_id"], event["sender_id"]) == (mallory["user"]["id"], 0)
        refused = await cm2.send_message(group, "still here?")
        assert (refused["type"], refused["code"]) == ("error", "not_member")
        assert await admin(cfg, "channels", "remove-member", group, "bob", ok=False) == \
            "forbidden: the owner cannot be removed: transfer the ownership first"

        ca = await open_client(nursery, alice["ws_url"], alice["token"])
        assert (await ca.send_message(ab, "hello"))["seq"] == 1
        stats = json.loads(await admin(cfg, "stats", "--json"))
        # messages people sent (2); the log also holds mallory's member_added / member_removed rows
        assert (stats["users"], stats["channels"], stats["messages"], stats["log_rows"]) == (3, 2, 2, 4)
        assert sum(stats["messages_per_day"].values()) == 2 and stats["storage_bytes"] > 0
        assert (await admin(cfg, "stats")).startswith("3 users, 2 channels, 2 messages, ")
        # purge the group's history before now: gone for every device; the channel goes on
        line = await admin(cfg, "channels", "purge", group, "--before", str(time.time() + 1))
        assert line.startswith(f"purged 3 messages of {group} written before ")  # (its 3 rows)
        r = await run.api.call("GET", f"/v1/channels/{group}/messages?limit=10", token=alice["token"])
        assert r.body["messages"] == []
        assert (await ca.send_message(group, "fresh start"))["seq"] == 4

        # erase: anonymised, logged out, push tokens dropped, out of its groups, cannot log in
        r = await run.api.call("POST", "/v1/push/tokens", {"provider": "fcm", "token": "tok-alice", "app_id": "a"},
                               token=alice["token"])
        assert r.status in (200, 201), r
        line = await admin(cfg, "users", "delete", "alice", "--erase")
        assert line.startswith(f"erased user {alice['user']['id']}: now 'deleted-{alice['user']['id']}', ")
        assert "1 push tokens dropped, removed from 1 groups, 2 messages erased in 2 channels" in line
        with trio.fail_after(10):
            await ca.wait_closed()
        assert await login_status(run.api, "alice") == (401, "bad_credentials")
        shown = json.loads(await admin(cfg, "users", "show", str(alice["user"]["id"]), "--json"))
        assert shown["user"]["username"] == f"deleted-{alice['user']['id']}" and shown["user"]["disabled"]
        assert shown["user"]["display_name"] == "" and shown["channels"] == [{"id": ab, "kind": "dm", "name": "",
                                                                              "last_seq": 2}]  # + its delete
        # the name is free again
        assert (await run.api.call("POST", "/v1/users", {"username": "alice", "password": PASSWORD})).status == 201
    finally:
        run.proc.terminate()
        await run.wait_exit()


def _db_bytes(run: ChatdRun) -> bytes:
    """The SQLite store's files as they lie on disk (the db, its WAL), checkpointed first."""
    data = run.config.parent / "data"
    db = sqlite3.connect(str(data / "chatd.db"))
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return b"".join(f.read_bytes() for f in sorted(data.glob("chatd.db*")))


async def _history(api, token, channel_id) -> list[dict]:
    r = await api.call("GET", f"/v1/channels/{channel_id}/messages?limit=100", token=token)
    assert r.status == 200, r
    return r.body["messages"]




async def test_admin_delete_message_and_erase_redact_for_every_device(tmp_path, nursery):
    """Moderation (``channels delete-message``) and the erase of a user's bodies are lifecycle
    deletes by the operator: every member's device gets the ``delete`` row live, history shows a
    stub, and the text is gone from the SQLite file."""
    run = ChatdRun(tmp_path)
    await run.start()
    cfg = run.config
    try:
        alice = await run.api.signup_login("alice")
        bob = await run.api.signup_login("bob")
        carol = await run.api.signup_login("carol")
        r = await run.api.call("POST", "/v1/groups", {"name": "team", "members": [bob["user"]["id"],
                                                                                 carol["user"]["id"]]},
                               token=alice["token"])
        group = r.body["channel"]["id"]
        cb = dm(carol, bob)
        ca = await open_client(nursery, alice["ws_url"], alice["token"])
        cbob = await open_client(nursery, bob["ws_url"], bob["token"])
        ccarol = await open_client(nursery, carol["ws_url"], carol["token"])
        spam = await ccarol.send_message(group, "SPAM-zq81 buy now")
        keep = await ca.send_message(group, "KEEP-alice-7c1")
        secret1 = await ccarol.send_message(group, "CAROL-SECRET-ONE")
        secret2 = await ccarol.send_message(cb, "CAROL-SECRET-TWO")
        bobs = await cbob.send_message(cb, "BOB-REPLY-kept")
        assert all(a["type"] == "ack" for a in (spam, keep, secret1, secret2, bobs))
        assert b"SPAM-zq81" in await trio.to_thread.run_sync(_db_bytes, run)  # (the grep below can see a body)

        # moderation: one message
        line = await admin(cfg, "channels", "delete-message", group, str(spam["seq"]))
        assert line.startswith(f"deleted message {spam['seq']} of {group} (sent by user {carol['user']['id']}): "), line
        for client in (ca, cbob, ccarol):
            row = await _delete_row(client, group, spam["seq"])
            assert row["sender_id"] == 0, row
        msgs = await _history(run.api, alice["token"], group)
        stub = [m for m in msgs if m["seq"] == spam["seq"]][0]
        assert stub["body"] == "" and stub["deleted"]["by"] == 0
        assert b"SPAM-zq81" not in await trio.to_thread.run_sync(_db_bytes, run)
        assert await admin(cfg, "channels", "delete-message", group, str(spam["seq"]), ok=False) == \
            f"message_deleted: message {spam['seq']} of {group} is already deleted"
        assert await admin(cfg, "channels", "delete-message", group, "999", ok=False) == \
            f"no_such_message: there is no message 999 in {group}"
        assert await admin(cfg, "channels", "delete-message", "g:0000000000000000", "1", ok=False) == \
            "no_such_channel: no channel 'g:0000000000000000'"
        answer = json.loads(await admin(cfg, "channels", "delete-message", group, str(keep["seq"]), "--json"))
        assert (answer["channel_id"], answer["seq"], answer["sender_id"]) == (group, keep["seq"], alice["user"]["id"])

        # erase carol: her bodies in the group (she leaves it) and in the DM, as deletes bob sees live
        line = await admin(cfg, "users", "delete", "carol", "--erase")
        assert "removed from 1 groups, 2 messages erased in 2 channels" in line, line
        assert (await _delete_row(cbob, group, secret1["seq"]))["sender_id"] == 0
        assert (await _delete_row(cbob, cb, secret2["seq"]))["sender_id"] == 0
        assert (await _delete_row(ca, group, secret1["seq"]))["sender_id"] == 0
        group_msgs = await _history(run.api, alice["token"], group)
        dm_msgs = await _history(run.api, bob["token"], cb)
        texts = json.dumps(group_msgs + dm_msgs)
        assert "CAROL-SECRET" not in texts and "BOB-REPLY-kept" in texts
        assert [m for m in dm_msgs if m["seq"] == secret2["seq"]][0]["deleted"]["by"] == 0
        on_disk = await trio.to_thread.run_sync(_db_bytes, run)
        assert b"CAROL-SECRET-ONE" not in on_disk and b"CAROL-SECRET-TWO" not in on_disk
        assert b"BOB-REPLY-kept" in on_disk
        # run again: nothing left to erase, nothing added
        again = json.loads(await admin(cfg, "users", "delete", str(carol["user"]["id"]), "--erase", "--json"))
        assert again["bodies"] == 0
    finally:
        run.proc.terminate()
        await run.wait_exit()


async def test_admin_refuses_a_token_of_another_secret(tmp_path):
    run = ChatdRun(tmp_path)
    await run.start()
    try:
        other = tmp_path / "other.toml"
        other.write_text(f'data_dir = "{tmp_path / "other"}"\n[auth]\nsecret = "{TEST_TOKEN_SECRET}"\n')
        api = f"http://127.0.0.1:{run.api_port}"
        assert await admin(other, "users", "list", api=api, ok=False) == \
            "invalid_token: not an admin token of this deployment"
        # a user's token is not an admin token either
        user = await run.api.signup_login("eve")
        r = await run.api.call("GET", "/v1/admin/users", token=user["token"])
        assert (r.status, r.body["error"]["code"]) == (401, "invalid_token")
        r = await run.api.call("GET", "/v1/admin/users")
        assert (r.status, r.body["error"]["code"]) == (401, "not_authenticated")
    finally:
        run.proc.terminate()
        await run.wait_exit()
    down = await admin(run.config, "stats", ok=False)
    assert down.startswith(f"no chatd API server answered at http://127.0.0.1:{run.api_port}")


async def test_admin_effects_reach_every_shard_of_a_cluster(zk, tmp_path, store_toml, nursery):
    """The admin asks the API server; the user's sockets are on shards: disable closes them there,
    a removed member stops receiving the group's messages at once, from whichever shard owns it."""
    c = Cluster(zk, tmp_path, store_toml=store_toml)
    try:
        await c.start()
        api = f"http://127.0.0.1:{c.api_port}"
        names = [f"user{i}" for i in range(6)]
        creds = {n: await c.api.signup_login(n) for n in names}
        owner = creds["user0"]
        r = await c.api.call("POST", "/v1/groups", {"name": "g", "members": [creds[n]["user"]["id"]
                                                                            for n in names[1:]]},
                             token=owner["token"])
        group = r.body["channel"]["id"]
        # (the users are spread over the shards by discovery; wherever they are, the admin's effect
        # travels from the API process to their shard over the links)
        clients = {n: await open_client(nursery, creds[n]["ws_url"], creds[n]["token"]) for n in names}

        # disable user1 and user2 (connected to whichever shards discovery gave them)
        for n in ("user1", "user2"):
            await admin(c.config, "users", "disable", n, api=api)
            with trio.fail_after(10):
                await clients[n].wait_closed()
            assert clients[n].closed_reason.code == 4001, n
            assert await login_status(c.api, n) == (403, "account_disabled")

        # remove user3: it hears of it; the next message of the group reaches the others, not it
        await admin(c.config, "channels", "remove-member", group, "user3", api=api)
        await _row(clients["user3"], "member_removed", group)
        ack = await clients["user0"].send_message(group, "after the removal")
        assert ack["type"] == "ack", ack
        for n in ("user4", "user5"):
            assert (await _row(clients[n], "member_removed", group))["user_id"] == creds["user3"]["user"]["id"]
            got = await clients[n].messages(1)
            assert [m["seq"] for m in got] == [ack["seq"]]
        r = await clients["user3"].send_message(group, "me too")
        assert r.get("code") == "not_member", r
        assert not [f for f in clients["user3"].pending_messages() if f["seq"] == ack["seq"]]

        assert "disabled user" in await admin(c.config, "users", "disable", "user4", api=api)
        # the listing commands read the cluster's store (a scan on Cassandra)
        assert await admin(c.config, "users", "search", "USER", api=api) == "6 users matching 'user'"
        shown = json.loads(await admin(c.config, "users", "show", "user1", "--json", api=api))
        assert shown["user"]["disabled"] and shown["devices"] == []
        assert await admin(c.config, "channels", "list", api=api) == "1 channels"
        stats = json.loads(await admin(c.config, "stats", "--json", api=api))
        assert (stats["users"], stats["channels"], stats["messages"], stats["log_rows"]) == (6, 1, 1, 2)  # + the removal's row
        # moderation and erase: the API server sends each delete to the channel's owner shard (the
        # group's and the DM's may be different ones); the members' devices get the rows live
        line = await admin(c.config, "channels", "delete-message", group, str(ack["seq"]), api=api)
        assert line.startswith(f"deleted message {ack['seq']} of {group} "), line
        for n in ("user0", "user5"):
            assert (await _delete_row(clients[n], group, ack["seq"]))["sender_id"] == 0, n
        said = await clients["user5"].send_message(group, "U5-GROUP-SECRET")
        u05 = dm(owner, creds["user5"])
        told = await clients["user5"].send_message(u05, "U5-DM-SECRET")
        assert (said["type"], told["type"]) == ("ack", "ack"), (said, told)
        answer = json.loads(await admin(c.config, "users", "delete", "user5", "--erase", "--json", api=api))
        assert answer["bodies"] == 2, answer
        assert (await _delete_row(clients["user0"], group, said["seq"]))["sender_id"] == 0
        assert (await _delete_row(clients["user0"], u05, told["seq"]))["sender_id"] == 0
        texts = ""
        for ch in (group, u05):
            r = await c.api.call("GET", f"/v1/channels/{ch}/messages?limit=100", token=owner["token"])
            texts += json.dumps(r.body["messages"])
        assert "U5-" not in texts and "after the removal" not in texts, texts
    finally:
        c.stop()
