"""Logging of every role: to stderr, as text lines or (``log_format = "json"``, ``--log-format
json``) one JSON object per line, with levels per logger from ``log_levels``.

A JSON line: ``ts`` (unix seconds), ``time`` (ISO 8601 UTC), ``level``, ``logger``, ``message``,
``role`` (run | shard | api | presence), ``node`` (the shard id, presence id, or ``api``), and for a
security event of ``chatd.security`` (:mod:`chatd.api.securitylog`) its fields under ``security``
(``event``, ``outcome``, ``user``, ``device``, ``addr``...); ``exc`` with the traceback, if any.

``log_levels``: entries ``"logger=level"``, e.g. ``["chatd.shard=debug", "cassandra=warning"]``; a
logger's level applies to the loggers below it (``chatd.shard`` covers ``chatd.shard.session``).
Errors: a malformed entry or an unknown level is a ``ValueError`` naming it (the config check).
"""

from __future__ import annotations

import json
import logging
import sys
import time

LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("text", "json")


def parse_levels(entries: list[str]) -> dict[str, int]:
    out = {}
    for entry in entries:
        name, sep, level = entry.partition("=")
        if not sep or not name.strip() or level.strip().lower() not in LEVELS:
            raise ValueError(f"log_levels: {entry!r} is not 'logger=level' with a level of {', '.join(LEVELS)}")
        out[name.strip()] = getattr(logging, level.strip().upper())
    return out


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str, node: str):
        super().__init__()
        self.role, self.node = role, node

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 6),
               "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
               "role": self.role, "node": self.node}
        security = getattr(record, "security", None)
        if security is not None:
            out["security"] = security
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup_logging(level: str, *, fmt: str = "text", levels: list[str] = (), role: str = "", node: str = "",
                  quiet_driver: bool = False) -> None:
    """Configure the root logger once (a handler on stderr). Unless ``level`` is debug, the Cassandra
    driver's records lose their tracebacks (it attaches one to every failed connection attempt; its
    message says what failed), and with ``quiet_driver`` (store commands) they are dropped: the
    command reports every failure itself, in one line."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(role, node))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    if level.lower() != "debug":
        handler.addFilter(_driver_without_traceback)
        if quiet_driver:
            logging.getLogger("cassandra").setLevel(logging.CRITICAL)
    for name, lvl in parse_levels(list(levels)).items():
        logging.getLogger(name).setLevel(lvl)


def _driver_without_traceback(record: logging.LogRecord) -> bool:
    if record.name.startswith("cassandra.") and record.exc_info:
        record.exc_info, record.exc_text = None, None
    return True
