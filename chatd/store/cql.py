"""The cassandra-driver, bridged into trio. No chatd domain logic lives here.

* :func:`await_response` waits for a driver ``ResponseFuture`` without blocking the event loop and
  without a thread per query: the driver's I/O thread calls our callback, which hands the wake-up to
  trio with ``TrioToken.run_sync_soon``; the waiting task is parked in
  ``trio.lowlevel.wait_task_rescheduled`` meanwhile. Cancelling the waiting task abandons the request
  (the driver still finishes it, bounded by the request timeout; its result is dropped), so a write
  whose caller was cancelled *may* still apply - callers must be idempotent or deduplicated.
* :class:`CqlRunner` turns named statements into rows: paging (``fetch_size`` + ``paging_state``),
  lightweight-transaction results (``[applied]``), batches. :class:`CqlSession` is the real one over a
  driver ``Session``; tests provide another implementation of the same two primitives.
* Error policy: every driver failure (timeouts, ``Unavailable``, ``NoHostAvailable``, a broken
  connection, a rejected statement) becomes ``ChatError("unavailable")``; the driver's own retry
  policy has already run by then. A timed-out LWT has an unknown outcome - it may still apply - which
  is safe for every caller in this package (see ``chatd/store/cassandra.py``).
* Connecting (``Cluster(...).connect()``, DNS resolution, preparing statements) blocks, so it runs in
  a worker thread at start-up only.
* TLS (``cassandra.tls_ca_file``; :func:`ssl_context`): the driver's connections are TLS 1.2+,
  each node's certificate checked against that CA (and, with ``tls_check_hostname``, against the
  address it is reached at), with a client certificate when ``tls_cert_file``/``tls_key_file``
  are set. A CA, certificate or key that cannot be loaded is a start-up error naming the setting.
"""

from __future__ import annotations

import abc
import logging
import re
import ssl
from dataclasses import dataclass

import outcome
import trio
from cassandra import ConsistencyLevel, DriverException, ProtocolVersion
from cassandra.cluster import NoHostAvailable
from cassandra.connection import ConnectionException

from ..config import CassandraConfig
from ..errors import ChatError

log = logging.getLogger(__name__)

# Every exception family the driver raises for a failed request.
DRIVER_ERRORS = (DriverException, NoHostAvailable, ConnectionException)

# Statement kinds: which consistency levels a prepared statement is executed with.
READ, WRITE, LWT = "read", "write", "lwt"

PAGE_ROWS = 500  # fetch_size: rows per round trip when a query pages
_KEYSPACE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,47}")


# ---- pure helpers ---------------------------------------------------------------------------
def consistency_level(name: str) -> int:
    """``"LOCAL_QUORUM"`` -> the driver's constant; ``ValueError`` naming the bad value."""
    try:
        return ConsistencyLevel.name_to_value[name.strip().upper()]
    except KeyError:
        known = ", ".join(ConsistencyLevel.name_to_value)
        raise ValueError(f"unknown consistency level {name!r} (known: {known})") from None


def ssl_context(cfg: CassandraConfig) -> ssl.SSLContext | None:
    """The driver's TLS context from the ``cassandra.tls_*`` keys; None when ``tls_ca_file`` is
    empty (plain connections). ``ValueError`` naming the setting whose file does not load."""
    if not cfg.tls_ca_file:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = cfg.tls_check_hostname
    try:
        ctx.load_verify_locations(cafile=cfg.tls_ca_file)
    except (ssl.SSLError, OSError) as e:
        raise ValueError(f"cassandra.tls_ca_file: cannot load {cfg.tls_ca_file} as PEM CA certificates: {e}") from None
    if cfg.tls_cert_file:
        try:
            ctx.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file, password=_no_passphrase)
        except (ssl.SSLError, OSError, ValueError) as e:
            raise ValueError(f"cassandra.tls_cert_file / tls_key_file ({cfg.tls_cert_file}, {cfg.tls_key_file}): "
                             f"not a PEM certificate chain and its matching unencrypted key ({e})") from None
    return ctx


def _no_passphrase(*_args) -> bytes:
    raise ValueError("the key is protected by a passphrase; chatd needs an unencrypted key file")


def parse_contact_points(text: str, default_port: int) -> list[tuple[str, int]]:
    """``"a, b:9043, [::1]:9044"`` -> ``[("a", default_port), ("b", 9043), ("::1", 9044)]``."""
    out = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        host, port = item, default_port
        if item.startswith("["):  # [ipv6]:port or [ipv6]
            host, _, rest = item[1:].partition("]")
            if rest.startswith(":"):
                port = int(rest[1:])
        elif item.count(":") == 1:
            host, p = item.split(":")
            port = int(p)
        out.append((host, port))
    if not out:
        raise ValueError("cassandra.contact_points is empty")
    return out


def check_keyspace_name(name: str) -> str:
    """Keyspace names end up in DDL text (they cannot be bound), so only plain identifiers pass."""
    if not _KEYSPACE_RE.fullmatch(name):
        raise ValueError(f"invalid keyspace name {name!r}: use letters, digits and '_' (max 48)")
    return name


_TABLE_RE = re.compile(r"\b(FROM|INTO|UPDATE)\s+([A-Za-z_]\w*)\b(?!\.)")


def qualify(cql: str, keyspace: str) -> str:
    """The statement with its table named as ``keyspace.table``: Cassandra warns about prepared
    statements that rely on the session's ``USE`` keyspace (ambiguous on a shared connection)."""
    return _TABLE_RE.sub(lambda m: f"{m.group(1)} {keyspace}.{m.group(2)}", cql, count=1)


def unavailable(error: BaseException, what: str) -> ChatError:
    """The chatd error for a failed driver request (logged here, once)."""
    log.warning("cassandra %s failed: %s: %s", what, type(error).__name__, error)
    return ChatError("unavailable", "the message store is unavailable; retry")


# ---- the future -> trio bridge --------------------------------------------------------------
class _Waiter:
    __slots__ = ("task", "token", "abandoned")

    def __init__(self):
        self.task = trio.lowlevel.current_task()
        self.token = trio.lowlevel.current_trio_token()
        self.abandoned = False  # only read and written on the trio thread

    # Called on a driver thread (or synchronously, if the future was already done).
    def on_result(self, _rows) -> None:
        self._deliver(outcome.Value(None))

    def on_error(self, exc) -> None:
        self._deliver(outcome.Error(exc))

    def _deliver(self, result: outcome.Outcome) -> None:
        try:
            self.token.run_sync_soon(self._wake, result)
        except trio.RunFinishedError:  # trio is gone; nobody is waiting any more
            pass

    def _wake(self, result: outcome.Outcome) -> None:  # on the trio thread
        if not self.abandoned:
            trio.lowlevel.reschedule(self.task, result)


async def await_response(future):
    """Wait until the driver ``future`` completes; return ``future.result()`` (which no longer
    blocks: the driver sets the result before it runs callbacks) or raise its exception."""
    waiter = _Waiter()
    future.add_callbacks(waiter.on_result, waiter.on_error)

    def abort(_raise_cancel):
        waiter.abandoned = True
        return trio.lowlevel.Abort.SUCCEEDED

    await trio.lowlevel.wait_task_rescheduled(abort)
    return future.result()


# ---- running named statements -----------------------------------------------------------------
@dataclass
class Page:
    rows: list[dict]
    paging_state: bytes | None


class CqlRunner(abc.ABC):
    """Named statements in, rows (dicts) out. Subclasses implement :meth:`execute` and
    :meth:`execute_batch`; both raise only ``ChatError("unavailable")`` for store failures."""

    @abc.abstractmethod
    async def execute(self, name: str, params: tuple, *, paging_state: bytes | None = None,
                      fetch_size: int = PAGE_ROWS) -> Page: ...

    @abc.abstractmethod
    async def execute_batch(self, items: list[tuple[str, tuple]], *, conditional: bool) -> list[dict]: ...

    async def rows(self, name: str, params: tuple) -> list[dict]:
        """All rows, fetched page by page (callers bound the result with a LIMIT or a partition)."""
        page = await self.execute(name, params)
        out = list(page.rows)
        while page.paging_state is not None:
            page = await self.execute(name, params, paging_state=page.paging_state)
            out.extend(page.rows)
        return out

    async def one(self, name: str, params: tuple) -> dict | None:
        page = await self.execute(name, params, fetch_size=2)
        return page.rows[0] if page.rows else None

    async def write(self, name: str, params: tuple) -> None:
        await self.execute(name, params)

    async def lwt(self, name: str, params: tuple) -> tuple[bool, dict]:
        """Run a conditional statement: (applied, row). When not applied the row holds the current
        values of the condition's columns (all columns for ``IF NOT EXISTS``; none if no row)."""
        page = await self.execute(name, params)
        return _applied(page.rows)

    async def batch(self, items: list[tuple[str, tuple]], *, conditional: bool = False) -> tuple[bool, dict]:
        """One batch; with ``conditional`` all statements must target one partition (a LWT)."""
        rows = await self.execute_batch(items, conditional=conditional)
        return _applied(rows) if conditional else (True, {})


def _applied(rows: list[dict]) -> tuple[bool, dict]:
    if not rows:
        raise ChatError("unavailable", "the store returned no result for a conditional write")
    row = dict(rows[0])
    return bool(row.pop("[applied]")), row


class CqlSession(CqlRunner):
    """A driver ``Session`` with every statement prepared once at start-up."""

    def __init__(self, session, prepared: dict, *, write_cl: int, serial_cl: int, max_inflight: int = 1024):
        self._session = session
        self._prepared = prepared
        self._write_cl = write_cl
        self._serial_cl = serial_cl
        self._limiter = trio.Semaphore(max_inflight)  # bounds outstanding driver requests

    @classmethod
    async def prepare(cls, session, statements: dict[str, tuple[str, str]], cfg: CassandraConfig,
                      **kw) -> "CqlSession":
        """Prepare ``{name: (kind, cql)}`` (in a worker thread: ``Session.prepare`` blocks)."""
        read_cl = consistency_level(cfg.read_consistency)
        write_cl = consistency_level(cfg.write_consistency)
        serial_cl = consistency_level(cfg.serial_consistency)

        keyspace = check_keyspace_name(cfg.keyspace)

        def prepare_all():
            out = {}
            for name, (kind, cql) in statements.items():
                ps = session.prepare(qualify(cql, keyspace))
                ps.consistency_level = read_cl if kind == READ else write_cl
                if kind == LWT:
                    ps.serial_consistency_level = serial_cl
                ps.is_idempotent = kind == READ
                out[name] = ps
            return out
        try:
            prepared = await trio.to_thread.run_sync(prepare_all)
        except DRIVER_ERRORS as e:
            raise RuntimeError(f"cassandra: preparing statements failed: {e}") from e
        return cls(session, prepared, write_cl=write_cl, serial_cl=serial_cl, **kw)

    async def execute(self, name, params, *, paging_state=None, fetch_size=PAGE_ROWS):
        bound = self._prepared[name].bind(params)
        bound.fetch_size = fetch_size
        async with self._limiter:
            try:
                future = self._session.execute_async(bound, paging_state=paging_state)
                result = await await_response(future)
            except DRIVER_ERRORS as e:
                raise unavailable(e, name) from e
            return Page(list(result.current_rows), result.paging_state)

    async def execute_batch(self, items, *, conditional):
        from cassandra.query import BatchStatement, BatchType
        batch = BatchStatement(batch_type=BatchType.UNLOGGED, consistency_level=self._write_cl,
                               serial_consistency_level=self._serial_cl if conditional else None)
        for name, params in items:
            batch.add(self._prepared[name], params)
        async with self._limiter:
            try:
                result = await await_response(self._session.execute_async(batch))
            except DRIVER_ERRORS as e:
                raise unavailable(e, "batch " + "+".join(n for n, _ in items)) from e
            return list(result.current_rows)


# ---- connecting ---------------------------------------------------------------------------------
def _connect_blocking(cfg: CassandraConfig, keyspace: str | None, tls: ssl.SSLContext | None = None):
    from cassandra.auth import PlainTextAuthProvider
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy
    from cassandra.query import dict_factory

    profile = ExecutionProfile(
        load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=cfg.local_dc or None)),
        consistency_level=consistency_level(cfg.write_consistency),
        serial_consistency_level=consistency_level(cfg.serial_consistency),
        request_timeout=cfg.request_timeout_s,
        row_factory=dict_factory)
    auth = PlainTextAuthProvider(cfg.username, cfg.password) if cfg.username else None
    cluster = Cluster(contact_points=parse_contact_points(cfg.contact_points, cfg.port), port=cfg.port,
                      protocol_version=ProtocolVersion.V4, execution_profiles={EXEC_PROFILE_DEFAULT: profile},
                      auth_provider=auth, connect_timeout=cfg.connect_timeout_s, ssl_context=tls)
    try:
        try:
            session = cluster.connect()
        except NoHostAvailable:
            _check_dc_and_keyspace(cluster, cfg, keyspace)  # raises what it can explain
            raise
        _check_dc_and_keyspace(cluster, cfg, keyspace)  # a wrong local_dc may still have connected
        if keyspace:
            session.set_keyspace(keyspace)
        return cluster, session
    except BaseException:
        cluster.shutdown()
        raise


def _check_dc_and_keyspace(cluster, cfg: CassandraConfig, keyspace: str | None) -> None:
    """What the control connection learnt, as an operator's error: a ``local_dc`` the cluster does
    not have (the driver then sends nothing anywhere), or a keyspace that does not exist yet."""
    dcs = sorted(live_nodes_by_dc(cluster, all_nodes=True))
    if not dcs:  # the control connection never connected: nothing to explain
        return
    if cfg.local_dc and cfg.local_dc not in dcs:
        raise RuntimeError(f"cassandra.local_dc = {cfg.local_dc!r} is not a data center of this cluster; "
                           f"the driver sees: {', '.join(map(repr, dcs))} (set cassandra.local_dc to one of them)")
    if keyspace and keyspace not in cluster.metadata.keyspaces:
        raise RuntimeError(f"Cassandra keyspace {keyspace!r} does not exist; run `chatd store migrate`")


def live_nodes_by_dc(cluster, *, all_nodes: bool = False) -> dict[str, int]:
    """data center -> how many of its nodes the driver does not know to be down (every node it
    knows with ``all_nodes``), from the connected cluster's metadata."""
    out: dict[str, int] = {}
    for host in cluster.metadata.all_hosts():
        if host.datacenter is None:
            continue
        out.setdefault(host.datacenter, 0)
        if all_nodes or host.is_up is not False:
            out[host.datacenter] += 1
    return out


async def connect(cfg: CassandraConfig, keyspace: str | None):
    """``(cluster, session)``; a failure is a ``RuntimeError`` with the reason, on one line
    (start-up error): unreachable contact points, an unknown ``local_dc`` (naming the data centers
    the driver sees), a keyspace that does not exist."""
    try:  # the whole section is checked before any network I/O
        for name in (cfg.read_consistency, cfg.write_consistency, cfg.serial_consistency):
            consistency_level(name)
        parse_contact_points(cfg.contact_points, cfg.port)
        tls = ssl_context(cfg)
    except ValueError as e:
        raise RuntimeError(f"cassandra configuration: {e}") from e
    try:
        return await trio.to_thread.run_sync(_connect_blocking, cfg, keyspace, tls)
    except (*DRIVER_ERRORS, OSError) as e:
        where = f"{cfg.contact_points} (port {cfg.port})"
        raise RuntimeError(f"cannot connect to Cassandra at {where}: {error_text(e)}; check "
                           f"cassandra.contact_points and cassandra.port, and that Cassandra is running") from e


def error_text(error: BaseException) -> str:
    """A driver exception as one short line (``NoHostAvailable`` lists one reason per host)."""
    if isinstance(error, NoHostAvailable) and isinstance(error.errors, dict) and error.errors:
        reasons = {error_text(e) if isinstance(e, BaseException) else str(e) for e in error.errors.values()}
        text = f"{error.args[0]}: {'; '.join(sorted(reasons))}"
    else:
        text = str(error) or type(error).__name__
        m = re.search(r'message="(.*?)"', text)  # "Error from server: code=... message="...""
        if m:
            text = m.group(1)
        if getattr(error, "alive_replicas", None) is not None:  # Unavailable
            text += f" ({error.required_replicas} replicas required, {error.alive_replicas} alive)"
    return " ".join(text.split())


# Which failed schema statements mean "this was already done" (a step re-run after a crash):
# CREATE without IF NOT EXISTS -> AlreadyExists; ALTER TABLE ... ADD of a column that is there ->
# InvalidRequest "Column with name 'c' already exists" (Cassandra 4.0-5.0), "... conflicts with
# an existing column" (3.x).
_ALREADY_DONE = re.compile(r"already exists|conflicts with an existing column", re.IGNORECASE)


async def execute_ddl(session, cql: str, *, ok_if_exists: bool = False, timeout_s: float = 120.0) -> bool:
    """A schema statement (not prepared: DDL runs once, from ``chatd store migrate``); True if it
    applied. With ``ok_if_exists`` a statement whose effect is already there (a table or keyspace
    that exists, an ``ALTER TABLE ... ADD`` of a column that exists) is taken as done and returns
    False: that is what makes a migration step safe to re-run after it half applied. The column's
    type is not compared. Any other failure: ``RuntimeError`` naming the statement, on one line."""
    from cassandra import AlreadyExists, InvalidRequest
    try:
        await await_response(session.execute_async(cql, timeout=timeout_s))
        return True
    except AlreadyExists:
        if ok_if_exists:
            return False
        raise _ddl_error(cql, "already exists") from None
    except InvalidRequest as e:
        if ok_if_exists and _ALREADY_DONE.search(str(e)):
            log.info("already applied: %s (%s)", _ddl_head(cql), error_text(e))
            return False
        raise _ddl_error(cql, error_text(e)) from e
    except DRIVER_ERRORS as e:
        raise _ddl_error(cql, error_text(e)) from e


def _ddl_head(cql: str) -> str:
    """``CREATE TABLE IF NOT EXISTS ks.t (...`` -> ``CREATE TABLE IF NOT EXISTS ks.t``."""
    return " ".join(cql.split("(")[0].split())


def _ddl_error(cql: str, reason: str) -> RuntimeError:
    return RuntimeError(f"cassandra: {_ddl_head(cql)} failed: {reason}")


async def shutdown(cluster) -> None:
    await trio.to_thread.run_sync(cluster.shutdown)
