"""The ``chatd`` command. click only parses arguments and calls the role's ``serve_*``."""

from __future__ import annotations

import logging
import signal
import sys

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


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


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
def run(config_path, data_dir, api_port, ws_port, host):
    """Everything in one process: API + one chat shard, SQLite store, no ZooKeeper."""
    from .node import serve_run

    config = _load(config_path, data_dir=data_dir, **{"server.api_port": api_port, "server.ws_port": ws_port,
                                                     "server.api_host": host, "server.ws_host": host})
    _setup_logging(config.log_level)

    async def main_task():
        node_box: list = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signals, node_box, nursery.cancel_scope)
            await serve_run(config, node_out=node_box)  # returns once stopped
            nursery.cancel_scope.cancel()

    try:
        trio.run(main_task)
    except RuntimeError as e:  # e.g. a database written by a newer chatd
        raise click.ClickException(str(e)) from None


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


from .bench.cli import bench  # noqa: E402  (the load tester is a command of its own module)

main.add_command(bench)


if __name__ == "__main__":
    main()
