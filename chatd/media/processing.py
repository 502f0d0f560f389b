"""Runs :mod:`chatd.media.worker` on an uploaded file, off the event loop and out of the server's
process: a bounded pool of one-shot worker processes.

Resource policy: at most ``media.workers`` files are processed at once (others wait for a slot,
the upload's request waiting with them); each worker runs under ``media.worker_memory_bytes`` of
address space and ``media.worker_timeout_s`` of CPU and of wall-clock time (killed at the
deadline). One process per file costs an interpreter start (about 0.1-0.2 s of CPU with Pillow) and
buys what a long-lived pool cannot give cheaply: a worker that a crafted file crashed, hung or
bloated is simply gone, and the next file gets a fresh one.

Error policy: a worker that dies, is killed or prints nonsense makes the file a plain attachment
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


class Processor:
    def __init__(self, workers: int, timeout_s: float, memory_bytes: int, max_pixels: int):
        self._slots = trio.Semaphore(max(1, workers))
        self.timeout_s = timeout_s
        self.memory_bytes = memory_bytes
        self.max_pixels = max_pixels
        self.stats = {"processed": 0, "failed": 0, "killed": 0}

    async def process(self, src: str, outdir: str) -> dict:
        """What :mod:`chatd.media.worker` says of ``src`` (derived files in ``outdir``)."""
        async with self._slots:
            cmd = [sys.executable, "-P", "-m", "chatd.media.worker", src, outdir, str(self.max_pixels),
                   str(self.memory_bytes), str(max(1, int(self.timeout_s)))]
            result = None
            with trio.move_on_after(self.timeout_s):
                result = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False,
                                                stdin=subprocess.DEVNULL)
            if result is None:
                self.stats["killed"] += 1
                log.warning("media worker killed after %.1f s on %s", self.timeout_s, src)
                return {"kind": "file", "mime": PLAIN, "reason": "processing took too long"}
        try:
            if result.returncode != 0:
                raise ValueError(f"exit status {result.returncode}: {result.stderr[-300:]!r}")
            out = json.loads(result.stdout)
            if not isinstance(out, dict) or out.get("kind") not in ("image", "audio", "video", "file"):
                raise ValueError("not a result")
        except ValueError as e:
            self.stats["failed"] += 1
            log.warning("media worker failed on %s: %s", src, e)
            return {"kind": "file", "mime": PLAIN, "reason": "processing failed"}
        self.stats["processed"] += 1
        return out
