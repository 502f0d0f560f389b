"""The media contract, one suite for every backend: ``fs`` (files under the data dir) and ``s3`` (a
real SeaweedFS from tests/s3_server.py, SigV4-checked, one bucket per test): objects round-trip
byte for byte, ranges are exact, deletes delete, a large object goes up in parts; the same through
a running ``chatd run``; and, on ``s3``, a cluster whose two ``chatd api`` servers share the bucket
(with SQLite and with a real Cassandra as the store)."""

from __future__ import annotations

import hashlib
import io
import os

import httpx
import pytest
import trio
from PIL import Image

from chatd.media.backend import FsBackend, MissingObject
from chatd.media.s3 import S3Backend
from tests.cluster import Cluster
from tests.helpers import RunningServer, dm, free_port, make_config, open_client

PART = 5 * 1024 * 1024  # the smallest part S3 allows: a 12 MiB object is three parts


@pytest.fixture(params=["fs", "s3"])
def media_settings(request, tmp_path):
    """``[media]`` settings of the backend under test."""
    if request.param == "fs":
        return {"backend": "fs"}
    server = request.getfixturevalue("s3_server")
    return server.media(request.getfixturevalue("s3_bucket"), s3_part_bytes=PART)


def open_backend(settings, tmp_path):
    if settings["backend"] == "fs":
        return FsBackend(tmp_path / "objects")
    return S3Backend(settings["s3_endpoint"], settings["s3_bucket"], settings["s3_region"], settings["s3_access_key"],
                     settings["s3_secret_key"], part_bytes=settings["s3_part_bytes"])


async def read_all(backend, key, start, end) -> bytes:
    return b"".join([chunk async for chunk in backend.read(key, start, end)])


@pytest.mark.parametrize("size", [0, 1, 300_000, 12 * 1024 * 1024 + 5])
async def test_objects_round_trip_with_exact_ranges(media_settings, tmp_path, size):
    backend = open_backend(media_settings, tmp_path)
    data = os.urandom(size)
    src = tmp_path / "upload"
    src.write_bytes(data)
    await backend.put(f"m1/{size}.bin", str(src), size, "application/octet-stream")
    assert not src.exists()  # the local file is consumed
    assert await read_all(backend, f"m1/{size}.bin", 0, size) == data
    for start, end in ((0, 1), (size // 3, size // 2 + 1), (size - 7, size), (PART - 3, PART + 3)):
        if 0 <= start < end <= size:
            assert await read_all(backend, f"m1/{size}.bin", start, end) == data[start:end]
    await backend.delete(f"m1/{size}.bin")
    with pytest.raises(MissingObject):
        await read_all(backend, f"m1/{size}.bin", 0, max(size, 1))
    await backend.delete(f"m1/{size}.bin")  # deleting what is gone is no error
    await backend.aclose()


async def test_s3_requests_are_really_signed(s3_server, s3_bucket, tmp_path):
    wrong = S3Backend(s3_server.endpoint, s3_bucket, s3_server.region, s3_server.access_key, "not-the-secret")
    (tmp_path / "f").write_bytes(b"abc")
    with pytest.raises(Exception) as info:
        await wrong.put("k", str(tmp_path / "f"), 3, "text/plain")
    assert getattr(info.value, "code", None) == "unavailable"
    await wrong.aclose()


async def test_upload_and_download_through_chatd(media_settings, nursery, tmp_path):
    cfg = make_config(tmp_path)
    cfg.update({"media": media_settings}, source="test")
    cfg.validate()
    srv = await RunningServer(nursery, cfg).start()
    login = await srv.api.signup_login("alice")
    auth = {"Authorization": f"Bearer {login['token']}"}
    data = os.urandom(7 * 1024 * 1024 + 3)
    async with httpx.AsyncClient(base_url=srv.info.api_url, timeout=60, headers=auth) as http:
        media = (await http.post("/v1/media", params={"name": "big.bin"}, content=data)).json()["media"]
        assert media["sha256"] == hashlib.sha256(data).hexdigest() and media["size"] == len(data)
        got = await http.get(media["url"])
        assert hashlib.sha256(got.content).hexdigest() == media["sha256"]
        part = await http.get(media["url"], headers={"Range": "bytes=5242870-5242889"})
        assert part.status_code == 206 and part.content == data[5242870:5242890]
        im = io.BytesIO()
        Image.new("RGB", (1000, 700), "purple").save(im, "PNG")
        photo = (await http.post("/v1/media", params={"name": "p.png"}, content=im.getvalue())).json()["media"]
        thumb = await http.get(photo["thumbnails"][0]["url"])
        assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).size == (320, 224)
    await srv.stop()


async def test_cluster_upload_through_one_api_download_through_another(zk, tmp_path, nursery, s3_server, s3_bucket,
                                                                       store_toml):
    """On both stores (a shared SQLite file; a real Cassandra): the media records are the store's."""
    c = Cluster(zk, tmp_path, n=1, extra=s3_server.toml(s3_bucket, s3_part_bytes=PART), store_toml=store_toml)
    try:
        await c.start()
        api2_port = free_port()
        c._spawn("api2", ["api", "--api-port", str(api2_port)])
        alice = await c.api.signup_login("alice")
        bob = await c.api.signup_login("bob")
        data = os.urandom(6 * 1024 * 1024)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{c.api_port}", timeout=60) as api1, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{api2_port}", timeout=60) as api2:
            up = await api1.post("/v1/media", params={"name": "clip.bin"}, content=data,
                                 headers={"Authorization": f"Bearer {alice['token']}"})
            media = up.json()["media"]
            ca = await open_client(nursery, alice["ws_url"], alice["token"])
            ack = await ca.request({"type": "send", "channel_id": dm(alice, bob), "client_msg_id": "m1", "body": "",
                                    "attachments": [media["id"]]})
            assert ack["type"] == "ack", ack
            with trio.fail_after(30):
                while True:
                    try:
                        got = await api2.get(media["url"], headers={"Authorization": f"Bearer {bob['token']}"})
                        break
                    except httpx.TransportError:  # api2 still starting
                        await trio.sleep(0.2)
            assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == media["sha256"]
            outsider = await c.api.signup_login("eve")
            denied = await api2.get(media["url"], headers={"Authorization": f"Bearer {outsider['token']}"})
            assert denied.status_code == 404
    finally:
        c.stop()


async def test_s3_presigned_mode_redirects_authorized_downloads(nursery, tmp_path, s3_server, s3_bucket):
    cfg = make_config(tmp_path)
    cfg.update({"media": s3_server.media(s3_bucket, s3_presign_s=120)}, source="test")
    cfg.validate()
    srv = await RunningServer(nursery, cfg).start()
    alice = await srv.api.signup_login("alice")
    eve = await srv.api.signup_login("eve")
    data = os.urandom(300_000)
    async with httpx.AsyncClient(base_url=srv.info.api_url, timeout=60) as http:
        media = (await http.post("/v1/media", params={"name": "r.bin"}, content=data,
                                 headers={"Authorization": f"Bearer {alice['token']}"})).json()["media"]
        r = await http.get(media["url"], headers={"Authorization": f"Bearer {alice['token']}"})
        assert r.status_code == 302 and r.headers["location"].startswith(s3_server.endpoint)
        # the presigned URL needs no credentials, and the bucket answers with chatd's headers
        got = await http.get(r.headers["location"])
        assert got.status_code == 200 and got.content == data
        assert got.headers["content-type"] == "application/octet-stream"
        assert got.headers["content-disposition"].startswith("attachment")
        part = await http.get(r.headers["location"], headers={"Range": "bytes=10-19"})
        assert part.status_code == 206 and part.content == data[10:20]
        # tampering with the signed overrides breaks the signature
        forged = r.headers["location"].replace("attachment", "inline")
        assert (await http.get(forged)).status_code == 403
        # no redirect for someone who may not read it
        denied = await http.get(media["url"], headers={"Authorization": f"Bearer {eve['token']}"})
        assert denied.status_code == 404
    await srv.stop()
