"""Channel ownership on this shard: the write path of ``send``.

For each channel this shard owns, :class:`ChannelOwners`

1. checks that the sender is a member,
2. collapses concurrent resends of one ``client_msg_id`` into one store call,
3. has the store assign the next seq and make the message durable (group commit),
4. fans the committed messages out **in seq order**, even though the trio tasks awaiting their
   commits may resume in any order: results wait in a per-channel reorder buffer until every lower
   seq has been fanned out.

Two ways in, the same steps: :meth:`ChannelOwners.send` (a task awaits each step) and, when every
step can be taken at once -- members cached, channel state loaded, no resend of the same message
in flight, a store that queues without waiting (``Store.submit_append`` answers True) --
:meth:`ChannelOwners.send_nowait`, which queues the append in the caller's step and finishes from
the store's completion callback: no task, no event, no thread hop per send.

The reorder buffer's baseline is the channel's head seq, read from the store the first time the
channel is used here; if some other writer ever advanced the channel (ownership moved), the
buffer would see a hole: it is flushed in order as soon as no send of the channel is in flight,
and devices fill such holes from the store (see the session's gap fill).

Collaborators: the store, the membership cache, and ``deliver(message, member_ids)``, which takes
each message on in seq order (the shard's fan-out, :class:`~chatd.shard.fanout.FanOut`).

The message lifecycle (:meth:`ChannelOwners.append_event`: edit, delete, react, unreact, a send
with ``reply_to``, and the API's system events) takes the same seqs, reorder buffer and fan-out as
sends, by the task path only: the rules (chatd/lifecycle.py) are checked against the target as
stored, under a per-channel lock held from the resend check to the durable append, so two events
of one channel never check against a state the other is changing. :meth:`delete_message` is the
one redaction entry point (a moderator or an erasure job calls it with ``force``).

Resources: a send's store call is shielded once it started (it may commit: its fan-out must not
be skipped), so a hung store would hold its task. At most ``MAX_STORING`` such calls of the task
path are under way on this shard; a send beyond that is answered ``unavailable`` at once (the
task-free path is bounded by the store's own queue). Sessions bound theirs per connection too
(chatd/shard/session.py).

Error policy: store failures reach the caller as ``ChatError("unavailable")`` and nothing is
fanned out; membership errors as ``not_member`` / ``no_such_channel`` / ``no_such_user``; the
lifecycle's as chatd/lifecycle.py lists.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import trio

from .. import lifecycle as lc
from ..errors import ChatError
from ..ids import dm_members, is_group
from ..membership import Membership
from ..metrics import Metrics
from ..store.base import Message, Store

log = logging.getLogger(__name__)

# Store calls of the task path under way at once on one shard (above: ``unavailable`` at once). A
# healthy store holds a few hundred at most (a group commit's worth per busy channel); only a hung
# one reaches this, and then each waiting task costs memory for as long as it hangs.
MAX_STORING = 8192


def _not_acked() -> ChatError:
    return ChatError("unavailable", "the message was not acked; resend it with the same client_msg_id")


class _Pending:
    __slots__ = ("done", "result", "error")

    def __init__(self):
        self.done = trio.Event()
        self.result = None
        self.error = None


class _ChannelState:
    __slots__ = ("loaded", "delivered", "ready", "inflight")

    def __init__(self):
        self.loaded = trio.Event()
        self.delivered = 0  # highest seq fanned out
        self.ready: dict = {}  # seq -> Message, committed but waiting for a lower seq
        self.inflight = 0


class ChannelOwners:
    def __init__(self, store: Store, membership: Membership, deliver: Callable[[Message, object], None],
                 metrics: Metrics, max_idle_channels: int = 200_000, limits=None, on_redacted=None):
        self.store = store
        # async (message) -> None: a message was deleted (its media are released: chatd/media)
        self._on_redacted = on_redacted
        self.membership = membership
        self.deliver = deliver
        self.metrics = metrics
        self.limits = limits  # LimitsConfig (edit window, reaction kinds, body length)
        self._pending: dict[tuple, _Pending] = {}
        self._channels: dict[str, _ChannelState] = {}
        self._max_idle = max_idle_channels
        self._locks: dict[str, trio.Lock] = {}  # channel -> its lifecycle lock (while in use)
        self._extra: dict[tuple, int] = {}  # (seq, channel) -> one more recipient of that row
        self._storing = 0  # store calls of the task path under way (at most MAX_STORING)

    async def append_event(self, user_id: int, channel_id: str, client_msg_id: str, spec: lc.EventSpec,
                           on_stored=None, force: bool = False):
        """Check, store and fan out one lifecycle row (see the module docstring); return the
        store's ``AppendResult`` (a resend: the original, ``duplicate``). System events (from the
        API, after the membership change) and ``force`` (moderation, erasure) skip the member and
        author checks; a system event also goes to ``spec.notify`` (the member removed)."""
        system = spec.kind in lc.SYSTEM
        if not (system or force):  # (a forced delete may come from the operator, user 0)
            await self.membership.require_member(channel_id, user_id)
        lock = self._locks.get(channel_id)
        if lock is None:
            lock = self._locks[channel_id] = trio.Lock()
        try:
            async with lock:
                result = await self._append_event_locked(user_id, channel_id, client_msg_id, spec, system or force)
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting and self._locks.get(channel_id) is lock:
                del self._locks[channel_id]
        if on_stored is not None:
            on_stored(result)
        return result

    async def _append_event_locked(self, user_id, channel_id, client_msg_id, spec, trusted: bool):
        t_arrived = time.perf_counter()
        store = self.store
        original = await store.find_sent(channel_id, user_id, client_msg_id)
        if original is not None:
            return await self._stored_event(channel_id, user_id, client_msg_id, spec, t_arrived)
        target_seq = spec.target_seq or spec.reply_to
        target = await store.get_message(channel_id, target_seq) if target_seq else None
        if not trusted or spec.kind == lc.MESSAGE:
            owner = None
            if spec.kind == lc.DELETE and is_group(channel_id):
                channel = await store.get_channel(channel_id)
                owner = channel.owner_id if channel else None
            limits = self.limits
            lc.check(spec, user_id, target, owner, time.time(), edit_window_s=limits.edit_window_s,
                     max_body_chars=limits.max_body_chars, max_reaction_kinds=limits.max_reaction_kinds)
        elif spec.kind in lc.TARGETED and (target is None or target.kind != lc.MESSAGE or target.deleted_at):
            raise ChatError("no_such_message", f"there is no message {spec.target_seq} to change")
        reply = lc.excerpt(target) if target is not None and spec.reply_to else None
        result = await self._stored_event(channel_id, user_id, client_msg_id, spec, t_arrived, reply)
        if spec.kind == lc.DELETE and target is not None and target.attachments and self._on_redacted is not None:
            try:  # its media go with it (chatd/media); the delete itself is stored and answered
                await self._on_redacted(target)
            except Exception:  # noqa: BLE001 - logged; the uploads stay until an operator looks
                log.exception("releasing the media of deleted message %s/%s failed", channel_id, target.seq)
        return result

    async def _stored_event(self, channel_id, user_id, client_msg_id, spec, t_arrived, reply=None):
        state = await self._state(channel_id)
        state.inflight += 1
        t0 = time.perf_counter()
        with trio.CancelScope(shield=True):  # once queued it may commit: its fan-out must follow
            try:
                result = await self.store.append_event(channel_id, user_id, client_msg_id, spec, time.time(),
                                                       dm_pair=dm_members(channel_id))
            finally:
                state.inflight -= 1
            if reply is not None and not result.duplicate:
                result.message.reply = reply  # (before its fan-out: the live frame quotes the target)
            self._stored(state, result, t0, t_arrived)
            if spec.notify and not result.duplicate:
                self._extra[result.message.seq, channel_id] = spec.notify
            await self._flush(channel_id, state)
        return result

    async def delete_message(self, user_id: int, channel_id: str, seq: int, client_msg_id: str,
                             force: bool = False):
        """Redact message ``seq``: its body, every edit's body and its reactions are erased from
        the store, and a ``delete`` event (by ``user_id``) takes the channel's next seq. ``force``:
        skip the author / owner check (an erasure job or a moderator acting for the service);
        the target must still be a message that is not deleted (``no_such_message``)."""
        return await self.append_event(user_id, channel_id, client_msg_id, lc.EventSpec(lc.DELETE, target_seq=seq),
                                       force=force)

    async def send(self, sender_id: int, channel_id: str, client_msg_id: str, body: str, on_submit=None,
                   on_stored=None, attachments: str = ""):
        """Store and fan out one message; return the store's ``AppendResult``.

        ``on_submit`` is called once the message holds its place in the store's queue (nothing
        between that call and the enqueue yields to other tasks): a session uses it to start its
        next send, so one connection's messages are stored in the order it sent them.
        ``on_stored(result)`` is called as soon as the message is durable, before the fan-out: the
        sender's ack does not wait behind a hundred deliveries."""
        t_arrived = time.perf_counter()
        await self.membership.require_member(channel_id, sender_id)
        key = (channel_id, sender_id, client_msg_id)
        pending = self._pending.get(key)
        if pending is not None:  # the same message is being stored right now
            if on_submit is not None:
                on_submit()
            await pending.done.wait()
            if pending.error is not None:
                raise pending.error
            self.metrics.duplicates.inc()
            self.metrics.send_ack.observe(time.perf_counter() - t_arrived)
            result = type(pending.result)(pending.result.message, duplicate=True)
            if on_stored is not None:
                on_stored(result)
            return result
        if self._storing >= MAX_STORING:
            raise ChatError("unavailable", "the store is not answering this shard's writes; retry")
        pending = self._pending[key] = _Pending()
        self._storing += 1
        try:
            state = await self._state(channel_id)
            state.inflight += 1
            t0 = time.perf_counter()
            if on_submit is not None:
                on_submit()
            # Shielded: once queued, the write may commit; its fan-out must not be skipped because
            # the sender's connection went away meanwhile (the store call is bounded).
            with trio.CancelScope(shield=True):
                try:
                    result = await self.store.append_message(channel_id, sender_id, client_msg_id, body,
                                                             time.time(), dm_pair=dm_members(channel_id),
                                                             **({"attachments": attachments} if attachments else {}))
                finally:
                    state.inflight -= 1
                self._stored(state, result, t0, t_arrived)
                if on_stored is not None:
                    on_stored(result)
                await self._flush(channel_id, state)
            pending.result = result
            return result
        except ChatError as e:
            pending.error = e
            raise
        except BaseException:
            pending.error = _not_acked()
            raise
        finally:
            self._storing -= 1
            del self._pending[key]
            pending.done.set()

    def _stored(self, state: _ChannelState, result, t_store: float, t_arrived: float) -> None:
        """Count a durable append and put a new message in the channel's reorder buffer."""
        now = time.perf_counter()
        self.metrics.store_latency.observe(now - t_store)
        self.metrics.send_ack.observe(now - t_arrived)
        if result.duplicate:
            self.metrics.duplicates.inc()
        else:
            self.metrics.messages_in.inc()
            state.ready[result.message.seq] = result.message

    def send_nowait(self, sender_id: int, channel_id: str, client_msg_id: str, body: str, done) -> bool:
        """:meth:`send` without a task, when nothing has to be waited for: the message takes its
        place in the store's queue before this returns, and ``done(result, error)`` is called once
        it is durable (before the fan-out) or failed. False, with nothing done, when some step
        would wait (or refuse: the caller then uses :meth:`send`, which says why)."""
        members = self.membership.cached(channel_id)
        if members is None or sender_id not in members:
            return False
        key = (channel_id, sender_id, client_msg_id)
        state = self._channels.get(channel_id)
        if key in self._pending or state is None or not state.loaded.is_set():
            return False
        t_arrived = time.perf_counter()
        pending = _Pending()

        def stored(result, error) -> None:  # in the trio thread, once the store is done
            state.inflight -= 1
            del self._pending[key]
            try:
                if error is None:
                    self._stored(state, result, t_arrived, t_arrived)
                    pending.result = result
                else:
                    if not isinstance(error, ChatError):
                        log.error("store append failed: %r", error)
                        error = _not_acked()
                    pending.error = error
                done(result if error is None else None, error)
                # (also after a failure: what earlier sends left in the reorder buffer goes out)
                # members now (an invalidation since may have emptied the cache: then those of
                # the send's start; a member added meanwhile gets it by sync / gap fill)
                self._fan_out_ready(state, self.membership.cached(channel_id) or members)
            finally:
                pending.done.set()

        if not self.store.submit_append(channel_id, sender_id, client_msg_id, body, time.time(),
                                        dm_members(channel_id), stored):
            return False
        self._pending[key] = pending
        state.inflight += 1
        return True

    async def _state(self, channel_id: str) -> _ChannelState:
        state = self._channels.get(channel_id)
        if state is None:
            state = self._channels[channel_id] = _ChannelState()
            try:
                state.delivered = await self.store.head_seq(channel_id)
            except BaseException:
                del self._channels[channel_id]
                state.loaded.set()
                raise
            state.loaded.set()
            self._evict_idle()
        elif not state.loaded.is_set():  # (no checkpoint when loaded: keeps the caller's order)
            await state.loaded.wait()
            if self._channels.get(channel_id) is not state:  # its load failed
                return await self._state(channel_id)
        return state

    async def _flush(self, channel_id: str, state: _ChannelState) -> None:
        """Fan out every message that is next in line; with nothing in flight, everything.

        The only await comes first; taking messages out of the buffer and queueing them to the
        sessions is one synchronous step, so two flushes can never interleave their output."""
        if not state.ready:
            return
        try:
            members = await self.membership.members(channel_id)
        except ChatError as e:  # stored and acked all the same; devices get it by sync / gap fill
            log.warning("fan-out of %s postponed: %s", channel_id, e)
            return
        self._fan_out_ready(state, members)

    def _fan_out_ready(self, state: _ChannelState, members) -> None:
        ready = state.ready
        out = []
        while state.delivered + 1 in ready:
            state.delivered += 1
            out.append(ready.pop(state.delivered))
        if state.inflight == 0 and ready:
            for seq in sorted(ready):
                out.append(ready.pop(seq))
            state.delivered = out[-1].seq
        deliver = self.deliver
        extra = self._extra
        for m in out:
            if extra and (m.seq, m.channel_id) in extra:  # a removal: the one removed hears of it
                deliver(m, members | {extra.pop((m.seq, m.channel_id))})
                continue
            deliver(m, members)

    def _evict_idle(self) -> None:
        if len(self._channels) <= self._max_idle:
            return
        for cid in [c for c, s in self._channels.items() if s.inflight == 0 and not s.ready][: self._max_idle // 4]:
            del self._channels[cid]
