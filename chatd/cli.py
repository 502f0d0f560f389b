"""The ``chatd`` command. click only parses arguments and calls the role's ``serve_*``."""

from __future__ import annotations

import logging
import signal
import sqlite3
import sys
import time

import click
import trio

from .config import Config, ConfigError


def _load(config_path, **overrides) -> Config:
    flat: dict = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = flat
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return Config.load(config_path, overrides=flat)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


def _setup_logging(level: str, *, quiet_driver: bool = False, config: Config | None = None, role: str = "") -> None:
    """Logs to stderr (chatd/logsetup.py): with ``config``, in its ``log_format`` and ``log_levels``."""
    from .logsetup import setup_logging
    if config is None:
        setup_logging(level, quiet_driver=quiet_driver)
        return
    node = {"presence": config.presence.server_id, "api": "api"}.get(role, config.server.shard_id)
    setup_logging(level, fmt=config.log_format, levels=config.log_levels, role=role, node=node,
                  quiet_driver=quiet_driver)


def operator_error(error: BaseException) -> str | None:
    """The one-line message of a start-up failure an operator must fix (a ``RuntimeError`` or
    ``ValueError`` chatd raised with what to do), also when trio wrapped it in
    ``ExceptionGroup``s (errors of a nursery's tasks); None for anything else - a bug keeps its
    traceback."""
    if isinstance(error, BaseExceptionGroup):
        leaves = [operator_error(e) for e in error.exceptions]
        if not leaves or None in leaves:
            return None
        return "; ".join(dict.fromkeys(leaves))  # the distinct messages, in order
    if isinstance(error, (RuntimeError, ValueError)) and str(error):
        return " ".join(str(error).split())
    return None


@click.group()
@click.version_option(package_name="chatd")
def main():
    """chatd: a sharded chat server (WebSocket clients, durable ordered history)."""


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option("--data-dir", help="Data directory (created on first start). [default: ./data]")
@click.option("--api-port", type=int, help="HTTP API port (0 = any free port).")
@click.option("--ws-port", type=int, help="WebSocket port (0 = any free port).")
@click.option("--host", help="Listen address for both API and WebSocket.")
@click.option("--log-format", type=click.Choice(["text", "json"]), help="Log lines as text or one JSON object each.")
def run(config_path, data_dir, api_port, ws_port, host, log_format):
    """Everything in one process: API + one chat shard, no ZooKeeper.

    The store is SQLite in the data directory unless the config says store.backend = "cassandra"
    (run `chatd store migrate` first; see docs/cassandra.md)."""
    from .node import serve_run

    config = _load(config_path, data_dir=data_dir, log_format=log_format,
                   **{"server.api_port": api_port, "server.ws_port": ws_port, "server.api_host": host,
                      "server.ws_host": host})
    _serve_role(serve_run, config)


def _serve_role(serve, config, cluster_role: str | None = None) -> None:
    """Run a role until SIGINT/SIGTERM (graceful) or a second signal (at once); SIGHUP reloads
    the TLS certificate and key (``server.tls_cert_file`` / ``tls_key_file``)."""
    if cluster_role is not None:
        try:
            config.validate_cluster(cluster_role)
        except ConfigError as e:
            raise click.ClickException(str(e)) from None
    _setup_logging(config.log_level, config=config, role=cluster_role or "run")

    async def main_task():
        node_box: list = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signals, node_box, nursery.cancel_scope)
            nursery.start_soon(_reload_on_sighup, node_box)
            await serve(config, node_out=node_box)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main_task)
    except (RuntimeError, ValueError, BaseExceptionGroup) as e:
        # e.g. ZooKeeper unreachable, a database written by a newer chatd, a keyspace to migrate
        message = operator_error(e)
        if message is None:
            raise
        raise click.ClickException(message) from None


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option("--shard-id", help="This shard's id (unique in the cluster).")
@click.option("--ws-port", type=int, help="WebSocket port (0 = any free port).")
@click.option("--link-port", type=int, help="Inter-shard link port (0 = any free port).")
@click.option("--http-port", type=int, help="Admin HTTP port for /healthz and /metrics (0 = any free port).")
@click.option("--zk", "zk_hosts", help="ZooKeeper hosts, e.g. 127.0.0.1:2181.")
@click.option("--log-format", type=click.Choice(["text", "json"]), help="Log lines as text or one JSON object each.")
def shard(config_path, shard_id, ws_port, link_port, http_port, zk_hosts, log_format):
    """A chat shard of a cluster: client WebSockets, channel ownership, links to other shards."""
    from .node import serve_shard

    config = _load(config_path, log_format=log_format, **{"server.shard_id": shard_id, "server.ws_port": ws_port,
                                   "cluster.link_port": link_port, "server.api_port": http_port,
                                   "cluster.zk_hosts": zk_hosts})
    _serve_role(serve_shard, config, cluster_role="shard")


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option("--api-port", type=int, help="HTTP API port (0 = any free port).")
@click.option("--zk", "zk_hosts", help="ZooKeeper hosts, e.g. 127.0.0.1:2181.")
@click.option("--log-format", type=click.Choice(["text", "json"]), help="Log lines as text or one JSON object each.")
def api(config_path, api_port, zk_hosts, log_format):
    """A stateless HTTP API server of a cluster (run any number); discovery from ZooKeeper."""
    from .node import serve_api_role

    config = _load(config_path, log_format=log_format, **{"server.api_port": api_port, "cluster.zk_hosts": zk_hosts})
    _serve_role(serve_api_role, config, cluster_role="api")


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option("--presence-id", help="This presence server's id (unique among presence servers).")
@click.option("--link-port", type=int, help="Link port shards and API servers dial (0 = any free port).")
@click.option("--zk", "zk_hosts", help="ZooKeeper hosts, e.g. 127.0.0.1:2181.")
@click.option("--log-format", type=click.Choice(["text", "json"]), help="Log lines as text or one JSON object each.")
def presence(config_path, presence_id, link_port, zk_hosts, log_format):
    """A presence server of a cluster: online/offline, last_active_at, status fan-out."""
    from .presence.server import serve_presence

    config = _load(config_path, log_format=log_format, **{"presence.server_id": presence_id, "cluster.link_port": link_port,
                                   "cluster.zk_hosts": zk_hosts})
    _serve_role(serve_presence, config, cluster_role="presence")


async def _stop_on_signals(node_box: list, scope: trio.CancelScope) -> None:
    """First SIGINT/SIGTERM: graceful stop (drain, finish writes). Second one: stop at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        graceful = False
        async for sig in signals:
            logging.getLogger("chatd").info("received %s, stopping", signal.Signals(sig).name)
            if node_box and not graceful:
                graceful = True
                node_box[0].request_stop()
            else:
                scope.cancel()
                return


async def _reload_on_sighup(node_box: list) -> None:
    """SIGHUP: the node reads its TLS certificate and key files again (new connections get the
    new pair; chatd/tls.py). A role without TLS logs that there is nothing to reload."""
    log = logging.getLogger("chatd")
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            tls = getattr(node_box[0], "tls", None) if node_box else None
            if tls is None:
                log.info("received SIGHUP: no TLS certificate to reload")
            else:
                log.info("received SIGHUP: reloading the TLS certificate")
                tls.reload()


@main.command()
@click.option("--bytes", "n_bytes", type=click.IntRange(32, 1024), default=32, show_default=True,
              help="Random bytes in the secret (printed URL-safe base64: ~4/3 as many characters).")
def secret(n_bytes):
    """Print a fresh random secret for auth.secret, cluster.secret or push.webhook_secret."""
    import secrets as _secrets

    click.echo(_secrets.token_urlsafe(n_bytes))


from .bench.cli import bench  # noqa: E402  (the load tester is a command of its own module)

main.add_command(bench)


@main.group("store")
def store_group():
    """Store administration."""


@store_group.command("migrate")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option("--data-dir", help="Data directory (SQLite). [default: ./data]")
@click.option("--bucket-size", type=click.IntRange(min=2), default=None,
              help="Cassandra: messages per partition, for a keyspace created now. [default: 1000]")
def store_migrate(config_path, data_dir, bucket_size):
    """Create or upgrade the configured store's schema (SQLite file or Cassandra keyspace)."""
    config = _load(config_path, data_dir=data_dir)
    _setup_logging(config.log_level, quiet_driver=True)
    try:
        if config.store.backend == "sqlite":
            from .datadir import private_file
            from .store.sqlite import SCHEMA_VERSION, migrate as migrate_sqlite
            path = config.resolve(config.store.sqlite_path)
            private_file(path)
            conn = sqlite3.connect(str(path), isolation_level=None)
            try:
                found = migrate_sqlite(conn)
            finally:
                conn.close()
            click.echo(f"sqlite {path}: schema v{found} -> v{SCHEMA_VERSION}")
        else:
            from .store.cassandra_schema import DEFAULT_BUCKET_SIZE, migrate as migrate_cassandra
            found, now = trio.run(migrate_cassandra, config.cassandra, bucket_size or DEFAULT_BUCKET_SIZE)
            click.echo(f"cassandra keyspace {config.cassandra.keyspace}: schema v{found} -> v{now}")
    except (RuntimeError, ValueError, OSError, sqlite3.Error) as e:
        raise click.ClickException(f"chatd store migrate failed: {' '.join(str(e).split())}") from None



@store_group.command("copy")
@click.option("--from", "from_path", required=True, type=click.Path(dir_okay=False, exists=True),
              help="Config file of the source store (stop every chatd using it first).")
@click.option("--to", "to_path", required=True, type=click.Path(dir_okay=False, exists=True),
              help="Config file of the destination: a new SQLite file or Cassandra keyspace (migrated here).")
@click.option("--checkpoint", "checkpoint_path", type=click.Path(dir_okay=False),
              help="Progress file: an interrupted copy started again with it resumes. [default: ./chatd-store-copy.json]")
@click.option("--verify", is_flag=True, help="Afterwards compare both stores (counts, digests, each channel's history).")
@click.option("--verify-only", is_flag=True, help="Only compare the two stores; copy nothing.")
@click.option("--page-rows", type=click.IntRange(1, 10_000), default=500, show_default=True,
              help="Records read and written per page (and per checkpoint).")
@click.option("--max-rows-per-s", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Average records per second at most (0: as fast as the stores go), to spare a live cluster.")
def store_copy(from_path, to_path, checkpoint_path, verify, verify_only, page_rows, max_rows_per_s):
    """Copy every record (users, devices, sessions, channels, members, messages with their seqs,
    read cursors, push tokens and outbox) from one store to another: SQLite -> Cassandra, back,
    or keyspace -> keyspace. Example:

    \b
      chatd store copy --from run.toml --to cluster.toml --verify"""
    from .storecli import run_copy
    _setup_logging("warning", quiet_driver=True)
    run_copy(from_path, to_path, checkpoint_path, verify, verify_only, page_rows, max_rows_per_s)


@store_group.command("backup")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option("--data-dir", help="Data directory (SQLite). [default: ./data]")
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
def store_backup(file, config_path, data_dir, force):
    """Back up the SQLite store into FILE while chatd runs (a consistent copy as of one commit).
    For Cassandra see docs/operations.md (nodetool snapshot; chatd store copy). Example:

    \b
      chatd store backup --config chatd.toml /backups/chatd-$(date +%F).db"""
    from pathlib import Path

    from .store.backup import BackupError, backup
    config = _load(config_path, data_dir=data_dir)
    if config.store.backend != "sqlite":
        raise click.ClickException("chatd store backup backs up SQLite; for Cassandra use `nodetool snapshot`, "
                                   "or `chatd store copy` into an SQLite file or another keyspace "
                                   "(docs/operations.md)")
    db = config.resolve(config.store.sqlite_path)
    t0 = time.monotonic()
    try:
        s = backup(db, Path(file), force=force)
    except BackupError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"backed up {db} to {file}: schema v{s['schema']}, {s.get('users', 0):,} users, "
               f"{s.get('channels', 0):,} channels, {s.get('messages', 0):,} messages, {s['bytes']:,} bytes "
               f"in {time.monotonic() - t0:.1f} s")


@store_group.command("restore")
@click.argument("file", type=click.Path(dir_okay=False, exists=True))
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option("--data-dir", help="Data directory (SQLite). [default: ./data]")
@click.option("--force", is_flag=True, help="Replace an existing store (it is kept as PATH.before-restore-TIME).")
def store_restore(file, config_path, data_dir, force):
    """Make the configured SQLite store a copy of the backup FILE. Refused while any process has the
    store open (stop chatd first). Example:

    \b
      chatd store restore --config chatd.toml --force /backups/chatd-2026-12-01.db"""
    from pathlib import Path

    from .store.backup import BackupError, restore
    config = _load(config_path, data_dir=data_dir)
    if config.store.backend != "sqlite":
        raise click.ClickException("chatd store restore restores SQLite; for Cassandra see docs/operations.md")
    db = config.resolve(config.store.sqlite_path)
    try:
        s = restore(Path(file), db, force=force)
    except BackupError as e:
        raise click.ClickException(str(e)) from None
    kept = f"; the old store is kept as {s['kept']}" if s["kept"] else ""
    click.echo(f"restored {file} into {db}: schema v{s['schema']}, {s.get('users', 0):,} users, "
               f"{s.get('messages', 0):,} messages{kept}")

@main.group("admin")
def admin_group():
    """Operator commands: users, devices, channels, invites, stats (docs/operations.md)."""


@admin_group.command("invite")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option("--uses", type=click.IntRange(min=1), default=1, show_default=True, help="Sign-ups it admits.")
@click.option("--ttl-s", type=click.FloatRange(min=1), default=7 * 24 * 3600.0, show_default=True,
              help="Seconds it stays valid.")
def admin_invite(config_path, uses, ttl_s):
    """Print an invite for sign-up with auth.registration = "invite" (signed with the token secret:
    auth.secret, or the data directory's secret.key of `chatd run`). Its uses are counted in the store."""
    from .auth import issue_invite
    from .datadir import load_secret

    config = _load(config_path)
    if not config.auth.secret and not (config.data_path / "secret.key").exists():
        raise click.ClickException("no token secret: set auth.secret, or start `chatd run` once (it makes "
                                   f"{config.data_path / 'secret.key'})")
    invite, _, _ = issue_invite(load_secret(config.auth.secret, config.data_path), uses, ttl_s)
    click.echo(invite)


from .admincli import install as _install_admin  # noqa: E402  (the commands live in their own module)

_install_admin(admin_group)

if __name__ == "__main__":
    main()
