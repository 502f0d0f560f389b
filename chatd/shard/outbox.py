"""What one client connection is sent, in order: its outgoing queue, the writer state machine, the
per-channel delivery cursors (gap fill, sync streaming) and how the connection ends.

Resources and policies

* **Outgoing queue**: every frame to the client (replies, ``message`` events, typing, receipts)
  goes through one bounded queue (``max_queued``: ``limits.send_queue_frames``). A live message
  pushed while nothing is queued is written at once (what the socket takes: no pass, no task);
  anything else :meth:`Outbox.push` queues and marks the outbox for the server's one flusher task
  (chatd/shard/flusher.py), which calls :meth:`Outbox.flush_now` once per pass for every outbox
  marked since its last pass: it writes what the socket takes at once. Only what must wait (a
  full socket, a gap to fill from the store, a sync job, a close) goes to a writer task of this
  connection (in the connection's nursery), which ends when the queue is empty again.
  :meth:`Outbox.push` never blocks: when the queue is full the client is a *slow consumer* and is
  disconnected with close code 1013; it resyncs when it comes back.
* **Replies overtake a waiting writer**: while the writer task waits (a sync job or a gap fill
  reading the store, a full socket), a ``heartbeat``, ``ack`` or ``error`` answering a request
  (one with an ``id``) is not queued behind it: it is framed and joins the bytes gathered for the
  socket at once, written when the socket takes it (whole frames; after what was gathered
  before). Acks and errors may come in any order relative to messages anyway; so a store that
  does not answer delays no heartbeat reply and no send's ``unavailable`` (tests/test_store_down.py).
* **Byte budget**: what is queued for the connection is also counted in bytes (``max_bytes``:
  ``limits.send_queue_bytes``): replies and events are framed when pushed, so their bytes are
  known; a queued message counts its frame (built once per format and shared, as below); bytes
  gathered for the socket and the write in progress count too. While the count is over the
  budget the session's reader reads nothing from the client (:meth:`Outbox.wait_for_room`: a
  client that does not read gets no more served), and if it stays over the budget for
  ``slow_consumer_s`` (a timer on the server's shared wheel, chatd/shard/timers.py) the client is
  a slow consumer: closed with 1013. The live fan-out's direct write (nothing queued) counts
  nothing. Memory per connection is bounded by the budget plus the replies of the requests in
  flight (``limits.max_inflight_requests``, chatd/shard/session.py).
* **Whole frames**: a write to the socket is never cut in the middle of a frame: a close waits up
  to ``SEND_GRACE_S`` for the write in progress (a client that reads again in time gets every
  whole frame and then the close frame); a client that does not read for that long has its TCP
  connection aborted (it sees 1006: no close frame can reach a full buffer).
* **Frames**: WebSocket frames are built with chatd/shard/wsconn.py's :func:`frame`. Server frames
  are unmasked, so a message's frame is the same for every connection: it is built once per
  format and kept on the message (``m.__dict__["_frame_" + fmt]``), shared by every outbox. Frames
  are gathered while the queue has items and written with one send per batch.
* **Per-channel delivery cursor**: the outbox remembers, per channel, the contiguous range of seqs
  ``[floor, cursor]`` it has delivered on this connection. A live message at or below the cursor
  is dropped (never delivered twice); one above ``cursor + 1`` first has the hole filled from the
  store (never a gap). A sync job (:meth:`Outbox.sync`, :meth:`Outbox.resync`) streams what the
  client lacks around that range, in order, a page (``sync_page``) at a time.
* **Membership**: nothing of a channel is streamed to a user who is not its member. A client's
  sync checks each channel (errors per channel; after ``sync_max_errors`` of them the rest are
  answered ``skipped`` without a store read); a server-side resync checks each cursor's channel
  and drops the cursor of a channel the user has left or been removed from (no stream, no
  frame); a ``member_removed`` event for this connection's own user drops that channel's cursor
  the moment it is pushed; a gap fill checks membership before reading the hole.
* **The end**: :meth:`Outbox.close_soon` records the close code and cancels the connection's
  nursery (its reader, its requests, its writer); :meth:`Outbox.close_after` does so once
  everything queued before it is written. After either, :meth:`Outbox.push` drops.
* **Errors**: a store failure while filling a gap or syncing closes with 1013 (the client
  reconnects and syncs; a server-side :meth:`Outbox.resync` skips the channel instead). Any other
  exception met while writing (in :meth:`Outbox.push`'s direct write, the flusher's pass, the
  writer task) is a bug: logged ("session crashed"), counted (``chatd_session_crashes_total``),
  answered with an ``internal`` error frame written directly, and the connection is closed with
  1011; other connections are unaffected.
"""

from __future__ import annotations

import logging
from collections import deque

import trio

from ..errors import ChatError
from ..protocol import client as proto
from ..store.base import Message
from .wsconn import ConnectionClosed, frame

log = logging.getLogger(__name__)

REMOVALS = frozenset({"member_removed", "member_left"})  # log rows that end a member's stream

CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013
SEND_GRACE_S = 2.0  # how long a close waits for the socket write in progress
GONE = frozenset(("not_member", "no_such_channel", "no_such_user"))  # the channel is not the user's (now)

IDLE, MARKED, WRITING, DONE = range(4)  # Outbox._state: who writes the queue next
OVERTAKE = frozenset(("heartbeat", "ack", "error"))  # replies not queued behind a waiting writer


class SyncJob:
    """Stream what the client lacks of ``cursors`` (channel -> the client's last seq)."""
    __slots__ = ("request_id", "cursors", "silent")

    def __init__(self, request_id, cursors: dict, silent: bool = False):
        self.request_id = request_id
        self.cursors = cursors
        self.silent = silent  # a server-side resync: no membership check, no reply frame


class _Close:
    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str):
        self.code, self.reason = code, reason


class _Crash:
    """A bug met outside the writer task: the writer task raises it (logged, 1011)."""
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException):
        self.exc = exc


class Outbox:
    """The outgoing side of one connection. ``flusher``: the server's chatd/shard/flusher.py;
    ``store``, ``membership``, ``metrics``: the node's (gap fill and sync read the store; a sync
    checks membership; slow consumers and crashes are counted). ``user_id`` is set once the
    connection is authenticated (the sync's membership check, the logs)."""

    __slots__ = ("ws", "fmt", "user_id", "close_reason", "_max_queued", "_sync_page", "_flusher", "_store",
                 "_membership", "_metrics", "_queue", "_state", "_out", "_cursors", "_nursery", "_key",
                 "_queued", "_max_bytes", "_slow_s", "_timers", "_over", "_room", "_max_errors")

    def __init__(self, ws, fmt: str, *, max_queued: int, sync_page: int, flusher, store, membership, metrics,
                 max_bytes: int = 4 << 20, slow_consumer_s: float = 10.0, timers=None, sync_max_errors: int = 100):
        self.ws = ws  # chatd/shard/wsconn.py's ServerConnection
        self.fmt = fmt
        self._key = "_frame_" + fmt  # where a Message keeps its frame in this format
        self.user_id: int | None = None
        self.close_reason: tuple[int, str] | None = None
        self._max_queued = max_queued
        self._sync_page = sync_page
        self._flusher = flusher
        self._store = store
        self._membership = membership
        self._metrics = metrics
        self._queue: deque = deque()  # frames, Messages, sync jobs, closes not yet written
        self._state = IDLE
        self._out: list[bytes] = []  # framed bytes waiting for the next write
        self._cursors: dict[str, list[int]] = {}  # channel -> [floor, cursor] delivered here
        self._nursery: trio.Nursery | None = None
        self._queued = 0  # bytes of the queued items and of the write in progress
        self._max_bytes = max_bytes
        self._slow_s = slow_consumer_s
        self._timers = timers  # chatd/shard/timers.py (None: no time bound over the budget)
        self._over = None  # over the byte budget: its slow-consumer timer (True without timers)
        self._room: trio.Event | None = None  # set when back under the budget (a waiting reader)
        self._max_errors = sync_max_errors

    # ---- the connection's life ---------------------------------------------------------------
    def start(self, nursery: trio.Nursery) -> None:
        """The connection's nursery: writer tasks run in it, a close cancels it."""
        self._nursery = nursery
        if self.close_reason is not None:
            nursery.cancel_scope.cancel()

    def stop(self) -> None:
        """The connection's nursery is over: drop what is queued; :meth:`push` drops from now on,
        the flusher skips this outbox."""
        self._state = DONE
        self._queue.clear()
        self._clear_over()

    def close_soon(self, code: int, reason: str) -> None:
        """End the connection with ``code`` (the first reason given wins) without waiting for what
        is queued."""
        if self.close_reason is None:
            self.close_reason = (code, reason)
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()

    def close_after(self, code: int, reason: str) -> None:
        """End the connection with ``code`` once everything queued before is written."""
        self.push(_Close(code, reason))

    # ---- pushing -----------------------------------------------------------------------------
    def push(self, item) -> None:
        """Queue a frame dict or a Message (or a sync job or close); cut the client off if it is
        not reading. Never blocks: a live message with nothing queued before it is written at
        once, anything else in the flusher's next pass (or by the writer task, when one runs)."""
        if self.close_reason is not None or self._state == DONE:
            return
        if len(self._queue) >= self._max_queued:
            self._metrics.slow_consumers.inc()
            self.close_soon(CLOSE_TRY_AGAIN, "slow consumer: send queue full; reconnect and sync")
            return
        if self._state == WRITING and type(item) is dict and item.get("type") in OVERTAKE \
                and item.get("id") is not None:  # a reply: not behind the writer's store read
            try:
                data = frame(proto.dumps(item, self.fmt))
            except Exception as e:  # noqa: BLE001 - a bug: the writer task says so, closes with 1011
                self._queue.append(_Crash(e))
                return
            self._out.append(data)
            self._write_nowait()  # (nothing when the writer's write holds the socket: it writes it next)
            return
        if self._state == IDLE:  # (then nothing is queued or half-written)
            if type(item) is Message:  # a fan-out: written straight away, no pass, no task
                try:
                    if self._deliver_nowait(item):
                        self._write_nowait()
                        if self._out:  # the socket did not take it all: the writer task writes the rest
                            self._start_writer()
                        return
                except Exception as e:  # noqa: BLE001 - a bug: the writer task says so, closes with 1011
                    self._queue.append(_Crash(e))
                    self._start_writer()
                    return
            self._state = MARKED
            self._flusher.mark(self)
        kind = type(item)
        try:
            if kind is dict:
                if item.get("type") == "member_removed" and item.get("user_id") == self.user_id:
                    self._cursors.pop(item.get("channel_id"), None)  # nothing may advance it now
                item = frame(proto.dumps(item, self.fmt))
                self._queued += len(item)
            elif kind is Message:
                self._queued += len(self._frame_of(item))
            elif kind is bytes:  # a pre-built frame (a ping)
                self._queued += len(item)
        except Exception as e:  # noqa: BLE001 - a bug: the writer task says so, closes with 1011
            item = _Crash(e)
        if self._queued > self._max_bytes and self._over is None:
            self._over = True if self._timers is None else self._timers.call_later(self._slow_s, self._still_over)
        self._queue.append(item)

    def sync(self, request_id, cursors: dict) -> None:
        """Queue a client's sync: what it lacks of ``cursors``, then the ``sync`` reply."""
        self.push(SyncJob(request_id, cursors))

    def resync(self) -> None:
        """Re-read every channel this connection follows from its cursor (after a view change or
        dropped link frames): whatever was missed arrives in order, nothing twice; no reply."""
        if self._cursors:
            self.push(SyncJob(None, {ch: st[1] for ch, st in self._cursors.items()}, silent=True))

    def flush_now(self) -> None:
        """The flusher's pass: write what the queue holds if nothing in it must wait and the
        socket takes it all at once; else start the writer task for the rest. Never raises
        (a bug goes to the writer task, which closes with 1011)."""
        if self._state != MARKED:
            return
        self._state = IDLE
        queue = self._queue
        try:
            while queue:
                item = queue[0]
                kind = type(item)
                if kind is bytes:
                    self._out.append(item)
                    self._queued -= len(item)
                elif kind is Message:
                    if not self._deliver_nowait(item):
                        break  # a gap to fill from the store first
                    self._queued -= len(item.__dict__[self._key])
                else:
                    break  # a sync job or a close
                queue.popleft()
            self._write_nowait()
            if self._over is not None:
                self._check_room()
        except Exception as e:  # noqa: BLE001 - a bug: the writer task says so and closes with 1011
            queue.appendleft(_Crash(e))
        if (queue or self._out) and self.close_reason is None:
            self._start_writer()

    # ---- writing -----------------------------------------------------------------------------
    def _write_nowait(self) -> None:
        """Write what the socket takes now of the framed bytes in ``_out``; the rest stays there
        (one piece), for the writer task."""
        if self._out:
            data = b"".join(self._out)
            self._out.clear()
            n = self.ws.write_nowait(data)
            if n < len(data):
                self._out.append(data[n:])

    def _start_writer(self) -> None:
        if self._nursery is None:
            return
        self._state = WRITING
        try:
            self._nursery.start_soon(self._writer_guard)
        except RuntimeError:  # closed: the connection is ending (trio lets others run in that moment)
            self._state = DONE

    def _frame_of(self, m: Message) -> bytes:
        """The message's frame in this format: built once, shared by every connection (a row
        read with reactions says "me" for this connection's user: framed for it alone)."""
        data = m.__dict__.get(self._key)
        if data is None:
            if m.reactions:
                return frame(proto.dumps(proto.message_frame(m, self.user_id), self.fmt))
            data = m.__dict__[self._key] = frame(proto.dumps(proto.message_frame(m), self.fmt))
        return data

    def _emit_message(self, m: Message) -> None:
        data = m.__dict__.get(self._key)  # framed once per format, shared by every connection
        if data is None:
            data = self._frame_of(m)
        self._out.append(data)
        self._flusher.messages_out.pending += 1  # (folded into the counter when it is read)

    # ---- the byte budget ---------------------------------------------------------------------
    def pending_bytes(self) -> int:
        """Bytes queued for this connection and not yet taken by the socket."""
        return self._queued + sum(map(len, self._out))

    def _check_room(self) -> None:
        """Back under the budget: the slow-consumer timer is off, a waiting reader reads again."""
        if self.pending_bytes() <= self._max_bytes:
            self._clear_over()

    def _clear_over(self) -> None:
        over, self._over = self._over, None
        if over is not None and over is not True:
            self._timers.cancel(over)
        if self._room is not None:
            self._room.set()
            self._room = None

    def _still_over(self) -> None:
        """The timer: over the budget since ``slow_consumer_s`` ago (unless it was under meanwhile)."""
        self._over = None
        if self._state == DONE or self.close_reason is not None:
            return
        if self.pending_bytes() > self._max_bytes:
            self._metrics.slow_consumers.inc()
            self.close_soon(CLOSE_TRY_AGAIN, "slow consumer: too many bytes queued; reconnect and sync")
        else:
            self._clear_over()

    async def wait_for_room(self) -> None:
        """Return once what is queued is under the byte budget (the session's reader waits here:
        TCP backpressure on this client only); a close cancels the wait."""
        while self._over is not None:
            if self._room is None:
                self._room = trio.Event()
            await self._room.wait()

    async def _flush(self) -> None:
        self._write_nowait()
        if self._out:
            data = self._out.pop()
            n = len(data)
            self._queued += n  # (still this connection's until the socket takes it)
            try:
                # Never cancelled mid-frame (the close frame that follows would be garbage to the
                # client): a close waits for this write, at most SEND_GRACE_S, then aborts the TCP
                # connection of a client that is not reading.
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(SEND_GRACE_S) as grace:
                        await self.ws.send_raw(data)
            finally:
                self._queued -= n
            if grace.cancelled_caught:
                await self.ws.abort()
                raise ConnectionClosed(self.ws.closed)
        if self._over is not None:
            self._check_room()

    async def _writer_guard(self) -> None:
        try:
            await self._writer()
            if self.close_reason is None:  # all written: the flusher writes what comes next
                self._state = IDLE
                return
        except ConnectionClosed:
            pass
        except ChatError as e:  # store failure while syncing: tell the client, let it retry
            log.warning("closing session of user %s: %s", self.user_id, e)
            self.close_soon(CLOSE_TRY_AGAIN, "server could not read the store; reconnect and sync")
        except Exception as e:  # noqa: BLE001 - a bug in the writer: say so if we still can
            log.error("session crashed (user %s): writer failed, closing with 1011", self.user_id, exc_info=e)
            self._metrics.session_crashes.inc()
            self._metrics.errors.inc(code="internal")
            self.close_soon(CLOSE_INTERNAL, "internal server error")
            self._out.clear()
            with trio.CancelScope(shield=True), trio.move_on_after(SEND_GRACE_S):
                try:
                    await self.ws.send_raw(frame(proto.dumps(
                        proto.error_frame("internal", "internal server error; please report it"), self.fmt)))
                except ConnectionClosed:
                    pass
        self._nursery.cancel_scope.cancel()

    async def _writer(self) -> None:
        """The rest of what the flusher could not write at once, in order; ends (handing the queue
        back to the flusher) when the queue is empty and everything is written."""
        queue = self._queue
        await self._flush()
        while queue and self.close_reason is None:
            for _ in range(256):
                item = queue.popleft()
                kind = type(item)
                if kind is bytes:
                    self._queued -= len(item)
                    self._out.append(item)
                elif kind is Message:
                    self._queued -= len(item.__dict__[self._key])
                    await self._deliver_live(item)
                elif isinstance(item, SyncJob):
                    await self._run_sync(item)
                elif isinstance(item, _Close):  # everything queued before it has been sent
                    await self._flush()
                    self.close_soon(item.code, item.reason)
                    return
                elif isinstance(item, _Crash):
                    raise item.exc
                else:
                    raise TypeError(f"cannot send {type(item).__name__}")
                if not queue:
                    break
            await self._flush()

    # ---- delivery cursors --------------------------------------------------------------------
    def _deliver_nowait(self, m: Message) -> bool:
        """:meth:`_deliver_live` when it needs no store read; False (nothing done) when it does."""
        st = self._cursors.get(m.channel_id)
        if st is None:
            self._cursors[m.channel_id] = [m.seq, m.seq]
        elif m.seq <= st[1]:
            return True  # delivered already (by sync or gap fill)
        elif m.seq > st[1] + 1:
            return False
        else:
            st[1] = m.seq
        self._emit_message(m)
        if m.meta is not None and m.kind in REMOVALS:
            self._removed(m)
        return True

    def _removed(self, m: Message) -> None:
        """A ``member_removed`` / ``member_left`` row: when it is this user's, it was the last
        frame of that channel for this connection (nothing may advance its cursor now)."""
        if m.meta.get("user_id") == self.user_id:
            self._cursors.pop(m.channel_id, None)

    async def _deliver_live(self, m: Message) -> None:
        st = self._cursors.get(m.channel_id)
        if st is None:
            self._cursors[m.channel_id] = [m.seq, m.seq]
            self._emit_message(m)
            return
        if m.seq <= st[1]:
            return  # delivered already (by sync or gap fill)
        if m.seq > st[1] + 1:  # a hole: read only for a member (a live message should prove it)
            try:
                await self._membership.require_member(m.channel_id, self.user_id)
            except ChatError as e:
                if e.code not in GONE:
                    raise
                self._cursors.pop(m.channel_id, None)
                return
            await self._stream(m.channel_id, st[1], m.seq - 1, st)
        if m.seq > st[1]:
            self._emit_message(m)
            st[1] = m.seq
            if m.meta is not None and m.kind in REMOVALS:
                self._removed(m)

    async def _stream(self, channel_id: str, after: int, upto: int | None, st: list | None) -> int | None:
        """Send stored messages with ``after < seq <= upto`` in order; advance ``st`` if given.
        Returns the first seq sent (None if none): above ``after + 1`` when retention deleted the
        messages in between."""
        page = self._sync_page
        store = self._store
        first = None
        while True:
            msgs = await store.read_messages(channel_id, after=after,
                                             before=None if upto is None else upto + 1, limit=page)
            if first is None and msgs:
                first = msgs[0].seq
            for m in msgs:
                self._emit_message(m)
                if st is not None:
                    st[1] = m.seq
            await self._flush()  # a page at a time: a big sync never piles up in memory
            if len(msgs) < page:
                return first
            after = msgs[-1].seq

    async def _sync_channel(self, channel_id: str, client_cursor: int) -> tuple[int, int | None]:
        """Stream what the client lacks; return the new cursor, and the retention horizon (the
        first kept seq) when messages the client lacks were expired (None otherwise)."""
        head = await self._store.head_seq(channel_id)
        c = min(client_cursor, head)
        st = self._cursors.get(channel_id)
        if st is None:
            st = self._cursors[channel_id] = [c + 1, c]
            lacks_from, first = c, await self._stream(channel_id, c, None, st)
        elif c + 1 < st[0]:  # older than anything delivered on this connection
            lacks_from, first = c, await self._stream(channel_id, c, st[0] - 1, None)
            if first is None:
                first = st[0]  # nothing kept below what this connection delivered
            st[0] = c + 1
            st[1] = max(st[1], c)
            await self._stream(channel_id, st[1], None, st)
        else:
            st[1] = max(st[1], c)
            lacks_from = st[1]
            first = await self._stream(channel_id, st[1], None, st)
        if first is None and st[1] < head:
            first = head + 1  # every message it lacks was expired: it is at the head
            st[1] = head
        return st[1], first if first is not None and first > lacks_from + 1 else None

    async def _run_sync(self, job: SyncJob) -> None:
        membership = self._membership
        if job.silent:  # a server-side resync: no frame; a channel no longer the user's is forgotten
            for channel_id, cursor in job.cursors.items():
                try:
                    await membership.require_member(channel_id, self.user_id)
                except ChatError as e:
                    if e.code in GONE:
                        self._cursors.pop(channel_id, None)
                    continue
                try:
                    await self._sync_channel(channel_id, cursor)
                except ChatError:
                    pass
            return
        synced, errors, expired = {}, {}, {}
        max_errors = self._max_errors
        for channel_id, cursor in job.cursors.items():
            if len(errors) >= max_errors:  # a sync of unknown channels costs no more store reads
                errors[channel_id] = "skipped"
                continue
            try:
                await membership.require_member(channel_id, self.user_id)
                synced[channel_id], horizon = await self._sync_channel(channel_id, cursor)
                if horizon is not None:
                    expired[channel_id] = horizon
            except ChatError as e:
                errors[channel_id] = e.code
        try:
            heads = {c.id: c.last_seq for c in await self._store.channels_of(self.user_id)}
        except ChatError:
            heads = {}
        reply = {"type": "sync", "id": job.request_id, "cursors": synced, "heads": heads}
        if errors:
            reply["errors"] = errors
        if expired:
            reply["expired"] = expired
        self._out.append(frame(proto.dumps(reply, self.fmt)))
