"""The "connection" of an HTTP device session (SSE, long polling, ``POST /v1/frames``): what a
:class:`~chatd.shard.session.Session` and its outbox see instead of a WebSocket.

A session and its outbox (chatd/shard/session.py, outbox.py) run unchanged over a :class:`Pipe`:
they read requests with :meth:`Pipe.get_message` and write the very frames they write to a
WebSocket (:func:`chatd.shard.wsconn.frame`: unmasked, final) with :meth:`Pipe.write_nowait` /
:meth:`Pipe.send_raw`. The pipe decodes those frames (a few header bytes each) back into
*events*: ``(json bytes, resume token or None)``, which an SSE response or a poll answer takes
(:meth:`Pipe.take`). So every frame kind the session emits -- today's and any added later -- flows
over every transport without the transports knowing it.

* **Cursors**: the device session's outbox (:class:`StreamOutbox` in chatd/shard/httpsession.py)
  writes a *mark* (a frame with the reserved opcode 0x3 carrying ``channel\\0seq``) in front of every
  frame that advances a channel's delivery cursor. The pipe keeps ``{channel: seq}`` from the
  start point plus the marks, and the event after a mark carries :func:`chatd.shard.resume.encode`
  of it: its SSE ``id:``, the resume token from which exactly the later events follow.
* **Replies**: a frame with an ``id`` that a ``POST /v1/frames`` waits for (:meth:`Pipe.expect`)
  goes to that request, not into the stream (first waiter for that id first); one that nobody
  waits for any more (answered by its deadline) is dropped. The session's own ``auth`` reply
  becomes the stream's first event, ``ready`` (:attr:`Pipe.ready`).
* **Bounds**: the pipe holds at most ``capacity`` bytes of events for its reader, like a socket
  buffer: beyond it :meth:`write_nowait` takes nothing, the outbox queues (its byte budget and
  slow-consumer policy apply as on WebSocket) and :meth:`send_raw` waits for :meth:`take`.
  Requests wait in a queue of ``max_requests``; :meth:`feed` waits for room.
* **The end**: :meth:`aclose` / :meth:`abort` (the session's) append a ``close`` event
  (``{"type": "close", "code", "reason"}``, the WebSocket close code) after everything written
  before, and end :meth:`get_message`; :meth:`take` hands out what is left, then nothing.
  No exception leaves the decoder for a frame the outbox wrote: a frame that does not decode as
  JSON is passed on as it is.
"""

from __future__ import annotations

from collections import deque

import msgspec
import trio

from . import resume
from .wsconn import ABNORMAL, CloseReason, ConnectionClosed, OP_BINARY, OP_PING, OP_TEXT

OP_MARK = 0x3  # a reserved non-control opcode: never on a WebSocket, only from StreamOutbox to a Pipe
_decode = msgspec.json.decode
_encode = msgspec.json.encode


def mark(channel_id: str, seq: int) -> bytes:
    """The mark in front of a frame that advances ``channel_id`` to ``seq``."""
    payload = f"{channel_id}\x00{seq}".encode()
    return bytes((0x80 | OP_MARK, len(payload))) + payload  # (< 126 bytes: a channel id is <= 64)


class Waiter:
    """One request of a ``POST /v1/frames`` waiting for its reply."""
    __slots__ = ("reply", "event")

    def __init__(self):
        self.reply = None
        self.event = trio.Event()


class Pipe:
    __slots__ = ("capacity", "cursors", "events_on", "ready", "auth_id", "heard", "stream", "subprotocol",
                 "_raw", "_events", "_bytes", "_marked", "_waiters", "_closed", "_arrived", "_room", "_in_send",
                 "_in_recv", "dropped_replies")

    def __init__(self, cursors: dict[str, int], *, capacity: int, max_requests: int, events: bool = True):
        self.capacity = capacity
        self.cursors = dict(cursors)  # {channel: last seq handed to this pipe}: the resume token's
        self.events_on = events  # False: a frames-only session, whose events nobody reads (dropped)
        self.ready = None  # auth reply dict -> the 'ready' event dict (set by the session's maker)
        self.auth_id = None
        self.heard = True  # the session's liveness tick reads and clears it; the transports set it
        self.stream = None  # (no socket: the server's per-address count is the HTTP connection's)
        self.subprotocol = None
        self._raw = bytearray()  # an incomplete frame
        self._events: deque = deque()  # (json bytes, token or None)
        self._bytes = 0  # bytes of self._events
        self._marked = None  # the (channel, seq) of the mark just read
        self._waiters: dict = {}  # request id -> deque of Waiter
        self._closed: CloseReason | None = None
        self._arrived = trio.Event()
        self._room = trio.Event()
        self._in_send, self._in_recv = trio.open_memory_channel(max_requests)
        self.dropped_replies = 0

    # ---- the session's side ------------------------------------------------------------------
    @property
    def closed(self) -> CloseReason | None:
        return self._closed

    @property
    def is_open(self) -> bool:
        return self._closed is None

    def write_nowait(self, data: bytes) -> int:
        """Take all of ``data`` (whole frames or not) unless closed or the reader is
        ``capacity`` bytes behind: then nothing."""
        if self._closed is not None or self._bytes >= self.capacity:
            return 0
        self._raw += data
        self._decode()
        return len(data)

    async def send_raw(self, data: bytes) -> None:
        while data:
            if self._closed is not None:
                raise ConnectionClosed(self._closed)
            n = self.write_nowait(data)
            data = data[n:]
            if data:
                if self._room.is_set():
                    self._room = trio.Event()
                await self._room.wait()

    async def abort(self) -> None:
        self._close(CloseReason(ABNORMAL, "abandoned: nothing read"))

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        self._close(CloseReason(code, reason))

    async def get_message(self) -> str:
        try:
            return await self._in_recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ConnectionClosed(self._closed) from None

    # ---- the transports' side ----------------------------------------------------------------
    async def feed(self, text: str) -> None:
        """One request for the session (waits while ``max_requests`` wait); ConnectionClosed if closed."""
        if self._closed is not None:
            raise ConnectionClosed(self._closed)
        try:
            await self._in_send.send(text)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionClosed(self._closed) from None

    def expect(self, request_id) -> Waiter:
        w = Waiter()
        self._waiters.setdefault(_key(request_id), deque()).append(w)
        return w

    def forget(self, request_id, waiter: Waiter) -> None:
        """A POST answered without ``waiter``'s reply (its deadline): a late reply is dropped."""
        q = self._waiters.get(_key(request_id))
        if q is not None and waiter in q:
            q.remove(waiter)
            if not q:
                del self._waiters[_key(request_id)]

    def close_now(self, code: int, reason: str) -> None:
        """The transport ends the session (its stream ended, it idled out)."""
        self._close(CloseReason(code, reason))

    def has_events(self) -> bool:
        return bool(self._events)

    def take(self, max_bytes: int) -> list:
        """Whole events, oldest first, up to ``max_bytes`` (at least one if any)."""
        out = []
        n = 0
        events = self._events
        while events and (not out or n + len(events[0][0]) <= max_bytes):
            ev = events.popleft()
            n += len(ev[0])
            out.append(ev)
        self._bytes -= n
        if out and not self._room.is_set():
            self._room.set()
        return out

    async def wait_events(self) -> None:
        """Until an event is there (or the pipe is closed and drained)."""
        while not self._events and self._closed is None:
            if self._arrived.is_set():
                self._arrived = trio.Event()
            await self._arrived.wait()

    @property
    def finished(self) -> bool:
        """Closed, and its last event (``close``) handed out."""
        return self._closed is not None and not self._events

    # ---- decoding ----------------------------------------------------------------------------
    def _close(self, reason: CloseReason) -> None:
        if self._closed is not None:
            return
        self._closed = reason
        self._in_send.close()
        self._add(_encode({"type": "close", "code": reason.code, "reason": reason.reason or ""}), None)
        self._room.set()
        for q in self._waiters.values():
            for w in q:
                w.event.set()  # (reply None: the POST answers for it)
        self._waiters.clear()

    def _add(self, data: bytes, token) -> None:
        self._events.append((data, token))
        self._bytes += len(data)
        self._arrived.set()

    def _decode(self) -> None:
        raw = self._raw
        pos = 0
        end = len(raw)
        while end - pos >= 2:
            b0, n = raw[pos], raw[pos + 1] & 0x7F
            head = 2
            if n == 126:
                if end - pos < 4:
                    break
                n, head = int.from_bytes(raw[pos + 2:pos + 4], "big"), 4
            elif n == 127:
                if end - pos < 10:
                    break
                n, head = int.from_bytes(raw[pos + 2:pos + 10], "big"), 10
            if end - pos < head + n:
                break
            payload = bytes(raw[pos + head:pos + head + n])
            pos += head + n
            self._frame(b0 & 0x0F, payload)
        del raw[:pos]

    def _frame(self, op: int, payload: bytes) -> None:
        if op == OP_MARK:
            ch, _, seq = payload.decode().partition("\x00")
            self._marked = (ch, int(seq))
            return
        if op not in (OP_TEXT, OP_BINARY):  # the session's pings: the transports keep alive themselves
            return
        marked, self._marked = self._marked, None
        if marked is not None:  # a frame that advances a channel: it carries the resume token
            ch, seq = marked
            if seq > self.cursors.get(ch, 0):
                self.cursors[ch] = seq
            if self.events_on:
                self._add(payload, resume.encode(self.cursors))
            return
        try:
            obj = _decode(payload)
        except msgspec.DecodeError:
            obj = None
        rid = obj.get("id") if type(obj) is dict else None
        if rid is not None:
            key = _key(rid)
            if rid == self.auth_id:
                self._auth_reply(obj)
                return
            q = self._waiters.get(key)
            if q:
                w = q.popleft()
                if not q:
                    del self._waiters[key]
                w.reply = obj
                w.event.set()
            else:
                self.dropped_replies += 1
            return
        if self.events_on:
            self._add(payload, None)

    def _auth_reply(self, obj: dict) -> None:
        """The session's ``auth`` reply: its waiter, and the stream's ``ready`` event; later frames
        with the auth's id (the start sync's reply) are events without the id."""
        q = self._waiters.pop(_key(self.auth_id), None)
        if q:
            w = q.popleft()
            w.reply = obj
            w.event.set()
            if obj.get("type") == "auth" and self.ready is not None:
                self._add(_encode(self.ready(obj)), resume.encode(self.cursors))
            return
        obj.pop("id", None)
        if self.events_on:
            self._add(_encode(obj), None)


def _key(request_id):
    """Request ids as dict keys: 1 and "1" are different ids (and True is no id)."""
    return (type(request_id) is str, request_id)
