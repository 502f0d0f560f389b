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

Resources: a send's store call is shielded once it started (it may commit: its fan-out must not
be skipped), so a hung store would hold its task. At most ``MAX_STORING`` such calls of the task
path are under way on this shard; a send beyond that is answered ``unavailable`` at once (the
task-free path is bounded by the store's own queue). Sessions bound theirs per connection too
(chatd/shard/session.py).

Error policy: store failures reach the caller as ``ChatError("unavailable")`` and nothing is
fanned out; membership errors as ``not_member`` / ``no_such_channel`` / ``no_such_user``.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import trio

from ..errors import ChatError
from ..ids import dm_members
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
                 metrics: Metrics, max_idle_channels: int = 200_000):
        self.store = store
        self.membership = membership
        self.deliver = deliver
        self.metrics = metrics
        self._pending: dict[tuple, _Pending] = {}
        self._channels: dict[str, _ChannelState] = {}
        self._max_idle = max_idle_channels
        self._storing = 0  # store calls of the task path under way (at most MAX_STORING)

    async def send(self, sender_id: int, channel_id: str, client_msg_id: str, body: str, on_submit=None,
                   on_stored=None):
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
                                                             time.time(), dm_pair=dm_members(channel_id))
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
        for m in out:
            deliver(m, members)

    def _evict_idle(self) -> None:
        if len(self._channels) <= self._max_idle:
            return
        for cid in [c for c, s in self._channels.items() if s.inflight == 0 and not s.ready][: self._max_idle // 4]:
            del self._channels[cid]
