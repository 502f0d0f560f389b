"""``chatd store copy | backup | restore``: the operator's glue around ``chatd/store/copy.py`` and
``chatd/store/backup.py`` (click parses, this opens the stores, reports progress, prints one line).

Output: progress on stderr (a bar redrawn in place when stderr is a terminal, one line per finished
kind otherwise); the result in one line on stdout; any failure as one line on stderr with exit
status 1 (click's ``Error:``), never a traceback for an operator's mistake or a store failure.
"""

from __future__ import annotations

import sys
import time

import click
import trio

from .config import Config, ConfigError
from .errors import ChatError


def _config(path: str) -> Config:
    try:
        return Config.load(path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


def describe(config: Config) -> str:
    """A store's identity in a checkpoint and in messages."""
    if config.store.backend == "sqlite":
        return f"sqlite:{config.resolve(config.store.sqlite_path).resolve()}"
    c = config.cassandra
    return f"cassandra:{c.contact_points}:{c.port}/{c.keyspace}"


class Progress:
    """Rows per kind as they are copied: a bar redrawn in place on a terminal, a line per kind
    otherwise."""

    def __init__(self, stream=None, verb: str = "copying"):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.verb = verb
        self.kind = None
        self.last = (None, 0, None)
        self.started = time.monotonic()
        self.kind_started = self.started

    def __call__(self, kind: str, done: int, total: int | None) -> None:
        if kind != self.kind:
            self.finish_kind()
            self.kind, self.kind_started = kind, time.monotonic()
        self.last = (kind, done, total)
        if self.tty:
            rate = done / max(time.monotonic() - self.kind_started, 1e-6)
            if total:
                filled = min(30, int(30 * done / total))
                bar = f"[{'#' * filled}{'.' * (30 - filled)}] {done:,}/{total:,}"
            else:
                bar = f"{done:,}"
            self.stream.write(f"\r{self.verb} {kind:<15} {bar} ({rate:,.0f}/s)\033[K")
            self.stream.flush()

    def finish_kind(self) -> None:
        kind, done, _ = self.last
        if kind is None:
            return
        if self.tty:
            self.stream.write("\n")
        else:
            took = time.monotonic() - self.kind_started
            self.stream.write(f"{self.verb} {kind}: {done:,} in {took:.1f} s\n")
        self.stream.flush()
        self.last = (None, 0, None)


async def _open(config: Config, *, create: bool):
    """The store of ``config`` (a context manager). ``create`` False: an SQLite file must exist
    already (a copy's source is never created empty by mistake)."""
    from .store import open_store
    if config.store.backend == "sqlite":
        path = config.resolve(config.store.sqlite_path)
        if not create and not path.exists():
            raise click.ClickException(f"no SQLite store at {path} (check data_dir / store.sqlite_path)")
    elif create:
        from .store.cassandra_schema import migrate
        await migrate(config.cassandra)
    return open_store(config)


def run_copy(from_path: str, to_path: str, checkpoint_path: str | None, verify: bool, verify_only: bool,
             page_rows: int, max_rows_per_s: float) -> None:
    from pathlib import Path

    from .store.copy import Checkpoint, CopyError, copy_store, destination_is_empty, verify_stores
    src_cfg, dst_cfg = _config(from_path), _config(to_path)
    src, dst = describe(src_cfg), describe(dst_cfg)
    if src == dst:
        raise click.ClickException(f"--from and --to name the same store ({src})")
    ckpt_file = Path(checkpoint_path) if checkpoint_path else Path("chatd-store-copy.json")

    async def main() -> str:
        async with await _open(src_cfg, create=False) as source, await _open(dst_cfg, create=True) as dest:
            lines = []
            if not verify_only:
                checkpoint, resumed = Checkpoint.load_or_new(ckpt_file, src, dst)
                if checkpoint.complete:
                    lines.append(f"copy from {src} to {dst} already complete (checkpoint {ckpt_file}; delete it "
                                 "to copy again)")
                else:
                    if not resumed and not await destination_is_empty(dest):
                        raise CopyError(f"the destination {dst} is not empty: copy only into a new store "
                                        f"(or resume a copy with its checkpoint, --checkpoint)")
                    progress = Progress()
                    t0 = time.monotonic()
                    rows = await copy_store(source, dest, checkpoint, page_rows=page_rows,
                                            rows_per_s=max_rows_per_s, progress=progress)
                    progress.finish_kind()
                    took = time.monotonic() - t0
                    total = sum(rows.values())
                    lines.append(f"copied {total:,} records ({', '.join(f'{n:,} {k}' for k, n in rows.items())}) "
                                 f"from {src} to {dst}{' (resumed)' if resumed else ''} in {took:.1f} s")
            if not verify_only:
                lines += await _copy_media_objects(src_cfg, dst_cfg, source, page_rows)
            if verify or verify_only:
                progress = Progress(verb="verifying")
                report = await verify_stores(source, dest, page_rows=page_rows, progress=progress)
                progress.finish_kind()
                report.problems += await _verify_media_objects(src_cfg, dst_cfg, source, page_rows)
                if not report.ok:
                    for p in report.problems:
                        click.echo(f"verify: {p}", err=True)
                    n = len(report.problems)
                    raise CopyError(f"verify failed: {n} difference{'' if n == 1 else 's'} between {src} and {dst}")
                lines.append(f"verify: ok: {report.channels:,} channels, {report.messages:,} messages and every "
                             "other record match")
            return "\n".join(lines)

    click.echo(run_trio(main))


async def _copy_media_objects(src_cfg: Config, dst_cfg: Config, source, page_rows: int) -> list[str]:
    """The media objects, when the two configs keep them in different places (chatd/media/copy.py);
    the result line, or nothing. ``CopyError`` (after the copy of the others) if any could not be."""
    from .media.copy import copy_objects
    from .store.copy import CopyError
    places = _media_places(src_cfg, dst_cfg)
    if places is None:
        return []
    (a, src), (b, dst) = places
    try:
        progress = Progress()
        t0 = time.monotonic()
        result = await copy_objects(source, src, dst, dst_cfg.data_path / "media" / "tmp", page_rows=page_rows,
                                    progress=progress)
        progress.finish_kind()
    finally:
        await src.aclose()
        await dst.aclose()
    for p in result.problems:
        click.echo(f"media: {p}", err=True)
    if result.problems:
        n = len(result.problems)
        raise CopyError(f"{n} media object{'' if n == 1 else 's'} not copied from {a} to {b} (above); the records "
                        "and the other objects are")
    return [f"copied {result.copied:,} media objects ({result.bytes:,} bytes; {result.present:,} were there "
            f"already) from {a} to {b} in {time.monotonic() - t0:.1f} s"]


def _media_places(src_cfg: Config, dst_cfg: Config):
    """((place, backend) of the source, of the destination), or None when both keep media objects
    in the same place."""
    from .media.backend import open_backend
    from .media.copy import describe_media
    a, b = describe_media(src_cfg), describe_media(dst_cfg)
    if a == b:
        return None
    return (a, open_backend(src_cfg, src_cfg.data_path)), (b, open_backend(dst_cfg, dst_cfg.data_path))


async def _verify_media_objects(src_cfg: Config, dst_cfg: Config, source, page_rows: int) -> list[str]:
    """A problem line per media object the destination's backend lacks (when it is another place)."""
    from .media.copy import missing_objects
    places = _media_places(src_cfg, dst_cfg)
    if places is None:
        return []
    (_, src), (b, dst) = places
    try:
        missing = await missing_objects(source, dst, page_rows=page_rows)
    finally:
        await src.aclose()
        await dst.aclose()
    return [f"media object {key}: missing in {b}" for key in missing]


def run_trio(main):
    """``trio.run(main)``; an operator's error or a store failure (also inside nurseries' exception
    groups) becomes one line and exit status 1."""
    try:
        return trio.run(main)
    except (ChatError, RuntimeError, ValueError, OSError, BaseExceptionGroup) as e:
        leaf = _single_leaf(e)
        if not isinstance(leaf, (ChatError, RuntimeError, ValueError, OSError)):
            raise
        text = leaf.message if isinstance(leaf, ChatError) else str(leaf)
        raise click.ClickException(" ".join(text.split())) from None


def _single_leaf(e: BaseException) -> BaseException:
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e
