"""One client WebSocket connection: one task (its reader), one method per client verb.

Resources and policies

* **Per connection**, idle and authenticated: one task (the connection's handler, which reads),
  the :class:`Session` (``__slots__``), its wsproto connection (chatd/shard/wsconn.py), a rate
  bucket, an empty queue and cursor dict, and one timer handle on the server's shared timer
  wheel (chatd/shard/timers.py: the auth timeout, then the token's expiry). What a send needs
  (its semaphore, the answer clock and its task) is made with the connection's first send; a
  task per request only for requests that wait (history, presence, a cold send, ...).
  tests/test_session_resources.py counts the tasks.
* **Outgoing queue**: every frame to the client (replies, ``message`` events, typing, receipts)
  goes through one bounded queue (``limits.send_queue_frames``). A live message pushed while
  nothing is queued is written at once (what the socket takes); anything else :meth:`push`
  queues and marks the session for the server's one flusher task (chatd/shard/flusher.py),
  which writes what the socket takes at once for every session marked since its last pass;
  only what must wait (a full socket, a gap to fill from the store, a sync job, a close) goes
  to a writer task of this session, which ends when the queue is empty again. :meth:`push`
  never blocks: when the queue is full the client is a *slow consumer* and is disconnected
  with close code 1013; it resyncs when it comes back. Memory per connection is bounded by the
  queue size. A write to the socket is never cut in the middle of a frame: a
  close waits up to ``SEND_GRACE_S`` for the write in progress (a client that reads again in
  time gets every whole frame and then the close frame); a client that does not read for that
  long has its TCP connection aborted (it sees 1006: no close frame can reach a full buffer).
* **Per-channel delivery cursor**: the writer remembers, per channel, the contiguous range of
  seqs ``[floor, cursor]`` it has delivered on this connection. A live message at or below the
  cursor is dropped (never delivered twice); one above ``cursor + 1`` first has the hole filled
  from the store (never a gap). ``sync`` streams what the client lacks around that range, in
  order.
* **Incoming**: a token bucket over all frames (``rate_limited`` errors; a flood of them closes
  with 1008); at most ``max_inflight_sends`` sends in flight (the reader then waits: TCP
  backpressure on that client only). Bad frames get an ``error`` frame and the connection goes on.
* **Auth**: nothing but ``auth`` is served before it succeeds; a connection that has not
  authenticated within ``auth_timeout_s`` is closed with 1008. A token revoked by a logout is
  refused (store record, chatd/revocation.py); when the token expires, or another connection
  logs the device out, the connection gets an ``error`` frame and is closed with 4001.
* **Bugs**: any exception that is not a :class:`ChatError` is a bug. It is logged ("session
  crashed"), counted (``chatd_session_crashes_total``), answered with an ``internal`` error frame
  and the connection is closed with 1011 once what is queued is sent; other connections and the
  stored data are unaffected.

Close codes: 1000 after the client's own ``logout``, 1001 server going away, 1007 text frame that
is not UTF-8 and 1002 protocol violation (chatd/shard/wsconn.py), 1008 policy (auth timeout,
flood, repeated bad tokens), 1009 frame above the hard cap, 1011 server bug, 1013 slow consumer
or shard not ready, 4001 token expired or revoked (log in again).
"""

from __future__ import annotations

import logging
import time
from collections import deque

import trio
from trio_websocket import ConnectionClosed
from wsproto.frame_protocol import FrameProtocol

from .. import revocation
from ..auth import token_claims
from ..errors import ChatError
from ..ids import dm_members
from ..protocol import client as proto
from ..store.base import Message
from .answers import AnswerClock
from .router import RETRY_AFTER_MS
from ..store.pages import read_page

log = logging.getLogger(__name__)

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013
CLOSE_LOG_IN_AGAIN = 4001  # token expired or revoked (logout of this device elsewhere)
MAX_BAD_TOKENS = 5
SEND_GRACE_S = 2.0  # how long a close waits for the socket write in progress


class _SyncJob:
    __slots__ = ("request_id", "cursors", "silent")

    def __init__(self, request_id, cursors: dict, silent: bool = False):
        self.request_id = request_id
        self.cursors = cursors
        self.silent = silent  # a server-side resync: no reply frame


_FRAMER = FrameProtocol(client=False, extensions=[])


def frame(payload: str | bytes) -> bytes:
    """One unmasked, unfragmented server WebSocket frame (text for str, binary for bytes)."""
    return bytes(_FRAMER.send_data(payload, fin=True))


class _Close:
    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str):
        self.code, self.reason = code, reason


class _Crash:
    """A bug met by the flusher's pass: the writer task raises it (logged, 1011)."""
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException):
        self.exc = exc


IDLE, MARKED, WRITING, DONE = range(4)  # Session._wstate: who writes the queue next


def _ack(req: proto.Send, result) -> dict:
    """The ``ack`` of a stored send (``result``: the store's AppendResult)."""
    m = result.message
    return {"type": "ack", "id": req.id, "channel_id": m.channel_id, "seq": m.seq,
            "client_msg_id": m.client_msg_id, "created_at": m.created_at, "duplicate": result.duplicate}


def _retryable(error: ChatError) -> ChatError:
    """A send's error as answered: ``unavailable`` always says when to resend."""
    if error.code == "unavailable" and "retry_after_ms" not in error.details:
        error.details["retry_after_ms"] = RETRY_AFTER_MS
    return error


class Session:
    __slots__ = ("node", "ws", "fmt", "limits", "_flusher", "_timers", "_queue", "_wstate", "user_id", "device_id",
                 "token_key", "_token_exp", "_cursors", "_bucket", "_limited_in_row", "_bad_tokens", "_inflight",
                 "_answers", "_last_send", "_subscribed", "_out", "_nursery", "close_reason", "_timer")

    def __init__(self, node, ws, fmt: str, flusher, timers):
        self.node = node
        self.ws = ws
        self.fmt = fmt
        self.limits = node.config.limits
        self._flusher = flusher  # chatd/shard/flusher.py: writes what push() queued, for all sessions
        self._timers = timers  # chatd/shard/timers.py: the auth timeout, then the token's expiry
        self._queue: deque = deque()  # frames, Messages, sync jobs, closes not yet written
        self._wstate = IDLE
        self.user_id: int | None = None
        self.device_id: str | None = None
        self.token_key: str | None = None
        self._token_exp: float | None = None
        self._cursors: dict[str, list[int]] = {}  # channel -> [floor, cursor] delivered here
        self._bucket = node.rate_bucket()
        self._limited_in_row = 0
        self._bad_tokens = 0
        # Made with the first send (an idle connection has none of them):
        self._inflight: trio.Semaphore | None = None
        self._answers: AnswerClock | None = None
        self._last_send: dict[str, trio.Event] | None = None  # channel -> its last send's 'submitted' event
        self._subscribed: set[int] | None = None  # explicit presence subscriptions of this connection
        self._out: list[bytes] = []  # framed bytes waiting for the next write
        self._nursery: trio.Nursery | None = None
        self.close_reason: tuple[int, str] | None = None
        self._timer = None

    # ---- outgoing --------------------------------------------------------------------------
    def push(self, item) -> None:
        """Queue a frame dict, a Message or a sync job; cut the client off if it is not reading.
        Never blocks: the flusher writes it in its next pass (or this session's writer task, when
        one is running)."""
        if self.close_reason is not None or self._wstate == DONE:
            return
        if len(self._queue) >= self.limits.send_queue_frames:
            self.node.metrics.slow_consumers.inc()
            self.close_soon(CLOSE_TRY_AGAIN, "slow consumer: send queue full; reconnect and sync")
            return
        if self._wstate == IDLE:  # (then nothing is queued or half-written)
            if type(item) is Message:  # a fan-out: written straight away, no pass, no task
                try:
                    if self._deliver_nowait(item):
                        self._write_out()
                        return
                except Exception as e:  # noqa: BLE001 - a bug: the writer task says so, closes with 1011
                    self._queue.append(_Crash(e))
                    self._start_writer()
                    return
            self._wstate = MARKED
            self._flusher.mark(self)
        self._queue.append(item)

    def _flush_now(self) -> None:
        """Called by the flusher: write what the queue holds if nothing in it must wait and the
        socket takes it all at once; else start this session's writer task for the rest."""
        if self._wstate != MARKED:
            return
        self._wstate = IDLE
        queue = self._queue
        try:
            while queue:
                item = queue[0]
                if isinstance(item, Message):
                    if not self._deliver_nowait(item):
                        break  # a gap to fill from the store first
                elif isinstance(item, dict):
                    self._emit(proto.dumps(item, self.fmt))
                else:
                    break  # a sync job or a close
                queue.popleft()
            self._write_nowait()
        except Exception as e:  # noqa: BLE001 - a bug: the writer task says so and closes with 1011
            queue.appendleft(_Crash(e))
        if (queue or self._out) and self.close_reason is None:
            self._start_writer()

    def _write_nowait(self) -> None:
        """Write what the socket takes now of the framed bytes in ``_out``; the rest stays there
        (one piece), for the writer task."""
        if self._out:
            data = b"".join(self._out)
            self._out.clear()
            n = self.ws.write_nowait(data)
            if n < len(data):
                self._out.append(data[n:])

    def _write_out(self) -> None:
        """Write the framed bytes of ``_out`` now; what the socket does not take goes to the
        writer task (which writes it before anything queued after it)."""
        self._write_nowait()
        if self._out:
            self._start_writer()

    def _start_writer(self) -> None:
        if self._nursery is None:
            return
        self._wstate = WRITING
        try:
            self._nursery.start_soon(self._writer_guard)
        except RuntimeError:  # closed: run() is ending (trio lets others run in that moment)
            self._wstate = DONE

    def push_error(self, err: ChatError, request_id=None) -> None:
        self.node.metrics.errors.inc(code=err.code)
        self.push(proto.error_frame(err.code, err.message, request_id, **err.details))

    def crashed(self, exc: BaseException, request_id=None) -> None:
        """A bug (any exception that is not a ChatError): say ``internal``, then close with 1011."""
        log.error("session crashed (user %s): internal error, closing with 1011", self.user_id, exc_info=exc)
        self.node.metrics.session_crashes.inc()
        self.push_error(ChatError("internal", "internal server error; please report it"), request_id)
        self.push(_Close(CLOSE_INTERNAL, "internal server error"))

    def logged_out_elsewhere(self) -> None:
        """This device logged out on another connection (any shard): its token is revoked."""
        self.push_error(ChatError("invalid_token", "this device logged out; log in again"))
        self.push(_Close(CLOSE_LOG_IN_AGAIN, "device logged out; log in again"))

    async def _close_after_queued(self, code: int, reason: str) -> None:
        """Stop reading; the writer sends what is queued (an error frame), then closes."""
        self.push(_Close(code, reason))
        await trio.sleep_forever()

    def close_soon(self, code: int, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = (code, reason)
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()

    # Outgoing bytes are WebSocket frames built here (server frames are unmasked, so a message's
    # frame is the same for every connection and is built once per format), gathered while the
    # queue has items, and written with one send per batch instead of one per frame.
    def _emit(self, payload) -> None:
        self._out.append(frame(payload))

    def _emit_message(self, m: Message) -> None:
        key = "_frame_" + self.fmt  # framed once per format, shared by every session
        data = m.__dict__.get(key)
        if data is None:
            data = m.__dict__[key] = frame(proto.dumps(proto.message_frame(m), self.fmt))
        self._out.append(data)
        self._flusher.messages_out.pending += 1  # (folded into the counter when it is read)

    async def _flush(self) -> None:
        self._write_nowait()
        if self._out:
            data = self._out.pop()
            # Never cancelled mid-frame (the close frame that follows would be garbage to the
            # client): a close waits for this write, at most SEND_GRACE_S, then aborts the TCP
            # connection of a client that is not reading.
            with trio.CancelScope(shield=True):
                with trio.move_on_after(SEND_GRACE_S) as grace:
                    await self.ws.send_raw(data)
            if grace.cancelled_caught:
                await self.ws.abort()
                raise ConnectionClosed(self.ws.closed)

    async def _writer(self) -> None:
        """The rest of what the flusher could not write at once, in order; ends (handing the queue
        back to the flusher) when the queue is empty and everything is written."""
        queue = self._queue
        await self._flush()
        while queue and self.close_reason is None:
            for _ in range(256):
                item = queue.popleft()
                if isinstance(item, Message):
                    await self._deliver_live(item)
                elif isinstance(item, _SyncJob):
                    await self._run_sync(item)
                elif isinstance(item, _Close):  # everything queued before it has been sent
                    await self._flush()
                    self.close_soon(item.code, item.reason)
                    return
                elif isinstance(item, _Crash):
                    raise item.exc
                else:
                    self._emit(proto.dumps(item, self.fmt))
                if not queue:
                    break
            await self._flush()

    # ---- delivery cursors ------------------------------------------------------------------
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
        return True

    async def _deliver_live(self, m: Message) -> None:
        st = self._cursors.get(m.channel_id)
        if st is None:
            self._cursors[m.channel_id] = [m.seq, m.seq]
            self._emit_message(m)
            return
        if m.seq <= st[1]:
            return  # delivered already (by sync or gap fill)
        if m.seq > st[1] + 1:
            await self._stream(m.channel_id, st[1], m.seq - 1, st)
        if m.seq > st[1]:
            self._emit_message(m)
            st[1] = m.seq

    async def _stream(self, channel_id: str, after: int, upto: int | None, st: list | None) -> None:
        """Send stored messages with ``after < seq <= upto`` in order; advance ``st`` if given."""
        page = self.limits.sync_page
        store = self.node.store
        while True:
            msgs = await store.read_messages(channel_id, after=after,
                                             before=None if upto is None else upto + 1, limit=page)
            for m in msgs:
                self._emit_message(m)
                if st is not None:
                    st[1] = m.seq
            await self._flush()  # a page at a time: a big sync never piles up in memory
            if len(msgs) < page:
                return
            after = msgs[-1].seq

    async def _sync_channel(self, channel_id: str, client_cursor: int) -> int:
        head = await self.node.store.head_seq(channel_id)
        c = min(client_cursor, head)
        st = self._cursors.get(channel_id)
        if st is None:
            st = self._cursors[channel_id] = [c + 1, c]
        else:
            if c + 1 < st[0]:  # older than anything delivered on this connection
                await self._stream(channel_id, c, st[0] - 1, None)
                st[0] = c + 1
            st[1] = max(st[1], c)
        await self._stream(channel_id, st[1], None, st)
        return st[1]

    def resync(self) -> None:
        """Re-read every channel this connection follows from its cursor (after a view change or
        dropped link frames): whatever was missed arrives in order, nothing twice."""
        if self._cursors:
            self.push(_SyncJob(None, {ch: st[1] for ch, st in self._cursors.items()}, silent=True))

    async def _run_sync(self, job: _SyncJob) -> None:
        if job.silent:
            for channel_id, cursor in job.cursors.items():
                try:
                    await self._sync_channel(channel_id, cursor)
                except ChatError:
                    pass
            return
        synced, errors = {}, {}
        for channel_id, cursor in job.cursors.items():
            try:
                await self.node.membership.require_member(channel_id, self.user_id)
                synced[channel_id] = await self._sync_channel(channel_id, cursor)
            except ChatError as e:
                errors[channel_id] = e.code
        try:
            heads = {c.id: c.last_seq for c in await self.node.store.channels_of(self.user_id)}
        except ChatError:
            heads = {}
        reply = {"type": "sync", "id": job.request_id, "cursors": synced, "heads": heads}
        if errors:
            reply["errors"] = errors
        self._emit(proto.dumps(reply, self.fmt))

    # ---- incoming --------------------------------------------------------------------------
    async def _reader(self, nursery: trio.Nursery) -> None:
        limits = self.limits
        while True:
            data = await self.ws.get_message()
            if not self._bucket.take(trio.current_time()):
                self._limited_in_row += 1
                if self._limited_in_row >= limits.flood_close_after:
                    self.close_soon(CLOSE_POLICY, "flood: too many frames over the rate limit")
                    return
                self.push_error(ChatError("rate_limited", "too many frames; slow down",
                                          retry_after_ms=int(self._bucket.retry_after_s() * 1000) + 1),
                                proto.peek_id(data, self.fmt, limits.max_frame_bytes))
                continue
            self._limited_in_row = 0
            req = None
            try:
                req = proto.parse(data, self.fmt, limits.max_frame_bytes)
                await self._serve(req, nursery)
            except proto.ProtocolError as e:
                self.push_error(e, e.request_id)
            except ChatError as e:
                self.push_error(e, getattr(req, "id", None))
            except Exception as e:  # noqa: BLE001 - a bug: answered 'internal', connection closed
                self.crashed(e, getattr(req, "id", None))
                await trio.sleep_forever()  # the writer sends what is queued, then closes

    async def _serve(self, req, nursery: trio.Nursery) -> None:
        if self.user_id is None:
            if isinstance(req, proto.Auth):
                # A session attached before this shard has a view would be announced to
                # no home shard, and miss live messages: wait for the first view.
                if not self.node.router.view.shards and not await self.node.router.wait_for_view():
                    self.push_error(ChatError("unavailable", "this shard is starting; reconnect"), req.id)
                    await self._close_after_queued(CLOSE_TRY_AGAIN, "shard not ready; reconnect")
                if not await self._on_auth(req):
                    await self._close_after_queued(CLOSE_POLICY, "too many invalid tokens")
                if self.user_id is not None:  # the auth timeout's timer becomes the token's
                    self._timers.cancel(self._timer)
                    self._timer = self._timers.call_later(self._token_exp - time.time(), self._expired)
            else:
                self.push_error(ChatError("not_authenticated", "send an 'auth' frame first"), req.id)
            return
        await self._dispatch(req, nursery)

    async def _dispatch(self, req, nursery: trio.Nursery) -> None:
        if isinstance(req, proto.Send):
            if len(req.body) > self.limits.max_body_chars:
                self.push_error(ChatError("body_too_long", f"a message body has at most "
                                          f"{self.limits.max_body_chars} characters"), req.id)
                return
            if self._inflight is None:
                self._inflight = trio.Semaphore(self.limits.max_inflight_sends)
            try:
                self._inflight.acquire_nowait()  # (no checkpoint per send unless at the limit)
            except trio.WouldBlock:
                await self._inflight.acquire()
            if self._last_send is None:
                self._last_send = {}
            previous = self._last_send.get(req.channel_id)
            if previous is None or previous.is_set():
                try:
                    if self._send_nowait(req):
                        return
                except Exception as e:  # noqa: BLE001 - a bug: answered 'internal', connection closed
                    self._inflight.release()
                    self.crashed(e, req.id)
                    return
            submitted = self._last_send[req.channel_id] = trio.Event()
            nursery.start_soon(self._on_send, req, previous, submitted)
        elif isinstance(req, proto.Sync):
            self.push(_SyncJob(req.id, req.cursors))
        elif isinstance(req, proto.Heartbeat):
            self.node.presence.heartbeat(self.user_id, self.device_id)
            self.push({"type": "heartbeat", "id": req.id, "server_time": time.time()})
        elif isinstance(req, proto.UnsubscribePresence):
            gone = [u for u in req.user_ids if u in (self._subscribed or ())]
            if gone:
                self._subscribed.difference_update(gone)
            self.node.presence.unsubscribe(self.user_id, gone)
            self.push({"type": "unsubscribe_presence", "id": req.id, "user_ids": list(req.user_ids)})
        elif isinstance(req, proto.Logout):
            nursery.start_soon(self._guarded, self._on_logout, req)
        elif isinstance(req, proto.Auth):
            self.push_error(ChatError("already_authenticated", "this connection is authenticated"), req.id)
        else:
            handler = {proto.History: self._on_history, proto.Typing: self._on_typing,
                       proto.Read: self._on_read, proto.PresenceQuery: self._on_presence,
                       proto.SubscribePresence: self._on_subscribe}[type(req)]
            nursery.start_soon(self._guarded, handler, req)

    async def _guarded(self, handler, req) -> None:
        try:
            await handler(req)
        except ChatError as e:
            self.push_error(e, req.id)
        except Exception as e:  # noqa: BLE001 - a bug: answered 'internal', connection closed
            self.crashed(e, req.id)

    async def _on_auth(self, req: proto.Auth) -> bool:
        """False once the connection has presented too many bad tokens (it must be closed)."""
        try:
            user_id, device_id, exp = token_claims(self.node.secret, req.token)
            key = revocation.token_key(req.token)
            if await self.node.store.token_revoked(key) or key in self.node.revoked_here:
                raise ChatError("invalid_token", revocation.REVOKED_MESSAGE)
        except ChatError as e:
            if e.code == "unavailable":
                self.push_error(e, req.id)
                return True
            self._bad_tokens += 1
            self.push_error(e, req.id)
            return self._bad_tokens < MAX_BAD_TOKENS
        self.user_id, self.device_id, self.token_key, self._token_exp = user_id, device_id, key, exp
        # No await from here on: every live message routed to us is queued after this sync job.
        self.node.router.attach(self)
        self.node.presence.heartbeat(self.user_id, self.device_id)
        self.push({"type": "auth", "id": req.id, "user_id": self.user_id, "device_id": self.device_id,
                   "heartbeat_interval_s": self.limits.heartbeat_interval_s, "server_time": time.time()})
        if req.cursors:
            self.push(_SyncJob(req.id, req.cursors))
        return True

    def _send_nowait(self, req: proto.Send) -> bool:
        """The send's fast path: no earlier send of this channel waits to be queued and
        this shard can queue it at once -- then no task and no event: the store's completion
        answers it (the answer clock still answers ``unavailable`` at the deadline, and the late
        ack is then dropped, as in :meth:`_on_send`). False when :meth:`_on_send` must serve it."""
        ticket = None

        def done(result, error) -> None:
            self._inflight.release()
            try:
                answer(result, error)
            except Exception as e:  # noqa: BLE001 - a bug: answered 'internal', connection closed
                ticket.answered = True
                self.crashed(e, req.id)

        def answer(result, error) -> None:
            ticket.answer(_ack(req, result) if error is None else _retryable(error))
        if not self.node.router.send_nowait(self.user_id, req.channel_id, req.client_msg_id, req.body, done):
            return False
        ticket = self._ticket(req)
        return True

    def _ticket(self, req):
        """The send's answer-deadline ticket; the connection's clock task starts with its first
        send (an idle connection has none)."""
        if self._answers is None:
            budget = self.limits.send_answer_s
            self._answers = AnswerClock(budget, lambda: ChatError(
                "unavailable", f"no answer from the channel's owner within {budget:g} s; resend with the "
                "same client_msg_id", retry_after_ms=RETRY_AFTER_MS))
            self._nursery.start_soon(self._answers.run)
        return self._answers.ticket(self._answer_send(req))

    def _answer_send(self, req):
        def answer(reply) -> None:
            if isinstance(reply, ChatError):
                self.push_error(reply, req.id)
            else:
                self.push(reply)
        return answer

    async def _on_send(self, req: proto.Send, previous: trio.Event | None, submitted: trio.Event) -> None:
        """Sends run concurrently (their commits share a group commit) but enter the store in
        the order the client sent them *per channel*: each waits until the previous send to
        the same channel is queued (a send stuck on one channel holds no other channel's). The
        ack is queued the moment the message is durable, ahead of its fan-out.

        Every send is answered exactly once, within ``limits.send_answer_s``: an ``ack``, or an
        error; ``unavailable`` (with ``retry_after_ms``) when the owner is unreachable or did not
        answer in time. After such an answer the message may still be stored: the client resends
        it with the same ``client_msg_id`` and gets the original ``(channel_id, seq)``."""
        ticket = self._ticket(req)

        def ack(result) -> None:
            ticket.answer(_ack(req, result))
        try:
            with ticket.scope:  # cancelled at the deadline, once the ticket answered `unavailable`
                if previous is not None and not previous.is_set():
                    await previous.wait()
                await self.node.router.send(self.user_id, req.channel_id, req.client_msg_id, req.body,
                                            on_submit=submitted.set, on_stored=ack,
                                            timeout_s=self._answers.budget_s)
        except ChatError as e:
            ticket.answer(_retryable(e))
        except Exception as e:  # noqa: BLE001 - a bug: answered 'internal', connection closed
            ticket.answered = True  # (the deadline must not answer it again)
            self.crashed(e, req.id)
        finally:
            submitted.set()
            if self._last_send.get(req.channel_id) is submitted:
                del self._last_send[req.channel_id]
            self._inflight.release()

    async def _on_logout(self, req: proto.Logout) -> None:
        """Revoke this connection's token (durably, before the reply), close the device's other
        connections everywhere, then close this one with 1000."""
        await revocation.log_out(self.node, self.user_id, self.device_id, self.token_key, self._token_exp,
                                 except_session=self)
        self.push({"type": "logout", "id": req.id})
        self.push(_Close(CLOSE_NORMAL, "logged out"))

    def _expired(self) -> None:
        """Tokens expire while connected too: at ``exp`` the connection is closed with 4001."""
        self.push_error(ChatError("token_expired", "token has expired; log in again"))
        self.push(_Close(CLOSE_LOG_IN_AGAIN, "token expired; log in again"))

    async def _on_history(self, req: proto.History) -> None:
        page_max = self.limits.history_page_max
        if req.limit is not None and req.limit > page_max:  # as over HTTP: refused, not clamped
            raise ChatError("bad_field", f"field 'limit' must be between 1 and {page_max}")
        await self.node.membership.require_member(req.channel_id, self.user_id)
        limit = req.limit or 50
        msgs, more = await read_page(self.node.store, req.channel_id, req.after, req.before, limit)
        # Keep the reply under the frame limit: drop from the far end (newest for "after" pages,
        # oldest otherwise) and say there is more.
        budget = self.limits.max_frame_bytes
        kept: list = []
        for m in (msgs if req.after is not None else reversed(msgs)):
            budget -= len(m.body) * 4 + 200
            if budget < 0 and kept:
                more = True
                break
            kept.append(m)
        if req.after is None:
            kept.reverse()
        self.push({"type": "history", "id": req.id, "channel_id": req.channel_id, "more": more,
                   "messages": [proto.message_frame(m) for m in kept]})

    async def _on_typing(self, req: proto.Typing) -> None:
        members = await self.node.membership.require_member(req.channel_id, self.user_id)
        event = {"type": "typing", "channel_id": req.channel_id, "user_id": self.user_id}
        self.node.router.deliver_event(event, members - {self.user_id})
        self.push({"type": "typing", "id": req.id})

    async def _on_read(self, req: proto.Read) -> None:
        members = await self.node.membership.require_member(req.channel_id, self.user_id)
        try:
            seq = await self.node.store.set_read(req.channel_id, self.user_id, req.seq)
        except ChatError as e:
            # a member of a 1:1 channel with no message yet (no rows stored): nothing to read
            if e.code != "not_member" or dm_members(req.channel_id) is None:
                raise
            self.push({"type": "read", "id": req.id, "channel_id": req.channel_id, "seq": 0})
            return
        self.push({"type": "read", "id": req.id, "channel_id": req.channel_id, "seq": seq})
        event = {"type": "read", "channel_id": req.channel_id, "user_id": self.user_id, "seq": seq}
        self.node.router.deliver_event(event, members, skip=self.device_id)

    async def _on_subscribe(self, req: proto.SubscribePresence) -> None:
        """Subscribe (at once, before any await), then answer with the current statuses."""
        if self._subscribed is None:
            self._subscribed = set()
        new = [u for u in req.user_ids if u not in self._subscribed and u != self.user_id]
        limit = self.node.config.presence.max_subscriptions
        if len(self._subscribed) + len(new) > limit:
            raise ChatError("bad_field", f"too many presence subscriptions on this connection (at most {limit})")
        self._subscribed.update(new)
        self.node.presence.subscribe(self.user_id, new)
        users = await self.node.presence.statuses(list(req.user_ids))
        self.push({"type": "subscribe_presence", "id": req.id, "users": {str(u): st for u, st in users.items()}})

    async def _on_presence(self, req: proto.PresenceQuery) -> None:
        if len(req.user_ids) > self.node.config.presence.max_query:
            raise ChatError("bad_field", f"ask for at most {self.node.config.presence.max_query} users at once")
        users = await self.node.presence.statuses(list(req.user_ids))
        self.push({"type": "presence", "id": req.id, "users": {str(u): st for u, st in users.items()}})

    def _auth_timeout(self) -> None:
        if self.user_id is None:
            self.close_soon(CLOSE_POLICY, "authentication timeout")

    # ---- lifecycle -------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve the connection until the client leaves or we close it; always unregisters."""
        metrics = self.node.metrics
        metrics.connections_total.inc()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.close_reason is not None:
                    nursery.cancel_scope.cancel()
                self._timer = self._timers.call_later(self.limits.auth_timeout_s, self._auth_timeout)
                try:
                    await self._reader(nursery)
                except ConnectionClosed:
                    pass
                nursery.cancel_scope.cancel()
        except Exception as e:  # noqa: BLE001 - a bug that escaped the handlers above: still 1011
            log.error("session crashed (user %s): closing with 1011", self.user_id, exc_info=e)
            self.node.metrics.session_crashes.inc()
            if self.close_reason is None:
                self.close_reason = (CLOSE_INTERNAL, "internal server error")
        finally:
            self._wstate = DONE  # push() drops, the flusher skips this session from now on
            self._queue.clear()
            self._timers.cancel(self._timer)
            if self.user_id is not None:
                self.node.router.detach(self)
                if self._subscribed:
                    self.node.presence.unsubscribe(self.user_id, list(self._subscribed))
            if self.close_reason is not None and not self.ws.closed:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    try:
                        await self.ws.aclose(*self.close_reason)
                    except ConnectionClosed:
                        pass

    async def _writer_guard(self) -> None:
        try:
            await self._writer()
            if self.close_reason is None:  # all written: the flusher writes what comes next
                self._wstate = IDLE
                return
        except ConnectionClosed:
            pass
        except ChatError as e:  # store failure while syncing: tell the client, let it retry
            log.warning("closing session of user %s: %s", self.user_id, e)
            self.close_soon(CLOSE_TRY_AGAIN, "server could not read the store; reconnect and sync")
        except Exception as e:  # noqa: BLE001 - a bug in the writer: say so if we still can
            log.error("session crashed (user %s): writer failed, closing with 1011", self.user_id, exc_info=e)
            self.node.metrics.session_crashes.inc()
            self.node.metrics.errors.inc(code="internal")
            self.close_soon(CLOSE_INTERNAL, "internal server error")
            self._out.clear()
            with trio.CancelScope(shield=True), trio.move_on_after(SEND_GRACE_S):
                try:
                    self._emit(proto.dumps(proto.error_frame("internal", "internal server error; please report it"),
                                           self.fmt))
                    await self.ws.send_raw(self._out.pop())
                except ConnectionClosed:
                    pass
        self._nursery.cancel_scope.cancel()
