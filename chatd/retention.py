"""Retention (``[retention]``): messages older than the policy's days are deleted by a background
job on each shard (in ``chatd run``, its one shard) for the channels it owns, every
``sweep_interval_s``.

Policy: ``retention.messages_days`` for every channel, overridden per kind by ``dm_messages_days``
and ``group_messages_days``; 0 keeps forever. A sweep lists the channels (``Store.export_rows``, a
scan), skips those another shard owns (rendezvous hashing, the view in use), and calls
``Store.expire_messages(channel, now - days)``: what is kept is always one gap-free range ending at
the head (the *horizon* is its first seq), so a device whose cursor is below the horizon syncs from
the horizon, and the sync reply says so (``expired``: docs/protocol.md) instead of leaving a gap.
The head seq stays: the channel goes on with head + 1.

Why a job and not Cassandra TTLs: docs/cassandra.md. Resources: one channel page (500) at a time.
Errors: a store failure ends that sweep (logged); the next one starts over. A shard that lost its
ZooKeeper session (not writable) skips its sweeps.
"""

from __future__ import annotations

import logging
import time

import trio

from .config import RetentionConfig

log = logging.getLogger(__name__)

PAGE = 500


class RetentionJob:
    def __init__(self, policy: RetentionConfig, store, discovery, shard_id: str, clock=time.time):
        self.policy = policy
        self.store = store
        self.discovery = discovery
        self.shard_id = shard_id
        self.clock = clock
        self.stats = {"sweeps": 0, "expired": 0, "failed_sweeps": 0}

    @property
    def enabled(self) -> bool:
        p = self.policy
        return any(p.days_for(kind) > 0 for kind in ("dm", "group"))

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Sweep every ``sweep_interval_s`` (the first one at once) until cancelled; nothing at all
        when the policy keeps everything."""
        task_status.started()
        if not self.enabled:
            return
        from .errors import ChatError
        while True:
            if getattr(self.discovery, "writable", True):
                try:
                    await self.sweep()
                except ChatError as e:
                    self.stats["failed_sweeps"] += 1
                    log.warning("retention sweep failed (%s); the next one starts over", e.message)
            await trio.sleep(self.policy.sweep_interval_s)

    async def sweep(self, now: float | None = None) -> int:
        """One pass over the channels this shard owns; returns the messages deleted."""
        now = self.clock() if now is None else now
        deleted, after = 0, None
        while True:
            rows, after = await self.store.export_rows("channels", after, PAGE)
            view = self.discovery.view
            for channel_id, kind, *_ in rows:
                days = self.policy.days_for(kind)
                if days <= 0 or view.owner_of(channel_id) != self.shard_id:
                    continue
                deleted += await self.store.expire_messages(channel_id, now - days * 86400)
            if after is None:
                break
        self.stats["sweeps"] += 1
        self.stats["expired"] += deleted
        if deleted:
            log.info("retention: %d messages expired", deleted)
        return deleted
