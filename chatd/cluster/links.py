"""Direct TCP links between cluster processes, carrying the frames of
:mod:`chatd.protocol.link_frames` (framed by :mod:`chatd.protocol.link`).

Topology: one link per pair. A shard dials every shard whose id sorts after its own; an API
server dials every shard; shards and API servers dial every presence server; nobody dials an API
server. The dialer reconnects with exponential
backoff (0.1 s doubling to 1 s, with jitter) for as long as the peer is in the view.

Resources and policies

* **Queues**: each link has one bounded send queue (``link_queue_frames``). :meth:`send_nowait`
  never blocks: on a full queue it drops the frame, counts it, and marks the link so that a
  ``resync`` frame follows once the queue has room (the peer then re-reads the store for its
  sessions: a dropped live frame costs latency, never a message). :meth:`request` waits for room
  (backpressure on the caller) and for the reply; :meth:`request_nowait` (no task: a callback
  gets the reply) only queues when there is room.
* **Writes**: one writer task per link writes what is queued in one ``send_all`` (a frame
  written straight to the socket instead was measured: no gain, and the frames one callback
  queues -- a reply and the deliveries after it -- would no longer share a write).
* **Heartbeats**: a ``ping`` after ``link_heartbeat_s`` of silence; a link that hears nothing for
  three heartbeats is closed (and redialled): with the default 0.3 s a dead or frozen peer is
  noticed in under a second, and every request pending on it is answered ``unavailable``.
* **Limits**: frames above ``link_max_frame_bytes`` are refused from their header; a peer that
  speaks anything but the protocol is disconnected. The writer checks the same limit before
  sending: a frame too large is not sent (logged, counted in ``chatd_link_frames_refused_total``);
  a request of ours is answered ``frame_too_large`` at once, a reply of ours is replaced by a
  ``frame_too_large`` error reply, any other frame is followed by a ``resync`` (as a drop is).
* **Unknown and malformed frames** (:func:`chatd.protocol.link_frames.decode`) are logged and
  skipped; a malformed request is answered ``bad_frame``, a malformed reply answers its request
  ``bad_frame``. The link stays up.
* **Handshake**: mutual HMAC over fresh nonces with ``cluster.secret``; 5 s to complete.
* **Callbacks**: where frames go is given to :meth:`LinkManager.run` (``on_frame`` for every
  frame but replies, pings and the skipped ones; ``on_link_up`` / ``on_link_down``), so the
  manager can be built before what handles its frames.
* Requests pending on a link that closes fail with ``ChatError("unavailable")`` (a
  :meth:`request_nowait` callback gets an ``unavailable`` error reply, also after its timeout).
"""

from __future__ import annotations

import itertools
import logging
import random
from typing import Awaitable, Callable

import msgspec
import trio

from ..errors import ChatError
from ..protocol import link as lp
from ..protocol import link_frames as lf

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 5.0
# A peer back from a freeze or a partition is redialled within a second (a longer pause only
# prolongs the time its channels answer `unavailable`); failed dials to loopback cost nothing.
DIAL_BACKOFF_MAX_S = 1.0


class Link:
    def __init__(self, manager: "LinkManager", stream: trio.SocketStream, codec: lp.LinkCodec, peer_id: str,
                 role: str):
        self.manager = manager
        self.stream = stream
        self.codec = codec
        self.peer_id = peer_id
        self.role = role
        cfg = manager.cfg
        self._send, self._recv = trio.open_memory_channel(cfg.link_queue_frames)
        self.closed = trio.Event()
        self.needs_resync = False
        self.dropped = 0  # frames dropped on a full queue
        self.refused = 0  # frames not sent: above the frame size limit
        self._scope: trio.CancelScope | None = None

    def send_nowait(self, frame: lf.Frame) -> bool:
        ok = self.offer(frame)
        if ok is False:
            self.dropped += 1
            self.needs_resync = True
        return bool(ok)

    def offer(self, frame: lf.Frame) -> bool | None:
        """Queue ``frame`` without waiting: True if queued, False if the queue is full
        (nothing done: the caller decides, see :meth:`send_nowait`), None if the link is closed."""
        try:
            self._send.send_nowait(frame)
        except trio.WouldBlock:
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return None
        self.manager.count(self.peer_id, frame)
        return True

    async def send(self, frame: lf.Frame) -> None:
        try:
            await self._send.send(frame)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise ChatError("unavailable", f"link to {self.peer_id} is down") from None
        self.manager.count(self.peer_id, frame)

    def close(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    async def run(self) -> None:
        """Until the peer closes, resets or falls silent, or :meth:`close`. A broken socket (a peer
        killed with -9 can send RST) ends the link like a close: it never raises."""
        try:
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._until_broken, self._writer)
                    await self._until_broken(self._reader)
                    nursery.cancel_scope.cancel()
        finally:
            self._send.close()
            self.closed.set()
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)

    async def _until_broken(self, io) -> None:
        try:
            await io()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            log.info("link to %s broken: %s", self.peer_id, e)
        self.close()  # the other direction goes down with it

    async def _writer(self) -> None:
        hb = self.manager.cfg.link_heartbeat_s
        append = self.codec.append
        receive_nowait = self._recv.receive_nowait
        while True:
            with trio.move_on_after(hb) as idle:
                frame = await self._recv.receive()
            if idle.cancelled_caught:
                frame = _PING
            buf = bytearray()
            batched = 0
            while True:  # batch what is queued (up to 256 frames) into one write
                if append(buf, frame) < 0:
                    self.manager._refused(self, frame, buf)
                batched += 1
                if batched == 256:
                    break
                try:
                    frame = receive_nowait()
                except trio.WouldBlock:
                    break
            if self.needs_resync and self._send.statistics().current_buffer_used == 0:
                self.needs_resync = False
                append(buf, _RESYNC)
            if buf:
                await self.stream.send_all(buf)

    async def _reader(self) -> None:
        timeout = 3 * self.manager.cfg.link_heartbeat_s
        while True:
            with trio.move_on_after(timeout) as silent:
                data = await self.stream.receive_some(65536)
            if silent.cancelled_caught:
                log.warning("link to %s silent for %.1fs: closing", self.peer_id, timeout)
                return
            if not data:
                return
            try:
                self.codec.receive_data(data)
                while (frame := self.codec.next_frame()) is not None:
                    if type(frame) is not lf.Ping:
                        await self.manager._dispatch(self, frame)
            except lp.LinkProtocolError as e:
                log.warning("link to %s broken: %s", self.peer_id, e)
                return


async def _ignore(link: Link, frame: lf.Frame) -> None:
    log.debug("frame %s from %s ignored", lf.NAMES[type(frame)], link.peer_id)


def _nothing(link: Link) -> None:
    pass


class LinkManager:
    def __init__(self, node_id: str, role: str, cfg, metrics=None, dial_all: bool = False):
        self.node_id = node_id
        self.role = role
        self.cfg = cfg
        self.secret = cfg.secret
        self._on_frame: Callable[[Link, lf.Frame], Awaitable[None]] = _ignore
        self._on_link_up: Callable[[Link], None] = _nothing
        self._on_link_down: Callable[[Link], None] = _nothing
        self.dial_all = dial_all  # dial every server of the view (API servers; shards -> presence)
        self.links: dict[str, Link] = {}
        self._dialers: dict[str, tuple[str, trio.CancelScope]] = {}
        self._seen: set[str] = set()  # the servers of the last view given to set_peers
        self._nursery: trio.Nursery | None = None
        self._rids = itertools.count(1)
        # rid -> [event, reply, link] (request_on), or [None, on_reply, link, deadline] (request_nowait)
        self._pending: dict[int, list] = {}
        self._expiring = False  # the task answering overdue request_nowait calls runs
        self._link_up = trio.Event()  # set (and replaced) whenever a link comes up
        self.port: int | None = None
        self.metrics = metrics

    def count(self, peer: str, frame: lf.Frame) -> None:
        if self.metrics is not None:
            self.metrics.link_frames.inc(peer=peer, type=_NAMES[type(frame)])

    # ---- lifecycle -----------------------------------------------------------------------
    async def run(self, listen: bool, on_frame: Callable[[Link, lf.Frame], Awaitable[None]] | None = None,
                  on_link_up: Callable[[Link], None] = _nothing, on_link_down: Callable[[Link], None] = _nothing,
                  *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept links (``listen``) and dial the peers :meth:`set_peers` names, until cancelled.
        ``on_frame(link, frame)`` gets every frame but replies, pings and skipped ones (awaited:
        it holds the link's reader; None: they are ignored); ``on_link_up`` / ``on_link_down``
        each link that comes up or goes down."""
        self._on_frame = on_frame if on_frame is not None else _ignore
        self._on_link_up, self._on_link_down = on_link_up, on_link_down
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if listen:
                listeners = await trio.open_tcp_listeners(self.cfg.link_port, host=self.cfg.link_host)
                self.port = listeners[0].socket.getsockname()[1]
                nursery.start_soon(trio.serve_listeners, self._accept, listeners)
                log.info("%s accepting links on %s:%d", self.node_id, self.cfg.link_host, self.port)
            task_status.started(self.port)
            await trio.sleep_forever()  # the nursery hosts dialers and links until cancelled

    def public_addr(self) -> str:
        return self.cfg.link_public_addr or f"{self.cfg.link_host}:{self.port}"

    def set_peers(self, view) -> None:
        """Dial the shards we should (see module docstring); stop dialling the ones gone."""
        if self._nursery is None:  # not running yet: run() callers set the peers once it is
            return
        wanted = {}
        for sid, info in view.shards.items():
            if sid == self.node_id or not info.link_addr:
                continue
            if self.dial_all or self.role == "api" or sid > self.node_id:
                wanted[sid] = info.link_addr
        for sid, (addr, scope) in list(self._dialers.items()):
            if wanted.get(sid) != addr:
                scope.cancel()
                del self._dialers[sid]
        # Close links to shards that left the view (not to peers we have not seen yet: a shard
        # that just joined may dial us before our view shows it).
        for sid in self._seen - set(view.shards):
            link = self.links.get(sid)
            if link is not None and link.role == "shard":
                link.close()
        self._seen = set(view.shards)
        for sid, addr in wanted.items():
            if sid not in self._dialers:
                scope = trio.CancelScope()
                self._dialers[sid] = (addr, scope)
                self._nursery.start_soon(self._dial_loop, sid, addr, scope)

    # ---- connections -----------------------------------------------------------------------
    async def _accept(self, stream: trio.SocketStream) -> None:
        codec = lp.LinkCodec(self.cfg.link_max_frame_bytes)
        nonce = lp.new_nonce()
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                await stream.send_all(codec.encode(lp.challenge(self.node_id, nonce)))
                hello = await _read_frame(stream, codec)
                peer, role = lp.check_hello(self.secret, self.node_id, nonce, hello)
                await stream.send_all(codec.encode(lp.welcome(self.secret, self.node_id, peer, hello.nonce, nonce)))
        except (lp.LinkProtocolError, trio.TooSlowError, trio.BrokenResourceError, OSError) as e:
            log.warning("refused a link: %s", e)
            await trio.aclose_forcefully(stream)
            return
        await self._run_link(Link(self, stream, codec, peer, role))

    async def _dial_loop(self, peer: str, addr: str, scope: trio.CancelScope) -> None:
        host, _, port = addr.rpartition(":")
        backoff = 0.1
        with scope:
            while True:
                try:
                    stream = await trio.open_tcp_stream(host, int(port))
                except OSError as e:
                    log.debug("dial %s at %s failed: %s", peer, addr, e)
                else:
                    codec = lp.LinkCodec(self.cfg.link_max_frame_bytes)
                    try:
                        with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                            chal = await _read_frame(stream, codec)
                            cnonce = lp.new_nonce()
                            await stream.send_all(codec.encode(lp.hello(self.secret, self.node_id, self.role, chal,
                                                                        cnonce)))
                            lp.check_welcome(self.secret, chal.id, self.node_id, cnonce, chal.nonce,
                                             await _read_frame(stream, codec))
                        if chal.id != peer:
                            raise lp.LinkProtocolError(f"dialled {peer} at {addr} but {chal.id} answered")
                    except (lp.LinkProtocolError, trio.TooSlowError, trio.BrokenResourceError, OSError) as e:
                        log.warning("link handshake with %s failed: %s", peer, e)
                        await trio.aclose_forcefully(stream)
                    else:
                        backoff = 0.1
                        await self._run_link(Link(self, stream, codec, peer, "shard"))
                await trio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, DIAL_BACKOFF_MAX_S)

    async def _run_link(self, link: Link) -> None:
        old = self.links.get(link.peer_id)
        if old is not None:
            old.close()
        self.links[link.peer_id] = link
        self._link_up.set()  # wakes wait_link callers
        self._link_up = trio.Event()
        log.info("link up: %s <-> %s (%s)", self.node_id, link.peer_id, link.role)
        self._on_link_up(link)
        try:
            await link.run()
        except Exception:  # a bug handling one peer's frames must not take the process down
            log.exception("link to %s failed", link.peer_id)
        finally:
            if self.links.get(link.peer_id) is link:
                del self.links[link.peer_id]
                self._on_link_down(link)
            for rid, slot in list(self._pending.items()):
                if slot[2] is link:
                    self._answer(rid, slot, lf.Reply(rid, err={"code": "unavailable",
                                                               "message": f"link to {link.peer_id} closed"}))
            log.info("link down: %s <-> %s", self.node_id, link.peer_id)

    # ---- sending ---------------------------------------------------------------------------
    def send_nowait(self, peer: str, frame: lf.Frame) -> bool:
        link = self.links.get(peer)
        ok = link is not None and link.send_nowait(frame)
        if not ok and self.metrics is not None:
            self.metrics.link_drops.inc(peer=peer)
        return ok

    async def wait_link(self, peer: str, timeout_s: float) -> Link:
        with trio.move_on_after(timeout_s):
            while peer not in self.links:
                await self._link_up.wait()
            return self.links[peer]
        raise ChatError("unavailable", f"no link to shard {peer}; retry")

    async def request(self, peer: str, frame: lf.Frame, timeout_s: float = 10.0, on_sent=None) -> lf.Reply:
        """Send ``frame`` (a request: ``send``, ``p_query``) with a fresh ``rid`` to ``peer``
        (waiting up to ``timeout_s`` for a link) and wait for the ``reply`` carrying it."""
        link = await self.wait_link(peer, timeout_s)
        return await self.request_on(link, frame, timeout_s, on_sent)

    async def request_on(self, link: Link, frame: lf.Frame, timeout_s: float, on_sent=None) -> lf.Reply:
        """:meth:`request` on a given link. The answer is the reply, or an ``unavailable`` error
        reply as soon as the link closes; ``ChatError("unavailable")`` after ``timeout_s``."""
        rid = next(self._rids)
        slot = self._pending[rid] = [trio.Event(), None, link]
        try:
            if link.closed.is_set():
                raise ChatError("unavailable", f"link to {link.peer_id} is down")
            await link.send(_with_rid(frame, rid=rid))
            if on_sent is not None:
                on_sent()
            with trio.move_on_after(timeout_s):
                await slot[0].wait()
            if slot[1] is None:
                raise ChatError("unavailable", f"shard {link.peer_id} did not answer in time; retry")
            return slot[1]
        finally:
            self._pending.pop(rid, None)

    def request_nowait(self, link: Link, frame: lf.Frame, on_reply: Callable[[lf.Reply], None],
                       timeout_s: float) -> bool:
        """:meth:`request_on` without a task: queue ``frame`` with a fresh ``rid`` now; ``on_reply``
        is then called exactly once, with the reply, or with an ``unavailable`` error reply as
        soon as the link closes or after ``timeout_s``. False, with nothing done, when the
        link's queue is full or the link is closed (use :meth:`request_on`)."""
        rid = next(self._rids)
        if link.closed.is_set() or link.offer(_with_rid(frame, rid=rid)) is not True:
            return False
        self._pending[rid] = [None, on_reply, link, trio.current_time() + timeout_s]
        if not self._expiring and self._nursery is not None:
            self._expiring = True
            self._nursery.start_soon(self._expire)
        return True

    async def _expire(self) -> None:
        """Answer the :meth:`request_nowait` calls that are overdue; ends when none is pending."""
        try:
            while True:
                await trio.sleep(0.25)
                now = trio.current_time()
                waiting = False
                for rid, slot in list(self._pending.items()):
                    if slot[0] is None:
                        if slot[3] <= now:
                            self._answer(rid, slot, lf.Reply(rid, err={
                                "code": "unavailable", "message": f"shard {slot[2].peer_id} did not answer in time; retry"}))
                        else:
                            waiting = True
                if not waiting:
                    return
        finally:
            self._expiring = False

    def _answer(self, rid: int, slot: list, reply: lf.Reply) -> None:
        """A pending request's answer: wake its :meth:`request_on`, or call (once) and forget its
        :meth:`request_nowait` callback."""
        if slot[0] is None:
            del self._pending[rid]
            try:
                slot[1](reply)
            except Exception:  # a bug in one request's callback must not take the link down
                log.exception("a link reply callback failed")
        else:
            slot[1] = reply
            slot[0].set()

    def reply_nowait(self, link: Link, reply: lf.Reply) -> None:
        """:meth:`reply` from a callback: at once, or (a full queue) from a task that waits for room."""
        if link.offer(reply) is False and self._nursery is not None:
            self._nursery.start_soon(self.reply, link, reply)

    @staticmethod
    async def reply(link: Link, reply: lf.Reply) -> None:
        try:
            await link.send(reply)
        except ChatError:
            pass  # the link is gone; the requester gets 'unavailable' and retries

    def _refused(self, link: Link, frame: lf.Frame, buf: bytearray) -> None:
        """The writer did not send ``frame``: the peer would refuse it (see the module docstring)."""
        link.refused += 1
        name = _NAMES[type(frame)]
        log.warning("a %s frame to %s is above link_max_frame_bytes (%d): not sent", name, link.peer_id,
                    self.cfg.link_max_frame_bytes)
        if self.metrics is not None:
            self.metrics.link_refused.inc(peer=link.peer_id, type=name)
        error = {"code": "frame_too_large", "message": f"the {name} frame exceeds the link's frame size limit"}
        if frame.REQUEST:
            slot = self._pending.get(frame.rid)
            if slot is not None and slot[2] is link:
                self._answer(frame.rid, slot, lf.Reply(frame.rid, err=error))
        elif type(frame) is lf.Reply:
            link.codec.append(buf, lf.Reply(frame.rid, err=error))
        else:
            link.needs_resync = True  # a live frame lost, as on a full queue

    async def _dispatch(self, link: Link, frame) -> None:
        t = type(frame)
        if t is lf.Reply:
            slot = self._pending.get(frame.rid)
            if slot is not None:
                self._answer(frame.rid, slot, frame)
        elif t is lf.Unknown:
            log.warning("unknown link frame %r from %s: skipped", frame.t, link.peer_id)
        elif t is lf.Malformed:
            log.warning("malformed %r frame from %s: %s", frame.t, link.peer_id, frame.error)
            if frame.rid is not None:
                error = {"code": "bad_frame", "message": f"malformed {frame.t}"}
                if frame.t != "reply":
                    await self.reply(link, lf.Reply(frame.rid, err=error))
                elif (slot := self._pending.get(frame.rid)) is not None and slot[2] is link:
                    self._answer(frame.rid, slot, lf.Reply(frame.rid, err=error))
        else:
            await self._on_frame(link, frame)


_PING = lf.Ping()
_RESYNC = lf.Resync()
_NAMES = lf.NAMES
_with_rid = msgspec.structs.replace


async def _read_frame(stream, codec: lp.LinkCodec):
    while (frame := codec.next_frame()) is None:
        data = await stream.receive_some(65536)
        if not data:
            raise lp.LinkProtocolError("peer closed during the handshake")
        codec.receive_data(data)
    return frame
