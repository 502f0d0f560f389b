"""ZooKeeper discovery (kazoo), bridged into trio.

ZooKeeper layout (``root`` defaults to ``/chatd``)::

    /chatd/shards/<shard id>       ephemeral; JSON ShardInfo {shard_id, ws_url, link_addr, load}
    /chatd/presence/<server id>    ephemeral; the same JSON (ws_url empty), for presence servers

One instance watches (and may register in) one of the two sets (``kind``); :func:`zk_discovery`
builds one from the cluster config. It has the :class:`~chatd.discovery.base.Discovery` face.

Threads and trio: kazoo runs its own connection thread and calls watchers and state listeners on
it. Those callbacks do nothing but hand an event to trio with ``TrioToken.run_sync_soon``; every
blocking kazoo call is made from trio through ``trio.to_thread.run_sync``, abandoned on cancel (a
process stops even while ZooKeeper is down). The event loop never blocks on ZooKeeper.

Policies

* **View**: a watch task reads the children (with the parent's ``cversion`` as the view version)
  and each child's data whenever ZooKeeper reports a change, and every ``load_refresh_s`` to pick
  up load figures. Read errors (connection loss) are retried with backoff (capped at 0.5 s); the
  last view stays.
* **Reconnection**: kazoo reconnects with a backoff capped at ``RECONNECT_MAX_DELAY_S``, so writes
  resume within about a second of ZooKeeper answering again (session kept), or once the znode is
  created again under a new session (session expired).
* **Access control** (``cluster.zk_auth = "user:password"``): the client authenticates with that
  digest and every znode chatd creates (the root, ``shards``, ``presence``, the ephemeral ones)
  carries one ACL: that identity, all permissions; nobody else may read, write, create or delete
  under them. The root and this instance's set, when they exist with another ACL (made before
  zk_auth was set), are given chatd's ACL at start-up (a node whose ACL chatd may not change is
  an error naming it). Without zk_auth: no authentication, ZooKeeper's open ACL.
* **Registration and the write barrier**: ``writable`` is True only while our ephemeral znode
  exists under our current session. On SUSPENDED or LOST it turns False at once (the owner shard
  refuses sends with ``unavailable``); on reconnection the znode is checked or created again
  (waiting for a stale znode of an expired session of ours to vanish) before it turns True.
"""

from __future__ import annotations

import logging

from typing import Callable

import trio
from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import KazooException, NoAuthError, NodeExistsError, NoNodeError
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.retry import KazooRetry
from kazoo.security import make_digest_acl

from .view import ShardInfo, View

log = logging.getLogger(__name__)

# Reconnection to ZooKeeper: kazoo's default backoff doubles up to an hour, so after a 10 s outage
# the next attempt came up to ~10 s after the ensemble was back. Capped, a shard reconnects (and
# writes resume) within ~0.6 s of ZooKeeper answering again; an attempt to a down server costs a
# refused connection.
RECONNECT_MAX_DELAY_S = 0.5
RETRY_MAX_DELAY_S = 0.5  # our own retries of failed reads and registrations


def zk_discovery(cluster, kind: str = "shards") -> "ZkDiscovery":
    """The discovery of a cluster process, from its ``[cluster]`` config (``ClusterConfig``):
    ``kind`` "shards" (the chat shards) or "presence" (the presence servers)."""
    return ZkDiscovery(cluster.zk_hosts, cluster.zk_root, cluster.zk_session_timeout_s, cluster.load_refresh_s,
                       cluster.overload_connections if kind == "shards" else 0, kind=kind, auth=cluster.zk_auth)


def digest_acl(auth: str) -> list:
    """The one ACL of chatd's znodes for ``auth`` ("user:password"): that identity, all permissions."""
    user, _, password = auth.partition(":")
    return [make_digest_acl(user, password, all=True)]


async def _kazoo(fn, *args):
    """A blocking kazoo call in a worker thread. Cancelling abandons the thread (it finishes or
    stays blocked on its own; worker threads are daemons): with the ensemble down a kazoo call
    can block for as long as kazoo retries, and a stopping process must not wait for that."""
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)


class ZkDiscovery:
    def __init__(self, hosts: str, root: str = "/chatd", session_timeout_s: float = 10.0,
                 load_refresh_s: float = 2.0, overload_connections: int = 0, kind: str = "shards",
                 auth: str = ""):
        self.hosts = hosts
        self._auth = auth  # "user:password" (digest) or "": see the module's "Access control"
        self.root = root.rstrip("/") or "/chatd"
        self.kind = kind  # "shards" or "presence": which set of servers this instance watches
        self.shards_path = f"{self.root}/{kind}"
        self.session_timeout_s = session_timeout_s
        self.load_refresh_s = load_refresh_s
        self.overload_connections = overload_connections
        self.view = View()
        self.writable = False
        self.can_lose_session = True  # the ZooKeeper session expires while a stalled process sleeps
        self._listeners: list[Callable[[View, View], None]] = []
        self._zk: KazooClient | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._changed = trio.Event()  # children changed or the connection state changed
        self._state_changed = trio.Event()
        self._registration: ShardInfo | None = None
        self._load: Callable[[], int] = lambda: 0
        self._view_event = trio.Event()  # set (and replaced) whenever the view changes
        self._registering = trio.Lock()

    # ---- lifecycle ---------------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Connect, keep the view current (and our registration alive); never returns."""
        self._token = trio.lowlevel.current_trio_token()
        acl = digest_acl(self._auth) if self._auth else None
        zk = self._zk = KazooClient(hosts=self.hosts, timeout=self.session_timeout_s,
                                    connection_retry=KazooRetry(max_tries=-1, delay=0.05, backoff=2, max_jitter=0.2,
                                                                max_delay=RECONNECT_MAX_DELAY_S),
                                    auth_data=[("digest", self._auth)] if self._auth else None, default_acl=acl)
        zk.add_listener(self._on_state_thread)
        try:
            try:
                await _kazoo(lambda: zk.start(timeout=max(5.0, self.session_timeout_s)))
            except KazooTimeoutError:
                raise RuntimeError(f"cannot reach ZooKeeper at {self.hosts}") from None
            await _kazoo(zk.ensure_path, self.shards_path)
            if acl is not None:
                await _kazoo(self._own_paths, acl)
            async with trio.open_nursery() as nursery:
                await nursery.start(self._watch_loop)
                task_status.started()
        finally:
            self.writable = False
            with trio.CancelScope(shield=True):
                with trio.move_on_after(3):  # kazoo's stop waits up to 10 s for a dead ensemble
                    await _kazoo(self._stop_client)

    def _own_paths(self, acl: list) -> None:  # worker thread
        """Give the root and our set chatd's ACL where they carry another one."""
        for path in (self.root, self.shards_path):
            try:
                current, _ = self._zk.get_acls(path)
                if list(current) == acl:
                    continue
                self._zk.set_acls(path, acl)
            except NoAuthError:
                raise RuntimeError(f"ZooKeeper node {path} has an ACL that does not let cluster.zk_auth's "
                                   f"identity change it; set its ACL (zkCli setAcl) or remove it") from None
            log.info("zookeeper: %s now has chatd's ACL (cluster.zk_auth)", path)

    def _stop_client(self) -> None:
        try:
            self._zk.stop()
            self._zk.close()
        except Exception as e:  # noqa: BLE001 - best effort on the way out
            log.debug("zookeeper stop: %s", e)

    def _on_state_thread(self, state) -> None:  # kazoo thread
        try:
            self._token.run_sync_soon(self._on_state, state)
        except trio.RunFinishedError:
            pass

    def _on_state(self, state) -> None:
        log.info("zookeeper connection state: %s", state)
        if state in (KazooState.SUSPENDED, KazooState.LOST):
            if self.writable:
                log.warning("zookeeper session %s: refusing writes until registered again",
                            "suspended" if state == KazooState.SUSPENDED else "lost")
            self.writable = False
        self._state_changed.set()
        self._changed.set()

    def _on_watch_thread(self, _event) -> None:  # kazoo thread
        try:
            self._token.run_sync_soon(self._changed.set)
        except trio.RunFinishedError:
            pass

    # ---- the view --------------------------------------------------------------------------
    def on_change(self, fn: Callable[[View, View], None]) -> None:
        self._listeners.append(fn)

    async def wait_view(self, min_version: int, timeout_s: float) -> bool:
        """Until our view is at least ``min_version`` (a peer routed something by it). A newer
        view exists, so read ZooKeeper again now rather than wait for the watch or the refresh."""
        if self.view.version < min_version:
            self._changed.set()
        with trio.move_on_after(timeout_s):
            while self.view.version < min_version:
                await self._view_changed().wait()
            return True
        return False

    def _view_changed(self) -> trio.Event:
        if self._view_event.is_set():
            self._view_event = trio.Event()
        return self._view_event

    def _read_view(self) -> View:  # worker thread
        zk = self._zk
        children, stat = zk.get_children(self.shards_path, watch=self._on_watch_thread, include_data=True)
        shards = {}
        for child in children:
            try:
                data, _ = zk.get(f"{self.shards_path}/{child}")
                info = ShardInfo.from_json(data)
            except NoNodeError:
                continue
            except (ValueError, KeyError, TypeError) as e:
                log.warning("ignoring malformed shard znode %s: %s", child, e)
                continue
            shards[info.shard_id] = info
        return View(stat.cversion, shards)

    async def _watch_loop(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        backoff = 0.1
        started = False
        while True:
            self._changed = trio.Event()
            try:
                if self._registration is not None:
                    await self._ensure_registered()
                view = await _kazoo(self._read_view)
                backoff = 0.1
            except KazooException as e:
                log.warning("zookeeper read failed (%s); retrying in %.1fs", type(e).__name__, backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX_DELAY_S)
                continue
            self._apply(view)
            if not started:
                started = True
                task_status.started()
            with trio.move_on_after(self.load_refresh_s):
                await self._changed.wait()
            if self._registration is not None and self.writable:
                await self._publish_load()

    def _apply(self, view: View) -> None:
        old = self.view
        if view.version == old.version and view.shards == old.shards:
            return
        self.view = view
        if view.version != old.version:
            log.info("cluster view v%d: %s", view.version, ", ".join(sorted(view.shards)) or "(no shards)")
        for fn in list(self._listeners):
            fn(old, view)
        self._view_changed().set()

    # ---- registration ----------------------------------------------------------------------
    async def register(self, info: ShardInfo, load: Callable[[], int]) -> None:
        """Create our ephemeral znode; return once it exists (then ``writable`` is True) and our
        own view includes it (so we never serve a client while believing no shard is live)."""
        self._registration = info
        self._load = load
        await self._ensure_registered()
        while info.shard_id not in self.view.shards:
            # read it ourselves: waiting for the watch loop's next read can take a refresh period
            view = await _kazoo(self._read_view)
            if view.version >= self.view.version:  # the watch loop may have applied a newer one
                self._apply(view)
            if info.shard_id not in self.view.shards:
                with trio.move_on_after(0.2):
                    await self._view_changed().wait()

    async def unregister(self) -> None:
        info, self._registration = self._registration, None
        self.writable = False
        if info is not None:
            try:
                await _kazoo(self._zk.delete, f"{self.shards_path}/{info.shard_id}")
            except KazooException:
                pass

    def _current_data(self) -> bytes:
        info = self._registration
        return ShardInfo(info.shard_id, info.ws_url, info.link_addr, self._load()).to_json()

    async def _ensure_registered(self) -> None:
        # register() and the watch loop both call this: one at a time, or they race to create
        # the znode and the loser would sleep (and the view go unread) for a retry period
        async with self._registering:
            await self._ensure_registered_locked()

    async def _ensure_registered_locked(self) -> None:
        path = f"{self.shards_path}/{self._registration.shard_id}"
        while True:
            if self._registration is None:
                return
            zk = self._zk
            try:
                stat = await _kazoo(zk.exists, path)
                if stat is not None and stat.ephemeralOwner == zk.client_id[0]:
                    break
                if stat is None:
                    data = self._current_data()
                    await _kazoo(lambda: zk.create(path, data, ephemeral=True, makepath=True))
                    log.info("registered %s in zookeeper", path)
                    break
                log.warning("%s is held by another session (a previous run that has not expired yet?); waiting",
                            path)
            except NodeExistsError:
                continue  # created since we looked (by a session of ours?): look again at once
            except KazooException as e:
                log.warning("zookeeper registration failed (%s); retrying", type(e).__name__)
            await trio.sleep(min(RETRY_MAX_DELAY_S, self.session_timeout_s / 8))
        self.writable = True

    async def _publish_load(self) -> None:
        try:
            await _kazoo(self._zk.set, f"{self.shards_path}/{self._registration.shard_id}", self._current_data())
        except (KazooException, AttributeError):
            pass

    # ---- logins ------------------------------------------------------------------------------
    def live(self) -> list[ShardInfo]:
        return list(self.view.shards.values())

    def pick_shard(self, user_id: int) -> ShardInfo:
        return self.view.pick_for_login(user_id, self.overload_connections)


