"""The message lifecycle on a real ``chatd run`` (SQLite): edit, delete (redaction), reactions,
replies and the system rows, live, by sync and by history; every documented error; redaction
checked in the database and WAL files and in every API answer (docs/protocol.md, "The message
lifecycle")."""

from __future__ import annotations

import uuid

import trio

from chatd.lifecycle import ChannelView

from .helpers import dm, open_client


def _cmid() -> str:
    return str(uuid.uuid4())


async def _do(client, kind: str, channel_id: str, **fields) -> dict:
    return await client.request({"type": kind, "channel_id": channel_id, "client_msg_id": fields.pop("cmid", _cmid()),
                                 **fields})


async def _history(server, token, ch, **q) -> list[dict]:
    query = "&".join(f"{k}={v}" for k, v in {"limit": 500, **q}.items())
    r = await server.api.call("GET", f"/v1/channels/{ch}/messages?{query}", token=token)
    assert r.status == 200, r
    return r.body["messages"]


async def _group(server, owner, *members) -> str:
    r = await server.api.call("POST", "/v1/groups", {"name": "team", "members": [m["user"]["id"] for m in members]},
                              token=owner["token"])
    assert r.status == 201, r
    return r.body["channel"]["id"]


async def test_edit_delete_react_reply_live_and_in_history(server, nursery):
    alice = await server.api.signup_login("alice")
    bob = await server.api.signup_login("bob")
    ch = dm(alice, bob)
    ca = await open_client(nursery, alice["ws_url"], alice["token"])
    cb = await open_client(nursery, bob["ws_url"], bob["token"])
    first = await ca.send_message(ch, "helo")
    assert (await cb.next_event("message"))["body"] == "helo"
    edit = await _do(ca, "edit", ch, target_seq=first["seq"], body="hello")
    assert edit["type"] == "ack" and edit["kind"] == "edit" and edit["seq"] == first["seq"] + 1
    ev = ev_edit = await cb.next_event("message")
    assert ev["kind"] == "edit" and ev["target_seq"] == first["seq"] and ev["body"] == "hello"
    assert [f["seq"] for f in await ca.messages(2)] == [1, 2]  # (the sender's devices get its rows too)
    react = await _do(cb, "react", ch, target_seq=first["seq"], emoji="👍")
    assert react["kind"] == "react"
    ev = await ca.next_event("message")
    assert (ev["kind"], ev["emoji"], ev["count"], ev["sender_id"]) == ("react", "👍", 1, bob["user"]["id"])
    reply = await cb.request({"type": "send", "channel_id": ch, "client_msg_id": _cmid(), "body": "yes",
                              "reply_to": first["seq"]})
    ev_react = await cb.next_event("message")
    assert ev_react["kind"] == "react"
    ev = await ca.next_event("message")
    assert ev["reply_to"] == first["seq"] and ev["reply"]["excerpt"] == "hello" and "kind" not in ev
    # history: the message folded, the events beside it, in seq order with no gap
    msgs = await _history(server, alice["token"], ch)
    assert [m["seq"] for m in msgs] == list(range(1, reply["seq"] + 1))
    m1 = msgs[0]
    assert m1["body"] == "hello" and m1["edited_at"] == edit["created_at"] and m1["state_seq"] == react["seq"]
    assert m1["reactions"] == [{"emoji": "👍", "count": 1, "me": False}]
    assert (await _history(server, bob["token"], ch))[0]["reactions"] == [{"emoji": "👍", "count": 1, "me": True}]
    # unreact, then delete: the stub keeps who and when, and nothing of the text or the reactions
    await _do(cb, "unreact", ch, target_seq=first["seq"], emoji="👍")
    gone = await _do(ca, "delete", ch, target_seq=first["seq"])
    msgs = await _history(server, bob["token"], ch)
    stub = msgs[0]
    assert stub["body"] == "" and stub["deleted"] == {"by": alice["user"]["id"], "at": gone["created_at"]}
    assert "reactions" not in stub and "edited_at" not in stub
    assert msgs[1]["kind"] == "edit" and msgs[1]["body"] == "" and msgs[1]["redacted"] is True
    assert msgs[2]["kind"] == "react" and msgs[2]["emoji"] == "" and msgs[2]["redacted"] is True
    assert [m for m in msgs if m["seq"] == reply["seq"]][0]["reply"] == {"seq": 1, "sender_id": alice["user"]["id"],
                                                                         "deleted": True, "excerpt": ""}
    # a device folding every frame it got live reaches the history's state
    view = ChannelView(bob["user"]["id"])
    for f in [{"type": "message", **m} for m in await _history(server, bob["token"], ch)]:
        view.apply(f)
    live = ChannelView(bob["user"]["id"])
    live.apply({"type": "message", "channel_id": ch, "seq": 1, "sender_id": alice["user"]["id"], "body": "helo",
                "client_msg_id": "x", "created_at": 0})
    for f in [ev_edit, ev_react]:
        live.apply(f)
    for f in await cb.messages(3):  # his reply, unreact, delete
        live.apply(f)
    assert live.snapshot()[1][1:4] == view.snapshot()[1][1:4] == ("", None, alice["user"]["id"])


async def test_errors_each_with_its_code(server, nursery):
    alice = await server.api.signup_login("alice")
    bob = await server.api.signup_login("bob")
    carol = await server.api.signup_login("carol")
    g = await _group(server, alice, bob)
    ca = await open_client(nursery, alice["ws_url"], alice["token"])
    cb = await open_client(nursery, bob["ws_url"], bob["token"])
    cc = await open_client(nursery, carol["ws_url"], carol["token"])
    mine = await cb.send_message(g, "bob's")
    assert (await _do(ca, "edit", g, target_seq=mine["seq"], body="x"))["code"] == "not_author"
    assert (await _do(ca, "edit", g, target_seq=999, body="x"))["code"] == "no_such_message"
    assert (await cb.request({"type": "send", "channel_id": g, "client_msg_id": _cmid(), "body": "re",
                              "reply_to": 999}))["code"] == "no_such_message"
    assert (await _do(cc, "react", g, target_seq=mine["seq"], emoji="👍"))["code"] == "not_member"
    assert (await _do(cc, "delete", g, target_seq=mine["seq"]))["code"] == "not_member"
    assert (await _do(cb, "react", g, target_seq=mine["seq"], emoji="ok"))["code"] == "bad_emoji"
    assert (await _do(cb, "react", g, target_seq=mine["seq"], emoji="👍👍"))["code"] == "bad_emoji"
    assert (await _do(cb, "edit", g, target_seq=mine["seq"], body="x" * 100_001))["code"] == "body_too_long"
    # an event is no target
    ev = await _do(cb, "react", g, target_seq=mine["seq"], emoji=":tada:")
    assert ev["type"] == "ack"
    assert (await _do(cb, "edit", g, target_seq=ev["seq"], body="x"))["code"] == "no_such_message"
    # a member who is not the author may not delete; the group's owner may (moderation)
    other = await ca.send_message(g, "alice's")
    assert (await _do(cb, "delete", g, target_seq=other["seq"]))["code"] == "not_author"
    assert (await _do(ca, "delete", g, target_seq=mine["seq"]))["type"] == "ack"
    for kind, extra in (("edit", {"body": "again"}), ("react", {"emoji": "👍"}), ("delete", {})):
        assert (await _do(cb, kind, g, target_seq=mine["seq"], **extra))["code"] == "message_deleted"
    # idempotent by client_msg_id: a resend of an acked delete answers the original
    cmid = _cmid()
    first = await _do(ca, "delete", g, target_seq=other["seq"], cmid=cmid)
    again = await _do(ca, "delete", g, target_seq=other["seq"], cmid=cmid)
    assert (again["seq"], again["duplicate"], first["duplicate"]) == (first["seq"], True, False)
    # nothing broke: the log is gap-free
    assert [m["seq"] for m in await _history(server, alice["token"], g)] == list(range(1, first["seq"] + 1))


async def test_too_many_reactions_and_the_edit_window(server_with, nursery):
    server = await server_with(max_reaction_kinds=2, edit_window_s=0.5)
    alice = await server.api.signup_login("alice")
    bob = await server.api.signup_login("bob")
    ch = dm(alice, bob)
    ca = await open_client(nursery, alice["ws_url"], alice["token"])
    m = await ca.send_message(ch, "hi")
    for e in ("👍", "🎉"):
        assert (await _do(ca, "react", ch, target_seq=m["seq"], emoji=e))["type"] == "ack"
    assert (await _do(ca, "react", ch, target_seq=m["seq"], emoji="🔥"))["code"] == "too_many_reactions"
    assert (await _do(ca, "react", ch, target_seq=m["seq"], emoji="👍"))["type"] == "ack"  # one already there
    await trio.sleep(0.6)  # past the (short) edit window
    assert (await _do(ca, "edit", ch, target_seq=m["seq"], body="late"))["code"] == "edit_window_closed"


async def test_redaction_leaves_no_byte_in_the_database_or_the_wal(server, nursery, tmp_path):
    alice = await server.api.signup_login("alice")
    bob = await server.api.signup_login("bob")
    ch = dm(alice, bob)
    ca = await open_client(nursery, alice["ws_url"], alice["token"])
    secret = f"original-{uuid.uuid4().hex}"
    edits = [f"edit{i}-{uuid.uuid4().hex}" for i in range(3)]
    m = await ca.send_message(ch, secret)
    for body in edits:
        assert (await _do(ca, "edit", ch, target_seq=m["seq"], body=body))["type"] == "ack"
    await _do(ca, "react", ch, target_seq=m["seq"], emoji="🦄")
    files = sorted((tmp_path / "data").rglob("*.db*"))
    assert any(secret.encode() in f.read_bytes() for f in files), "the test must see the text before"
    assert (await _do(ca, "delete", ch, target_seq=m["seq"]))["type"] == "ack"
    for f in sorted((tmp_path / "data").rglob("*.db*")):  # the database, its -wal and -shm
        data = f.read_bytes()
        for text in (secret, *edits):
            assert text.encode() not in data, f"{text} left in {f.name}"
        assert "🦄".encode() not in data, f"the reaction left in {f.name}"
    everything = str(await _history(server, alice["token"], ch)) + str(await _history(server, bob["token"], ch))
    cb = await open_client(nursery, bob["ws_url"], bob["token"], cursors={ch: 0})
    synced = [await cb.next_event("message") for _ in range(m["seq"] + 5)]
    ws_history = await cb.request({"type": "history", "channel_id": ch})
    everything += str(synced) + str(ws_history)
    for text in (secret, *edits, "🦄"):
        assert text not in everything


async def test_membership_changes_are_log_rows_and_a_removed_member_gets_nothing_after(server, nursery):
    alice = await server.api.signup_login("alice")
    bob = await server.api.signup_login("bob")
    carol = await server.api.signup_login("carol")
    g = await _group(server, alice, bob)
    cc = await open_client(nursery, carol["ws_url"], carol["token"])
    r = await server.api.call("POST", f"/v1/channels/{g}/members", {"user_id": carol["user"]["id"]}, token=alice["token"])
    assert r.status == 200 and r.body["added"]
    added = await cc.next_event("message")  # the group appears at once, before any message
    assert (added["channel_id"], added["kind"], added["user_id"], added["sender_id"]) == \
        (g, "member_added", carol["user"]["id"], alice["user"]["id"])
    ca = await open_client(nursery, alice["ws_url"], alice["token"])
    await ca.send_message(g, "welcome")
    assert (await cc.next_event("message"))["body"] == "welcome"
    r = await server.api.call("DELETE", f"/v1/channels/{g}/members/{carol['user']['id']}", token=alice["token"])
    assert r.status == 200 and r.body["removed"]
    removed = await cc.next_event("message")
    assert (removed["kind"], removed["user_id"]) == ("member_removed", carol["user"]["id"])
    after = await ca.send_message(g, "not for carol")
    await _do(ca, "edit", g, target_seq=after["seq"], body="still not")
    r = await server.api.call("DELETE", f"/v1/channels/{g}/members/{bob['user']['id']}", token=bob["token"])
    assert r.status == 200
    # bob, offline, learns the changes by sync: the rows are in the log
    log = await _history(server, alice["token"], g)
    assert [m.get("kind", "message") for m in log] == ["member_added", "message", "member_removed", "message",
                                                       "edit", "member_left"]
    with trio.move_on_after(1.0):
        extra = await cc.next_event("message")
        raise AssertionError(f"a removed member received {extra}")
    cc2 = await open_client(nursery, carol["ws_url"], carol["token"], cursors={g: 0})
    reply = await cc2.reply_to(cc2.auth_id)
    assert not cc2.pending_messages(), reply
    # unread counts only new messages: alice's own rows aside, bob's 'welcome'... carol is gone
    r = await server.api.call("GET", "/v1/channels", token=alice["token"])
    assert [c["unread"] for c in r.body["channels"] if c["id"] == g] == [2]  # welcome + not for carol (no read)


async def test_a_rename_is_a_row_of_the_log(server, nursery):
    alice = await server.api.signup_login("alice")
    bob = await server.api.signup_login("bob")
    g = await _group(server, alice, bob)
    cb = await open_client(nursery, bob["ws_url"], bob["token"])
    r = await server.api.call("PATCH", f"/v1/channels/{g}", {"name": "renamed team"}, token=bob["token"])
    assert (r.status, r.body["error"]["code"]) == (403, "forbidden")  # the owner only
    r = await server.api.call("PATCH", f"/v1/channels/{g}", {"name": "renamed team"}, token=alice["token"])
    assert r.status == 200 and r.body == {"channel_id": g, "name": "renamed team", "seq": 1}
    row = await cb.next_event("message")
    assert (row["kind"], row["name"], row["sender_id"], row["seq"]) == ("renamed", "renamed team", alice["user"]["id"], 1)
    r = await server.api.call("GET", "/v1/channels", token=bob["token"])
    assert [c["name"] for c in r.body["channels"] if c["id"] == g] == ["renamed team"]
    assert [c["unread"] for c in r.body["channels"] if c["id"] == g] == [0]  # a system row is not unread


async def test_delete_message_use_case_for_an_erasure_job(server, nursery):
    """Router.delete_message (the entry point issue 25's erasure calls): with force, a message
    is redacted whoever asks, and a resend with the same client_msg_id answers the original."""
    alice = await server.api.signup_login("alice")
    bob = await server.api.signup_login("bob")
    ch = dm(alice, bob)
    ca = await open_client(nursery, alice["ws_url"], alice["token"])
    m = await ca.send_message(ch, "erase me")
    router = server.node.router
    first = await router.delete_message(bob["user"]["id"], ch, m["seq"], "erasure-1", force=True)
    again = await router.delete_message(bob["user"]["id"], ch, m["seq"], "erasure-1", force=True)
    assert (again.message.seq, again.duplicate) == (first.message.seq, True)
    assert (await _history(server, alice["token"], ch))[0]["deleted"]["by"] == bob["user"]["id"]
