"""The push service of one chat process: from "this member has no connected device" to a gateway.

Three tasks, started together by :meth:`PushService.run` (``nursery.start``):

* **writer** - :meth:`PushService.notify_offline` (called by the router on the recipients' home
  shard, synchronously) only puts ``(message, user_ids)`` into a bounded memory channel (at most
  ``queue_max`` items and ``QUEUE_MAX_RECIPIENTS`` recipients in all: one message to a group of 1,000
  is one item of up to 999 recipients); delivery never waits for pushes. The writer drains it in
  batches of at most ``WRITE_BATCH`` items and ``WRITE_BATCH_RECIPIENTS`` recipients, keeps the
  recipients that have push tokens (a short-lived per-user cache) and writes one durable outbox row per (recipient, channel, seq). When the
  channel is full the push is dropped and counted (``dropped``); a store failure is retried three times,
  then dropped and counted.
* **leases** - the outbox is split into ``PUSH_SLOTS`` slots (by recipient). A process sends only the
  slots it holds a lease on (``store.claim_push_slots``, renewed every ``lease_s / 3``). It asks for the
  slots that rendezvous-hash to it over the live shards, so in a cluster each shard sends about 1/n of
  them and a dead shard's slots move to the survivors once its leases expire (``lease_s``); a slot no
  longer ours under the current view is released at once.
* **sender** - reads the held slots' rows (slots it just wrote to at once, every slot every
  ``poll_interval_s`` for rows other processes wrote), groups them by (recipient, channel), and sends a
  group once its oldest row is ``coalesce_window_s`` old: one notification per device token with the
  count and seq range (coalescing). A token's mark (``store.set_push_mark``) records the highest seq
  pushed to it; rows at or below it are never pushed to it again (no duplicate per device and message
  across retries, restarts and lease moves). A group whose every token got a final answer
  (delivered, rejected -> token unregistered, or refused with a 4xx) is deleted from the outbox;
  otherwise it is retried with exponential backoff (``retry_base_s`` doubling up to ``retry_cap_s``,
  jittered) and dropped after ``max_attempts`` (logged, counted ``gave_up``). Attempt counts are kept in
  memory: a restart or a lease move starts counting again. A recipient who has connected a device by
  the time the group is due (``online``, known where the sender is the user's home shard) gets no push.

Exactly-once stops at the HTTP boundary: when a request times out after the gateway took it, the retry
carries the same ``id`` (``X-Chatd-Delivery``), so the gateway can drop it. A crash between a gateway's
answer and the mark write resends that one notification after the restart.

Clocks: outbox times are wall-clock (``now``, default ``time.time``); tests pass trio's clock.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from typing import Callable

import trio

from ..config import PushConfig
from ..discovery import hashing
from ..errors import ChatError
from ..store.base import PUSH_SLOTS, PushEntry, push_slot
from . import payload
from .payload import DELIVERED, FAILED, REJECTED, backoff_s, truncate

log = logging.getLogger(__name__)

WRITE_BATCH = 512  # notify_offline items per outbox write
WRITE_BATCH_RECIPIENTS = 4096  # and recipients (outbox rows at most) per write: a few groups of 1,000
QUEUE_MAX_RECIPIENTS = 256_000  # recipients waiting for the writer (~20 MB); more: dropped, counted
READ_BATCH = 1000  # outbox rows read per slot per pass
TOKEN_CACHE_S = 5.0  # "does this user have push tokens" is cached this long (per process)
STORE_RETRIES = (0.5, 1.0, 2.0)  # the writer's waits before it drops a batch the store refused
LOG_EVERY_S = 10.0


def push_text(m) -> str:
    """A message as a notification's text: its body and a summary of its attachments."""
    if not m.attachments:
        return m.body
    kinds = {"image": "Photo", "audio": "Voice message", "video": "Video"}
    parts = [f"[{kinds.get(a.get('kind'), a.get('name') or 'File')}]" for a in json.loads(m.attachments)]
    return " ".join([*parts, m.body] if m.body else parts)


class PushService:
    def __init__(self, store, config: PushConfig, owner: str, provider, *,
                 shards: Callable[[], list[str]] | None = None, online: Callable[[int], bool] | None = None,
                 now: Callable[[], float] = time.time):
        self.store = store
        self.cfg = config
        self.owner = owner  # the lease owner name: the shard id (a restart renews its own leases)
        self.provider = provider
        self._shards = shards or (lambda: [owner])
        self._online = online or (lambda user_id: False)  # True: a device of the user is connected now
        self._now = now
        self._send, self._recv = trio.open_memory_channel(config.queue_max)
        self._queued = 0  # items accepted by notify_offline
        self._recipients = 0  # recipients of the items accepted and not yet written
        self._written = 0  # items the writer is done with
        self._writer_progress = trio.lowlevel.ParkingLot()
        self._has_tokens: dict[int, tuple[float, bool]] = {}  # user -> (expires, has tokens)
        self._held: dict[int, float] = {}  # slot -> lease end (by our clock)
        self._dirty: set[int] = set()  # slots written since their last read
        self._retry: dict[tuple[int, str], tuple[int, float]] = {}  # group -> (attempts, next try)
        self._due: dict[int, float] = {}  # slot -> earliest known due time of its groups
        self._inflight: set[tuple[int, str]] = set()
        self._limiter = trio.CapacityLimiter(config.max_inflight)
        self._wake = trio.Event()
        self._lease_wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._last_full_read = -math.inf
        self._last_drop_log = -math.inf
        self.stats = {"queued": 0, "dropped": 0, "enqueued": 0, "sent": 0, "rejected": 0, "failed": 0,
                      "retries": 0, "gave_up": 0, "came_online": 0}

    # ---- the hook (synchronous, never blocks) -------------------------------------------------
    def notify_offline(self, message, user_ids) -> None:
        """``message`` reached members ``user_ids`` who have no connected device: push to them."""
        user_ids = list(user_ids)
        try:
            if self._recipients + len(user_ids) > QUEUE_MAX_RECIPIENTS:
                raise trio.WouldBlock
            self._send.send_nowait((message, user_ids, self._now()))
        except (trio.WouldBlock, trio.ClosedResourceError):
            self.stats["dropped"] += len(user_ids)
            if time.monotonic() - self._last_drop_log > LOG_EVERY_S:
                self._last_drop_log = time.monotonic()
                log.warning("push queue full (%d): pushes dropped (%d so far)", self.cfg.queue_max,
                            self.stats["dropped"])
            return
        self._queued += 1
        self._recipients += len(user_ids)
        self.stats["queued"] += len(user_ids)

    def tokens_changed(self, user_id: int) -> None:
        """The user's tokens changed (API in this process): forget the cached answer."""
        self._has_tokens.pop(user_id, None)

    def on_view_change(self, old, new) -> None:
        self._lease_wake.set()

    def statistics(self) -> dict:
        return {**self.stats, "queue": self._queued - self._written, "held_slots": len(self._held),
                "inflight": len(self._inflight), "retrying": len(self._retry)}

    async def flush(self) -> None:
        """Wait until everything notified so far is in the outbox (or dropped)."""
        target = self._queued
        while self._written < target:
            await self._writer_progress.park()

    # ---- tasks ------------------------------------------------------------------------------------
    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the writer, the lease keeper and the sender until cancelled; on the way out, release
        the leases so another shard can take the slots without waiting for them to expire, and
        close the provider's connections."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                await nursery.start(self._lease_loop)
                nursery.start_soon(self._sender)
                task_status.started()
        finally:
            held, self._held = list(self._held), {}
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                if held:
                    try:
                        await self.store.release_push_slots(self.owner, held)
                    except ChatError:
                        pass
                aclose = getattr(self.provider, "aclose", None)
                if aclose is not None:  # the provider's connection pool
                    await aclose()

    # writer
    async def _writer(self) -> None:
        carry = None  # an item that did not fit the last batch: it starts the next
        while True:
            if carry is not None:
                first, carry = carry, None
            else:
                try:
                    first = await self._recv.receive()
                except trio.EndOfChannel:
                    return
            batch = [first]
            recipients = len(first[1])
            while len(batch) < WRITE_BATCH:
                try:
                    item = self._recv.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                if recipients + len(item[1]) > WRITE_BATCH_RECIPIENTS:
                    carry = item
                    break
                batch.append(item)
                recipients += len(item[1])
            try:
                entries = await self._entries_for(batch)
                if entries:
                    await self._store_entries(entries)
            finally:
                self._written += len(batch)
                self._recipients -= recipients
                self._writer_progress.unpark_all()

    async def _entries_for(self, batch) -> list[PushEntry]:
        """The outbox rows of delivered messages; with ``include_body`` the text a notification
        shows: the body, then what is attached ("[Photo]", "[Voice message]", a file's name)."""
        users = {u for _, uids, _ in batch for u in uids}
        with_tokens = await self._users_with_tokens(users)
        body = self.cfg.include_body
        return [PushEntry(u, m.channel_id, m.seq, m.sender_id,
                          truncate(push_text(m), self.cfg.body_max_chars) if body else "", at)
                for m, uids, at in batch for u in uids if u in with_tokens and u != m.sender_id]

    async def _users_with_tokens(self, users: set[int]) -> set[int]:
        now = trio.current_time()
        out, missing = set(), []
        for u in users:
            cached = self._has_tokens.get(u)
            if cached is not None and cached[0] > now:
                if cached[1]:
                    out.add(u)
            else:
                missing.append(u)
        limiter = trio.CapacityLimiter(16)

        async def look(u):
            async with limiter:
                try:
                    has = bool(await self.store.push_tokens(u))
                except ChatError:  # unsure: queue it, the sender looks again
                    out.add(u)
                    return
            self._has_tokens[u] = (now + TOKEN_CACHE_S, has)
            if has:
                out.add(u)
        if missing:
            async with trio.open_nursery() as nursery:
                for u in missing:
                    nursery.start_soon(look, u)
        if len(self._has_tokens) > 100_000:
            self._has_tokens = {u: v for u, v in self._has_tokens.items() if v[0] > now}
        return out

    async def _store_entries(self, entries: list[PushEntry]) -> None:
        for wait in (*STORE_RETRIES, None):
            try:
                await self.store.enqueue_pushes(entries)
            except ChatError as e:
                if wait is None:
                    self.stats["dropped"] += len(entries)
                    log.error("push outbox write failed, %d pushes dropped: %s", len(entries), e)
                    return
                await trio.sleep(wait)
                continue
            self.stats["enqueued"] += len(entries)
            self._dirty.update(push_slot(e.user_id) for e in entries)
            self._wake.set()
            return

    # leases
    def wanted_slots(self) -> list[int]:
        shards = list(self._shards())
        if self.owner not in shards:
            return []
        return [s for s in range(PUSH_SLOTS) if hashing.owner(f"push:{s}", shards) == self.owner]

    async def _lease_loop(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        started = False
        while True:
            self._lease_wake = trio.Event()
            await self._renew()
            if not started:
                started = True
                task_status.started()
            with trio.move_on_after(self.cfg.lease_s / 3):
                await self._lease_wake.wait()

    async def _renew(self) -> None:
        wanted = self.wanted_slots()
        now = self._now()
        previous = set(self._held)
        try:
            held = await self.store.claim_push_slots(self.owner, wanted, self.cfg.lease_s, now)
            gone = sorted(previous - set(wanted))
            if gone:
                await self.store.release_push_slots(self.owner, gone)
        except ChatError as e:
            log.warning("push slot leases not renewed: %s", e)
            self._held = {s: until for s, until in self._held.items() if until > self._now()}
            return
        self._held = {s: now + self.cfg.lease_s for s in held}
        for key in [k for k in self._retry if push_slot(k[0]) not in self._held]:
            del self._retry[key]  # the slot's new holder starts its own count
        new = set(held) - previous
        if new:
            log.info("push: holding %d outbox slots", len(held))
            self._dirty.update(new)
            self._wake.set()

    # sender
    async def _sender(self) -> None:
        while True:
            self._wake = trio.Event()
            next_at = await self._pass()
            delay = min(max(0.0, next_at - self._now()), self.cfg.poll_interval_s)
            with trio.move_on_after(delay):
                await self._wake.wait()

    async def _pass(self) -> float:
        """Start every due group of the slots worth reading now; return when the next one is due."""
        now = self._now()
        full = now - self._last_full_read >= self.cfg.poll_interval_s
        if full:
            self._last_full_read = now
        margin = self.cfg.request_timeout_s * 1.5  # a send must end well inside the lease
        next_at = math.inf
        for slot, until in sorted(self._held.items()):
            due = self._due.get(slot, math.inf)
            if not (full or slot in self._dirty or due <= now) or until - now < margin:
                next_at = min(next_at, due)
                continue
            self._dirty.discard(slot)
            try:
                entries = await self.store.pending_pushes(slot, READ_BATCH)
            except ChatError as e:
                log.warning("push outbox read failed (slot %d): %s", slot, e)
                continue
            slot_next = math.inf
            for key, group in _groups(entries).items():
                if key in self._inflight:
                    continue
                at = min(e.queued_at for e in group) + self.cfg.coalesce_window_s
                retry = self._retry.get(key)
                if retry is not None:
                    at = max(at, retry[1])
                if at <= now:
                    self._inflight.add(key)
                    self._nursery.start_soon(self._deliver, key, group)
                else:
                    slot_next = min(slot_next, at)
            self._due[slot] = slot_next
            next_at = min(next_at, slot_next)
        return next_at

    async def _deliver(self, key: tuple[int, str], group: list[PushEntry]) -> None:
        user_id, channel_id = key
        try:
            if self._online(user_id):  # reconnected meanwhile: the session's sync delivers them
                self.stats["came_online"] += 1
                notes = []
            else:
                tokens = await self.store.push_tokens(user_id)
                marks = await self.store.push_marks(user_id, channel_id) if tokens else {}
                notes = payload.plan(group, tokens, marks)
                if notes and getattr(self.provider, "needs_unread_total", False):
                    unread = sum(c.unread for c in await self.store.channels_of(user_id))
                    notes = [dataclasses.replace(n, unread=unread) for n in notes]
            outcomes: list = [None] * len(notes)

            async def one(i, n):
                async with self._limiter:
                    outcomes[i] = await self.provider.send(n)
            async with trio.open_nursery() as nursery:
                for i, n in enumerate(notes):
                    nursery.start_soon(one, i, n)
            retry = False
            for n, out in zip(notes, outcomes):
                if out.kind in (DELIVERED, FAILED):
                    await self.store.set_push_mark(user_id, channel_id, n.device.token, n.last_seq)
                    if out.kind == DELIVERED:
                        self.stats["sent"] += 1
                    else:
                        self.stats["failed"] += 1
                        log.warning("push to user %d device %s refused (%s); not retried", user_id,
                                    n.device.device_id, out.reason)
                elif out.kind == REJECTED:
                    await self.store.remove_push_token(user_id, n.device.token)
                    self.tokens_changed(user_id)
                    self.stats["rejected"] += 1
                    log.info("push token of user %d device %s rejected by the gateway (%s): unregistered",
                             user_id, n.device.device_id, out.reason)
                else:
                    retry = True
                    log.info("push to user %d device %s failed (%s); will retry", user_id, n.device.device_id,
                             out.reason)
            if retry:
                attempts = self._retry.get(key, (0, 0.0))[0] + 1
                if attempts < self.cfg.max_attempts:
                    self.stats["retries"] += 1
                    wait = backoff_s(attempts, self.cfg.retry_base_s, self.cfg.retry_cap_s)
                    self._retry[key] = (attempts, self._now() + wait)
                    return
                self.stats["gave_up"] += 1
                log.warning("push to user %d for channel %s dropped after %d attempts (seq %d..%d)", user_id,
                            channel_id, attempts, group[0].seq, group[-1].seq)
            await self.store.delete_pushes(user_id, channel_id, group[-1].seq)
            self._retry.pop(key, None)
        except ChatError as e:  # the store, not the gateway: look again at the next poll
            log.warning("push for user %d: store failed: %s", user_id, e)
            attempts = self._retry.get(key, (0, 0.0))[0]
            self._retry[key] = (attempts, self._now() + self.cfg.poll_interval_s)
        finally:
            self._inflight.discard(key)
            self._dirty.add(push_slot(user_id))
            self._wake.set()


def _groups(entries: list[PushEntry]) -> dict[tuple[int, str], list[PushEntry]]:
    out: dict[tuple[int, str], list[PushEntry]] = {}
    for e in entries:
        out.setdefault((e.user_id, e.channel_id), []).append(e)
    for group in out.values():
        group.sort(key=lambda e: e.seq)
    return out
