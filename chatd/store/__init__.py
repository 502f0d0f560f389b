"""Stores, chosen by name in config (``store.backend``). Application code uses only
:class:`chatd.store.base.Store`; no SQL or driver call lives outside a backend module."""

from __future__ import annotations

import contextlib

from ..config import Config
from ..datadir import private_dir
from .base import AppendResult, Channel, ChannelSummary, Message, Store, User

__all__ = ["open_store", "Store", "User", "Channel", "ChannelSummary", "Message", "AppendResult"]


@contextlib.asynccontextmanager
async def open_store(config: Config):
    backend = config.store.backend
    if backend == "sqlite":
        from .sqlite import open_sqlite
        private_dir(config.data_path)
        async with open_sqlite(str(config.resolve(config.store.sqlite_path)), config.store.sqlite_synchronous,
                               config.store.commit_batch_max, config.store.read_connections,
                               config.store.commit_delay_s) as store:
            yield store
    elif backend == "cassandra":
        from .cassandra import open_cassandra
        async with open_cassandra(config.cassandra) as store:
            yield store
    else:  # Config.validate already refused it; keep the message for programmatic configs
        raise ValueError(f"unknown store backend {backend!r}")
