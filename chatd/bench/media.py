"""``chatd bench media``: uploads through the HTTP API, each attached to a group message and
downloaded by the group's other members, every download's sha256 checked.

The load: ``clients`` users in groups of ``group_size``; each user loops for ``duration_s``:
upload one file of ``media_size`` bytes (a share ``image_share`` of them JPEG photos, which the
server re-encodes and thumbnails; the rest random bytes, stored as they are), send it to its group,
and have every other member download it (the full file, and an image's 320-px thumbnail). Reported:
upload and download MB/s, uploads per second, images processed per second per server CPU core
(the server's CPU time from /proc when it is local), the server's peak RSS (sampled every 0.1 s),
and the corrupted count (a download whose sha256 differs from what the upload answered: must be 0).
Each user's requests go one at a time over its own connection; a failed request is counted and
the loop goes on.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import secrets
import time
from dataclasses import dataclass

import httpx
import trio

from .target import rss_kib

PASSWORD = "bench-password-1"


@dataclass
class MediaOptions:
    api: str
    clients: int = 10
    group_size: int = 5
    duration_s: float = 10.0
    media_size: int = 1024 * 1024
    image_share: float = 0.5
    server_pids: tuple[int, ...] = ()


def _jpeg(size: int, seed: int) -> bytes:
    """A JPEG photo of about ``size`` bytes (noise compresses badly: close to size)."""
    from PIL import Image
    side = max(16, int((size / 1.2) ** 0.5 / 1.0))
    rnd = os.urandom(side * side * 3 // 16)
    im = Image.frombytes("RGB", (side // 4 * 4, side // 4), (rnd * 4)[: (side // 4 * 4) * (side // 4) * 3])
    im = im.resize((side, side))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _stat(pid) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cpu_with_children_s(pid: int) -> float:
    """CPU seconds (user + system) of a local process, of its children it waited for, and of its
    live children (the media workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    own = _stat(pid)
    total = sum(int(x) for x in own[11:15]) if own else 0
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(entry)) is not None and st[1] == str(pid):
            total += int(st[11]) + int(st[12])
    return total / tick


async def _user(http: httpx.AsyncClient, name: str) -> dict:
    await http.post("/v1/users", json={"username": name, "password": PASSWORD})
    r = await http.post("/v1/login", json={"username": name, "password": PASSWORD})
    r.raise_for_status()
    return r.json()


async def run_media(o: MediaOptions, log=lambda line: None) -> dict:
    prefix = f"bm{secrets.token_hex(3)}"
    stats = {"uploads": 0, "images": 0, "upload_bytes": 0, "downloads": 0, "download_bytes": 0,
             "thumbnails_fetched": 0, "corrupted": 0, "failed": 0}
    peak_rss = {"kib": 0}
    cpu0 = sum(cpu_with_children_s(p) for p in o.server_pids)
    async with httpx.AsyncClient(base_url=o.api, timeout=120) as setup:
        users = [await _user(setup, f"{prefix}_{i}") for i in range(o.clients)]
        groups = []
        for g in range(0, len(users), o.group_size):
            members = users[g:g + o.group_size]
            r = await setup.post("/v1/groups", json={"name": f"bench {g}", "members": [u["user"]["id"] for u in members[1:]]},
                                 headers={"Authorization": f"Bearer {members[0]['token']}"})
            r.raise_for_status()
            groups.append((r.json()["channel"]["id"], members))
    files = {"image": _jpeg(o.media_size, 1), "file": os.urandom(o.media_size)}
    log(f"media bench: {o.clients} users, {len(groups)} groups, {o.media_size} B files, "
        f"{o.image_share:.0%} images, {o.duration_s:g} s")
    t0 = time.monotonic()
    deadline = t0 + o.duration_s

    async def member_loop(channel_id, me, others, n):
        from trio_websocket import open_websocket_url
        async with httpx.AsyncClient(base_url=o.api, timeout=120,
                                     headers={"Authorization": f"Bearer {me['token']}"}) as http, \
                open_websocket_url(me["ws_url"]) as ws:
            await ws.send_message(json.dumps({"type": "auth", "id": 1, "token": me["token"]}))
            await ws.get_message()
            i = 0
            rng = random.Random(n)
            while time.monotonic() < deadline:
                i += 1
                kind = "image" if rng.random() < o.image_share else "file"
                try:
                    r = await http.post("/v1/media", params={"name": f"{kind}.bin"}, content=files[kind])
                    r.raise_for_status()
                    media = r.json()["media"]
                    stats["uploads"] += 1
                    stats["upload_bytes"] += len(files[kind])
                    stats["images"] += media["kind"] == "image"
                    await ws.send_message(json.dumps({"type": "send", "id": i + 1, "channel_id": channel_id,
                                                      "client_msg_id": f"{n}-{i}", "body": "",
                                                      "attachments": [media["id"]]}))
                    while True:  # until its answer (frames of the others' sends are read and dropped)
                        frame = json.loads(await ws.get_message())
                        if frame.get("id") == i + 1 and frame["type"] in ("ack", "error"):
                            break
                    if frame["type"] != "ack":
                        raise ValueError(f"send refused: {frame}")
                    for other in others:
                        got = await http.get(media["url"], headers={"Authorization": f"Bearer {other['token']}"})
                        stats["downloads"] += 1
                        stats["download_bytes"] += len(got.content)
                        if got.status_code != 200 or hashlib.sha256(got.content).hexdigest() != media["sha256"]:
                            stats["corrupted"] += 1
                        if media["thumbnails"]:
                            t = await http.get(media["thumbnails"][0]["url"],
                                               headers={"Authorization": f"Bearer {other['token']}"})
                            stats["thumbnails_fetched"] += t.status_code == 200
                except (httpx.HTTPError, KeyError, ValueError):
                    stats["failed"] += 1

    async def sample(done):
        while not done.is_set():
            peak_rss["kib"] = max(peak_rss["kib"], sum(rss_kib(p) or 0 for p in o.server_pids))
            await trio.sleep(0.1)

    done = trio.Event()
    async with trio.open_nursery() as n:
        if o.server_pids:
            n.start_soon(sample, done)
        async with trio.open_nursery() as loops:
            k = 0
            for channel_id, members in groups:
                for me in members:
                    others = [m for m in members if m is not me]
                    loops.start_soon(member_loop, channel_id, me, others, k)
                    k += 1
        done.set()
    elapsed = time.monotonic() - t0
    cpu = sum(cpu_with_children_s(p) for p in o.server_pids) - cpu0 if o.server_pids else None
    report = {"scenario": "media", "elapsed_s": round(elapsed, 2), **stats,
              "upload_mb_s": round(stats["upload_bytes"] / elapsed / 1e6, 2),
              "download_mb_s": round(stats["download_bytes"] / elapsed / 1e6, 2),
              "uploads_per_s": round(stats["uploads"] / elapsed, 2),
              "server_cpu_s": None if cpu is None else round(cpu, 2),
              "server_cpu_ms_per_upload": None if not cpu or not stats["uploads"] else
              round(cpu * 1000 / stats["uploads"], 1),
              "server_peak_rss_mib": round(peak_rss["kib"] / 1024, 1) if o.server_pids else None,
              "ok": stats["corrupted"] == 0 and stats["failed"] == 0}
    report["images_per_s"] = round(stats["images"] / elapsed, 2)
    # images processed per second per core: per CPU second of the server and its workers
    report["images_per_cpu_s"] = round(stats["images"] / cpu, 2) if cpu else None
    return report


def format_report(r: dict) -> str:
    lines = [f"media bench: {r['uploads']} uploads ({r['images']} images) in {r['elapsed_s']} s",
             f"  upload {r['upload_mb_s']} MB/s, download {r['download_mb_s']} MB/s ({r['downloads']} downloads, "
             f"{r['thumbnails_fetched']} thumbnails)",
             f"  images processed {r['images_per_s']}/s",
             f"  corrupted {r['corrupted']}, failed {r['failed']}"]
    if r["server_cpu_s"] is not None:
        lines.append(f"  server CPU {r['server_cpu_s']} s with its media workers ({r['server_cpu_ms_per_upload']} ms per "
                     f"upload; {r['images_per_cpu_s']} images per CPU second), peak RSS {r['server_peak_rss_mib']} MiB")
    return "\n".join(lines)
