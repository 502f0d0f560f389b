"""Receipts (state, not log rows): ``received`` raises the member's delivered position, ``read`` both;
members learn them by coalesced ``receipts`` events (one per channel per ``limits.receipt_interval_s``
from a shard); ``GET /v1/channels/<id>/receipts`` lists every member's positions, members only."""

from __future__ import annotations

import trio

from chatd.shard.receipts import receipt_counts

from .helpers import dm, open_client


def test_receipt_counts_from_sorted_cursors():
    positions = {1: (9, 9), 2: (9, 5), 3: (4, 4), 4: (7, 0)}
    assert receipt_counts(positions, 5, sender_id=1) == {"delivered": 2, "read": 1, "of": 3}
    assert receipt_counts(positions, 10, sender_id=1) == {"delivered": 0, "read": 0, "of": 3}
    assert receipt_counts(positions, 1, sender_id=4) == {"delivered": 3, "read": 3, "of": 3}


async def test_received_and_read_become_coalesced_receipts_events(server_with, nursery):
    server = await server_with(receipt_interval_s=0.5)
    api = server.api
    alice, bob, carol, dave = [await api.signup_login(n) for n in ("alice", "bob", "carol", "dave")]
    r = await api.call("POST", "/v1/groups", {"name": "g", "members": [bob["user"]["id"], carol["user"]["id"]]},
                       token=alice["token"])
    g = r.body["channel"]["id"]
    ca, cb, cc = [await open_client(nursery, p["ws_url"], p["token"]) for p in (alice, bob, carol)]
    for i in range(3):
        await ca.send_message(g, f"m{i}")
    # bob's device holds 3 (✓✓), carol has read 2: within one interval, one event to alice
    assert (await cb.request({"type": "received", "channel_id": g, "seq": 3}))["seq"] == 3
    assert (await cc.request({"type": "read", "channel_id": g, "seq": 2}))["seq"] == 2
    assert (await cb.request({"type": "received", "channel_id": g, "seq": 99}))["seq"] == 3  # never past the head
    ev = await ca.next_event("receipts")
    assert ev == {"type": "receipts", "channel_id": g, "cursors": {
        str(bob["user"]["id"]): {"delivered": 3, "read": 0}, str(carol["user"]["id"]): {"delivered": 2, "read": 2}}}
    with trio.move_on_after(0.8):
        extra = await ca.next_event("receipts")
        raise AssertionError(f"a second event for the same interval: {extra}")
    # the positions, for members only
    r = await api.call("GET", f"/v1/channels/{g}/receipts", token=alice["token"])
    assert r.status == 200
    assert r.body["members"] == [{"user_id": bob["user"]["id"], "delivered_seq": 3, "read_seq": 0},
                                 {"user_id": carol["user"]["id"], "delivered_seq": 2, "read_seq": 2},
                                 {"user_id": alice["user"]["id"], "delivered_seq": 0, "read_seq": 0}]
    assert (await api.call("GET", f"/v1/channels/{g}/receipts", token=dave["token"])).status == 403
    # a read implies received; positions never go back
    await cb.request({"type": "read", "channel_id": g, "seq": 1})
    await cb.request({"type": "received", "channel_id": g, "seq": 2})
    r = await api.call("GET", f"/v1/channels/{g}/receipts", token=bob["token"])
    assert {m["user_id"]: (m["delivered_seq"], m["read_seq"]) for m in r.body["members"]}[bob["user"]["id"]] == (3, 1)
    # a 1:1 channel with nothing in it yet: position 0
    cd = await open_client(nursery, dave["ws_url"], dave["token"])
    assert (await cd.request({"type": "received", "channel_id": dm(alice, dave), "seq": 5}))["seq"] == 0
