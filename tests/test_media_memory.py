"""Memory: uploads are streamed to disk, never held whole -- measured on a real ``chatd run`` OS
process from /proc while 20 clients upload 25 MiB each at once (the issue's bound: the API
server's RSS rises by at most a few tens of MiB, not by the 500 MiB in flight)."""

from __future__ import annotations

import hashlib
import os

import httpx
import pytest
import trio

from tests.helpers import ChatdRun

MIB = 1024 * 1024
UPLOADS = 20
SIZE = 25 * MIB
BOUND = 64 * MIB


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(180)
async def test_twenty_concurrent_25_mib_uploads_keep_rss_bounded(tmp_path):
    run = ChatdRun(tmp_path)
    await run.start()
    try:
        login = await run.api.signup_login("alice")
        block = os.urandom(MIB)
        want = hashlib.sha256(block * (SIZE // MIB)).hexdigest()

        async def body():
            for _ in range(SIZE // MIB):
                yield block

        async with httpx.AsyncClient(base_url=run.api.base, timeout=120,
                                     headers={"Authorization": f"Bearer {login['token']}"},
                                     limits=httpx.Limits(max_connections=UPLOADS)) as http:
            first = await http.post("/v1/media", params={"name": "warm.bin"}, content=body())  # warm-up
            assert first.status_code == 201, first.text
            baseline = rss(run.proc.pid)
            peak = baseline
            answers = []

            async def upload(i):
                r = await http.post("/v1/media", params={"name": f"u{i}.bin"}, content=body())
                answers.append(r)

            async def sample(done):
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, rss(run.proc.pid))
                    await trio.sleep(0.02)
            done = trio.Event()
            async with trio.open_nursery() as n:
                n.start_soon(sample, done)
                async with trio.open_nursery() as uploads:
                    for i in range(UPLOADS):
                        uploads.start_soon(upload, i)
                done.set()
        assert [r.status_code for r in answers] == [201] * UPLOADS
        assert all(r.json()["media"]["sha256"] == want for r in answers)
        print(f"RSS baseline {baseline / MIB:.1f} MiB, peak {peak / MIB:.1f} MiB, "
              f"rise {(peak - baseline) / MIB:.1f} MiB for {UPLOADS * SIZE // MIB} MiB uploaded at once")
        assert peak - baseline < BOUND, f"RSS rose by {(peak - baseline) / MIB:.1f} MiB"
    finally:
        run.proc.terminate()
        await run.wait_exit()
