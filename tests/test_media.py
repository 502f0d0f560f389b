"""Media against a real ``chatd run`` (API + shard + SQLite, in process, ``fs`` backend): uploads
streamed and limited, sniffed and processed in worker processes, downloads authorized and served
safely, attachments on messages (live, history), references and collection.

The byte-level contract of the backends themselves (round trip, Range) is in
tests/test_media_contract.py, run on ``fs`` and on a real S3 server."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import time
import zlib

import httpx
import pytest
import trio
import trio.testing
from PIL import Image

from tests.helpers import RunningServer, dm, eventually, make_config, open_client

pytestmark = pytest.mark.timeout(180)


def media_config(tmp_path, **media):
    cfg = make_config(tmp_path)
    cfg.update({"media": media}, source="test")
    cfg.validate()
    return cfg


@pytest.fixture
async def media_server(nursery, tmp_path):
    started = []

    async def start(**media):
        srv = RunningServer(nursery, media_config(tmp_path / f"s{len(started)}", **media))
        started.append(await srv.start())
        return srv
    yield start
    for srv in started:
        if not srv.stopped:
            await srv.stop()


class Client:
    """httpx against the server's API, as one user."""

    def __init__(self, srv, login=None):
        self.srv = srv
        self.login = login
        self.http = httpx.AsyncClient(base_url=srv.info.api_url, timeout=60)

    def headers(self, **extra):
        h = {"Authorization": f"Bearer {self.login['token']}"} if self.login else {}
        return {**h, **extra}

    async def upload(self, data, name="file.bin", content_type="application/octet-stream"):
        return await self.http.post("/v1/media", params={"name": name}, content=data,
                                    headers=self.headers(**{"Content-Type": content_type}))

    async def get(self, path, **headers):
        return await self.http.get(path, headers=self.headers(**headers))


def jpeg(size=(200, 100), exif=None, colors=("red", "blue")):
    im = Image.new("RGB", size, colors[0])
    im.paste(Image.new("RGB", (size[0] // 2, size[1]), colors[1]), (size[0] // 2, 0))
    out = io.BytesIO()
    im.save(out, "JPEG", exif=exif if exif is not None else Image.Exif())
    return out.getvalue()


def gps_exif(orientation=1):
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    exif[0x010F] = "SpyCam Inc"  # Make
    gps = exif.get_ifd(0x8825)
    gps[1] = "N"
    gps[2] = (48.0, 51.0, 29.0)  # Paris
    gps[3] = "E"
    gps[4] = (2.0, 17.0, 40.0)
    return exif


def media_files(srv):
    root = srv.config.data_path / "media"
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


# ---- upload and download --------------------------------------------------------------------------
async def test_image_upload_is_reencoded_without_gps_and_oriented(media_server):
    srv = await media_server()
    alice = Client(srv, await srv.api.signup_login("alice"))
    original = jpeg((200, 100), gps_exif(orientation=6))
    assert Image.open(io.BytesIO(original)).getexif().get_ifd(0x8825)  # the test's file has GPS
    r = await alice.upload(original, "holiday.jpg", "image/png")  # the claimed type is ignored
    assert r.status_code == 201, r.text
    media = r.json()["media"]
    assert media["kind"] == "image" and media["mime"] == "image/jpeg"
    # orientation 6 = rotate 90 degrees clockwise: 200x100 becomes 100x200, the left half on top
    assert (media["width"], media["height"]) == (100, 200)
    assert media["placeholder"].startswith("data:image/jpeg;base64,")
    got = await alice.get(media["url"])
    assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg"
    assert got.headers["content-disposition"].startswith("inline")
    assert hashlib.sha256(got.content).hexdigest() == media["sha256"] and len(got.content) == media["size"]
    served = Image.open(io.BytesIO(got.content))
    assert served.size == (100, 200)
    assert dict(served.getexif()) == {} and not served.getexif().get_ifd(0x8825)
    assert b"SpyCam" not in got.content and b"Exif" not in got.content
    top, bottom = served.convert("RGB").getpixel((50, 20)), served.convert("RGB").getpixel((50, 180))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # red above, blue below


async def test_thumbnails_of_a_large_image(media_server):
    srv = await media_server()
    alice = Client(srv, await srv.api.signup_login("alice"))
    r = await alice.upload(jpeg((2000, 1500)), "big.jpg")
    media = r.json()["media"]
    assert [(t["px"], t["width"], t["height"]) for t in media["thumbnails"]] == [(320, 320, 240), (1280, 1280, 960)]
    for t in media["thumbnails"]:
        got = await alice.get(t["url"])
        assert got.status_code == 200 and len(got.content) == t["size"]
        assert Image.open(io.BytesIO(got.content)).size == (t["width"], t["height"])
    assert (await alice.get(f"{media['url']}/thumbnails/640")).status_code == 404


async def test_plain_file_round_trip_range_etag_and_headers(media_server):
    srv = await media_server()
    alice = Client(srv, await srv.api.signup_login("alice"))
    data = os.urandom(3 * 1024 * 1024 + 17)
    r = await alice.upload(data, "notes.pdf")
    media = r.json()["media"]
    assert media["kind"] == "file" and media["sha256"] == hashlib.sha256(data).hexdigest()
    got = await alice.get(media["url"])
    assert got.content == data
    h = got.headers
    assert h["content-type"] == "application/octet-stream" and h["x-content-type-options"] == "nosniff"
    assert h["content-disposition"].startswith("attachment") and "sandbox" in h["content-security-policy"]
    assert "immutable" in h["cache-control"] and h["etag"] == f'"{media["sha256"]}"'
    for header, want, span in (("bytes=0-0", data[:1], f"0-0/{len(data)}"),
                               ("bytes=1000-1999", data[1000:2000], f"1000-1999/{len(data)}"),
                               ("bytes=-500", data[-500:], f"{len(data) - 500}-{len(data) - 1}/{len(data)}"),
                               (f"bytes={len(data) - 10}-", data[-10:], f"{len(data) - 10}-{len(data) - 1}/{len(data)}")):
        part = await alice.get(media["url"], Range=header)
        assert part.status_code == 206 and part.content == want and part.headers["content-range"] == f"bytes {span}"
    past = await alice.get(media["url"], Range=f"bytes={len(data)}-")
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(data)}"
    cached = await alice.get(media["url"], **{"If-None-Match": h["etag"]})
    assert cached.status_code == 304 and cached.content == b""


async def test_upload_over_max_bytes_is_refused_and_discarded(media_server):
    srv = await media_server(max_bytes=1024 * 1024)
    alice = Client(srv, await srv.api.signup_login("alice"))
    declared = await alice.upload(b"x" * (1024 * 1024 + 1))

    async def chunked():
        for _ in range(40):
            yield b"y" * 65536
    streamed = await alice.upload(chunked())
    for r in (declared, streamed):
        assert r.status_code == 413 and r.json()["error"]["code"] == "media_too_large", r.text
    assert media_files(srv) == []  # nothing kept, no temporary file left
    ok = await alice.upload(b"z" * 1024 * 1024)  # exactly the limit
    assert ok.status_code == 201


async def test_a_body_refused_while_its_reader_waits_is_an_error_not_an_end():
    """Regression: the upload's reader waiting for the next chunk when the body passed its limit
    saw the end of a complete body (Quart's Body checks the limit only before waiting), and a
    truncated upload was stored with 201."""
    from werkzeug.exceptions import RequestEntityTooLarge

    from chatd.api.asgi import BoundedBody
    body = BoundedBody(None, None)
    body.decide(100, stream=True)
    got = []

    async def read():
        with pytest.raises(RequestEntityTooLarge):
            async for chunk in body:
                got.append(chunk)
    async with trio.open_nursery() as n:
        n.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        body.append(b"x" * 60)
        await trio.testing.wait_all_tasks_blocked()
        body.append(b"y" * 60)  # 120 > 100, while the reader waits
    assert got == [b"x" * 60]


async def test_unauthenticated_upload_is_refused_before_the_body(media_server):
    srv = await media_server()
    anon = Client(srv)
    sent = 0

    async def endless():
        nonlocal sent
        while sent < 64 * 1024 * 1024:
            sent += 65536
            yield b"a" * 65536
    r = await anon.upload(endless())
    assert r.status_code == 401 and r.json()["error"]["code"] == "not_authenticated"
    assert r.headers.get("connection") == "close"
    assert sent < 16 * 1024 * 1024  # answered long before the 64 MiB were sent
    assert media_files(srv) == []
    forged = Client(srv, {"token": "v1.forged"})
    assert (await forged.upload(b"abc")).status_code == 401


async def test_an_upload_cut_off_midway_leaves_nothing(media_server):
    srv = await media_server()
    alice = Client(srv, await srv.api.signup_login("alice"))

    class ClientGaveUp(Exception):
        pass

    async def half():
        for _ in range(32):
            yield b"h" * 65536
        raise ClientGaveUp()
    with pytest.raises(ClientGaveUp):
        await alice.upload(half())

    async def clean():
        return media_files(srv) == []
    await eventually(clean, timeout=10)
    assert (await alice.upload(b"after")).status_code == 201  # and the server goes on


async def test_hourly_quota(media_server):
    srv = await media_server(uploads_per_hour=2)
    alice = Client(srv, await srv.api.signup_login("alice"))
    for _ in range(2):
        assert (await alice.upload(b"data")).status_code == 201
    r = await alice.upload(b"data")
    assert r.status_code == 429 and r.json()["error"]["code"] == "media_quota"
    assert int(r.headers["retry-after"]) >= 1
    bob = Client(srv, await srv.api.signup_login("bob"))
    assert (await bob.upload(b"data")).status_code == 201  # per user


# ---- hostile files ---------------------------------------------------------------------------------
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width, height, color_type=0) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))


def decompression_bomb(side=12000) -> bytes:
    """A grey PNG of side x side pixels (144 MP) whose zeros compress to ~140 KB."""
    z = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return png_header(side, side) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def hostile_corpus() -> dict[str, bytes]:
    good_png = io.BytesIO()
    Image.new("RGB", (64, 64), "green").save(good_png, "PNG")
    png = good_png.getvalue()
    corrupted = bytearray(png)
    for i in range(60, len(corrupted) - 20, 7):
        corrupted[i] ^= 0x5A
    zipped = io.BytesIO()
    import zipfile
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("evil.html", "<script>alert(1)</script>")
    return {
        "truncated.jpg": jpeg((400, 300))[:700],
        "corrupted.png": bytes(corrupted),
        "pixel-flood.png": png_header(100_000, 100_000) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
        + png_chunk(b"IEND", b""),
        "bomb.png": decompression_bomb(),
        "polyglot.gif": b"GIF89a\x01\x00\x01\x00\x00\x00\x00;<html><script>alert(document.cookie)</script></html>",
        "script.svg": b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
        "zip-claiming.png": zipped.getvalue(),
        "empty.png": b"",
    }


def rss_bytes(pid="self") -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_hostile_files_are_never_inline_and_the_server_survives(media_server):
    srv = await media_server()
    alice = Client(srv, await srv.api.signup_login("alice"))
    before = rss_bytes()
    for name, data in hostile_corpus().items():
        with trio.fail_after(60):
            r = await alice.upload(data, name, "image/png")
        assert r.status_code == 201, (name, r.text)
        media = r.json()["media"]
        assert media["kind"] == "file" and media["thumbnails"] == [], (name, media)
        got = await alice.get(media["url"])
        assert got.status_code == 200 and got.content == data, name
        assert got.headers["content-type"] == "application/octet-stream", name
        assert got.headers["content-disposition"].startswith("attachment"), name
        assert got.headers["x-content-type-options"] == "nosniff" and "sandbox" in got.headers["content-security-policy"]
    assert (await alice.get("/healthz")).status_code == 200
    # the decoding happened in worker processes: the server's memory did not take the bomb
    assert rss_bytes() - before < 100 * 1024 * 1024


async def test_worker_limits_memory_and_time(media_server):
    # no pixel limit to stop it: the bomb's 144 MP decode hits the worker's address-space limit
    srv = await media_server(max_pixels=10**9, worker_memory_bytes=400 * 1024 * 1024)
    alice = Client(srv, await srv.api.signup_login("alice"))
    r = await alice.upload(decompression_bomb(), "bomb.png")
    assert r.status_code == 201 and r.json()["media"]["kind"] == "file"
    slow = await media_server(worker_timeout_s=0.01)  # killed before it even starts up
    bob = Client(slow, await slow.api.signup_login("bob"))
    t0 = time.monotonic()
    r = await bob.upload(jpeg(), "photo.jpg")
    assert r.status_code == 201 and r.json()["media"]["kind"] == "file"
    assert time.monotonic() - t0 < 10
    assert slow.node.media.processor.stats["killed"] == 1


# ---- authorization and attachments ----------------------------------------------------------------
async def test_attachments_authorization_and_removed_member(media_server, nursery):
    srv = await media_server()
    alice_l = await srv.api.signup_login("alice")
    bob_l = await srv.api.signup_login("bob")
    carol_l = await srv.api.signup_login("carol")
    alice, bob, carol, anon = Client(srv, alice_l), Client(srv, bob_l), Client(srv, carol_l), Client(srv)
    media = (await alice.upload(jpeg((800, 600)), "team.jpg")).json()["media"]
    urls = [media["url"], media["thumbnails"][0]["url"]]
    for who in (bob, carol):  # not attached anywhere yet: only alice
        for url in urls:
            r = await who.get(url)
            assert r.status_code == 404 and r.json()["error"]["code"] == "no_such_media"
    for url in urls + ["/v1/media/" + "x" * 22, "/v1/media/limits"]:
        r = await anon.get(url)
        assert r.status_code == 401 and r.json()["error"]["code"] == "not_authenticated"
    group = await srv.api.call("POST", "/v1/groups", {"name": "team", "members": [carol_l["user"]["id"]]},
                               token=alice_l["token"])
    gid = group.body["channel"]["id"]
    ca = await open_client(nursery, alice_l["ws_url"], alice_l["token"])
    cc = await open_client(nursery, carol_l["ws_url"], carol_l["token"])
    # bob may not attach alice's upload, even to his own DM with her
    cb = await open_client(nursery, bob_l["ws_url"], bob_l["token"])
    refused = await cb.request({"type": "send", "channel_id": dm(alice_l, bob_l), "client_msg_id": "steal",
                                "body": "", "attachments": [media["id"]]})
    assert refused["type"] == "error" and refused["code"] == "bad_attachment"
    assert (await bob.get(media["url"])).status_code == 404
    # alice attaches it to the group: carol (a member) sees the metadata and may download
    ack = await ca.request({"type": "send", "channel_id": gid, "client_msg_id": "pic", "body": "",
                            "attachments": [media["id"]]})
    assert ack["type"] == "ack", ack
    live = await cc.next_event("message")
    assert live["body"] == "" and [x["id"] for x in live["attachments"]] == [media["id"]]
    assert live["attachments"][0]["thumbnails"][0]["url"] == urls[1]
    for url in urls:
        assert (await carol.get(url)).status_code == 200
    history = await srv.api.call("GET", f"/v1/channels/{gid}/messages", token=carol_l["token"])
    assert history.body["messages"][0]["attachments"][0]["sha256"] == media["sha256"]
    # the same metadata on the WebSocket's history verb and on a sync from cursor 0 (another device)
    ws_history = await cc.request({"type": "history", "channel_id": gid, "limit": 10})
    assert ws_history["messages"][0]["attachments"] == live["attachments"]
    carol2 = await srv.api.login("carol")
    cc2 = await open_client(nursery, carol2["ws_url"], carol2["token"], cursors={gid: 0})
    synced = await cc2.next_event("message")
    assert synced["seq"] == live["seq"] and synced["attachments"] == live["attachments"]
    assert (await bob.get(media["url"])).status_code == 404  # still an outsider
    # carol removed: no more access
    removed = await srv.api.call("DELETE", f"/v1/channels/{gid}/members/{carol_l['user']['id']}",
                                 token=alice_l["token"])
    assert removed.status == 200
    for url in urls:
        r = await carol.get(url)
        assert r.status_code == 404 and r.json()["error"]["code"] == "no_such_media"
    too_many = await ca.request({"type": "send", "channel_id": gid, "client_msg_id": "many", "body": "",
                                 "attachments": [media["id"]] * 11})
    assert too_many["type"] == "error" and too_many["code"] == "bad_field"


async def test_orphans_are_collected_and_released_media_deleted(media_server, nursery):
    srv = await media_server(orphan_ttl_s=60)
    alice_l = await srv.api.signup_login("alice")
    bob_l = await srv.api.signup_login("bob")
    alice = Client(srv, alice_l)
    orphan = (await alice.upload(b"never sent", "o.txt")).json()["media"]
    kept = (await alice.upload(jpeg(), "k.jpg")).json()["media"]
    ca = await open_client(nursery, alice_l["ws_url"], alice_l["token"])
    ack = await ca.request({"type": "send", "channel_id": dm(alice_l, bob_l), "client_msg_id": "k", "body": "look",
                            "attachments": [kept["id"]]})
    assert ack["type"] == "ack"
    media = srv.node.media
    assert await media.collect(now=time.time()) == 0  # younger than the ttl
    assert await media.collect(now=time.time() + 61) == 1
    assert (await alice.get(orphan["url"])).status_code == 404
    assert not any(orphan["id"] in str(p) for p in media_files(srv))
    assert (await alice.get(kept["url"])).status_code == 200
    # the message is deleted (the lifecycle issue calls this): its media goes with it
    [msg] = await srv.node.store.read_messages(dm(alice_l, bob_l), after=0, limit=10)
    assert await media.release_message(msg.channel_id, msg.sender_id, msg.client_msg_id, msg.attachments) == 1
    assert (await alice.get(kept["url"])).status_code == 404
    assert not any(kept["id"] in str(p) for p in media_files(srv))


async def test_deleting_a_message_erases_its_attachments_and_releases_its_media(media_server, nursery):
    """The lifecycle's ``delete`` of a message with an attachment: the upload is deleted (404, no
    file left), and no answer (history, the stored row) names the attachment any more; a reply
    may carry attachments too."""
    srv = await media_server()
    alice_l = await srv.api.signup_login("alice")
    bob_l = await srv.api.signup_login("bob")
    alice = Client(srv, alice_l)
    photo = (await alice.upload(jpeg(), "secret-plan.jpg")).json()["media"]
    other = (await alice.upload(b"notes", "notes.txt")).json()["media"]
    ca = await open_client(nursery, alice_l["ws_url"], alice_l["token"])
    ch = dm(alice_l, bob_l)
    ack = await ca.request({"type": "send", "channel_id": ch, "client_msg_id": "p", "body": "",
                            "attachments": [photo["id"]]})
    assert ack["type"] == "ack"
    reply = await ca.request({"type": "send", "channel_id": ch, "client_msg_id": "r", "body": "see",
                              "reply_to": ack["seq"], "attachments": [other["id"]]})
    assert reply["type"] == "ack"
    [_, r] = await srv.node.store.read_messages(ch, after=0, limit=10)
    assert r.reply_to == ack["seq"] and other["id"] in r.attachments  # a reply keeps its attachments
    assert (await alice.get(photo["url"])).status_code == 200
    gone = await ca.request({"type": "delete", "channel_id": ch, "client_msg_id": "d", "target_seq": ack["seq"]})
    assert gone["type"] == "ack"
    for _ in range(100):  # released right after the delete is stored
        if (await alice.get(photo["url"])).status_code == 404:
            break
        await trio.sleep(0.05)
    assert (await alice.get(photo["url"])).status_code == 404
    assert not any(photo["id"] in str(p) for p in media_files(srv))
    [m, *_] = await srv.node.store.read_messages(ch, after=0, limit=10)
    assert m.deleted_at and m.attachments == ""
    page = await srv.api.call("GET", f"/v1/channels/{ch}/messages?limit=10", token=alice_l["token"])
    assert "secret-plan" not in str(page.body) and photo["id"] not in str(page.body)
    assert (await alice.get(other["url"])).status_code == 200  # the reply's upload stays


async def test_openapi_documents_the_media_routes(media_server):
    srv = await media_server()
    spec = (await srv.api.call("GET", "/openapi.json")).body
    assert {"/v1/media", "/v1/media/{media_id}", "/v1/media/{media_id}/thumbnails/{px}"} <= set(spec["paths"])
    assert "Media" in spec["components"]["schemas"]


def test_push_text_names_the_attachments():
    from chatd.push.service import push_text
    from chatd.store.base import Message
    att = '[{"id":"a","kind":"image","name":"x.jpg"},{"id":"b","kind":"file","name":"report.pdf"}]'
    assert push_text(Message("dm:1:2", 1, 1, "c", "", 1.0, attachments=att)) == "[Photo] [report.pdf]"
    assert push_text(Message("dm:1:2", 1, 1, "c", "look", 1.0, attachments=att)) == "[Photo] [report.pdf] look"
    assert push_text(Message("dm:1:2", 1, 1, "c", "plain", 1.0)) == "plain"
