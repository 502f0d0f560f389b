"""Runs :mod:`chatd.media.worker` on uploaded files, off the event loop and out of the server's
process: a bounded pool of worker processes.

Resource policy: at most ``media.workers`` worker processes, each processing one file at a time
(other uploads wait for a free worker); each runs under ``media.worker_memory_bytes`` of address
space (``RLIMIT_AS``), and a file that takes longer than ``media.worker_timeout_s`` gets its
worker killed (a fresh one is started for the next file). A worker is also replaced after an
out-of-memory, after 200 files or once its RSS grew past 300 MiB, and whenever its answer was not
waited for to the end (the request was cancelled): a worker is reused only in a known state. Idle
workers cost their memory (~30 MiB each, ~50-90 MiB once one decoded audio or video with PyAV) and
nothing else; they exit when the server does (their stdin closes).

Error policy: a worker that dies, is killed or answers nonsense makes the file a plain attachment
(``kind: "file"``, served as ``application/octet-stream``, never inline) with the reason logged
-- an upload is never refused because its processing failed.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import trio

log = logging.getLogger(__name__)

PLAIN = "application/octet-stream"
MAX_ANSWER_BYTES = 1 << 20


class _Worker:
    def __init__(self, proc: trio.Process):
        self.proc = proc
        self.buf = bytearray()

    async def ask(self, request: dict) -> dict:
        await self.proc.stdin.send_all(json.dumps(request).encode() + b"\n")
        while b"\n" not in self.buf:
            chunk = await self.proc.stdout.receive_some(65536)
            if not chunk:
                raise ValueError(f"worker exited (status {self.proc.poll()})")
            self.buf += chunk
            if len(self.buf) > MAX_ANSWER_BYTES:
                raise ValueError("worker answer too long")
        line, _, rest = bytes(self.buf).partition(b"\n")
        self.buf = bytearray(rest)
        out = json.loads(line)
        if not isinstance(out, dict) or out.get("kind") not in ("image", "audio", "video", "file"):
            raise ValueError("not a result")
        return out

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


class Processor:
    def __init__(self, workers: int, timeout_s: float, memory_bytes: int, max_pixels: int):
        self._slots = trio.Semaphore(max(1, workers))
        self._idle: list[_Worker] = []
        self.timeout_s = timeout_s
        self.memory_bytes = memory_bytes
        self.max_pixels = max_pixels
        self.stats = {"processed": 0, "failed": 0, "killed": 0, "started": 0}

    async def _spawn(self) -> _Worker:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-P", "-m", "chatd.media.worker", "--serve", str(self.max_pixels), str(self.memory_bytes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.stats["started"] += 1
        return _Worker(proc)

    async def process(self, src: str, outdir: str) -> dict:
        """What :mod:`chatd.media.worker` says of ``src`` (derived files in ``outdir``)."""
        async with self._slots:
            worker = self._idle.pop() if self._idle else None
            keep = False
            try:
                with trio.move_on_after(self.timeout_s) as scope:
                    if worker is None:
                        worker = await self._spawn()
                    out = await worker.ask({"src": src, "out": outdir})
                    keep = not out.pop("last", True)
                if scope.cancelled_caught:
                    self.stats["killed"] += 1
                    log.warning("media worker killed after %.1f s on %s", self.timeout_s, src)
                    return {"kind": "file", "mime": PLAIN, "reason": "processing took too long"}
            except (ValueError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
                self.stats["failed"] += 1
                log.warning("media worker failed on %s: %s", src, e)
                return {"kind": "file", "mime": PLAIN, "reason": "processing failed"}
            finally:
                if keep:
                    self._idle.append(worker)
                elif worker is not None:
                    worker.kill()
                    with trio.CancelScope(shield=True):
                        await worker.proc.wait()
        self.stats["processed"] += 1
        return out

    async def aclose(self) -> None:
        for w in self._idle:
            w.kill()
            await w.proc.wait()
        self._idle.clear()
