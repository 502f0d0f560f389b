"""The rate of ``chatd store copy`` (docs/operations.md, "Growing from chatd run to a cluster").

Builds an SQLite store of ``--channels`` x ``--per-channel`` messages (100-character bodies) with
``Store.import_rows`` in a scratch directory, then times the real CLI: SQLite -> SQLite, and, with
``--cassandra host:port[:dc]`` (e.g. a ``bin/chatd-cassandra start``), SQLite -> a fresh keyspace
and ``--verify-only`` of that pair. Prints one line per copy: records, seconds, messages/s.

    python benchmarks/store_copy.py --cassandra 127.0.0.1:9042
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from chatd.store.sqlite import open_sqlite  # noqa: E402


async def populate(db: Path, channels: int, per: int) -> None:
    async with open_sqlite(str(db), synchronous="normal") as s:
        await s.import_rows("users", [(i, f"u{i}", "h", "", "", 1.0, 0) for i in range(1, 11)])
        await s.import_rows("channels", [(f"g:{c:016x}", "group", "g", 1, 1.0, per, float(per)) for c in range(channels)])
        await s.import_rows("members", [(f"g:{c:016x}", u, 1.0, 0) for c in range(channels) for u in range(1, 11)])
        for c in range(channels):
            await s.import_rows("messages", [(f"g:{c:016x}", q, 1 + q % 10, f"m{q}", "x" * 100, float(q))
                                             for q in range(1, per + 1)])


def copy(work: Path, src: str, dst: str, *extra: str) -> float:
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "chatd.cli", "store", "copy", "--from", src, "--to", dst,
                        "--checkpoint", dst + ".checkpoint", *extra], capture_output=True, text=True, cwd=work)
    if p.returncode:
        sys.exit(p.stderr)
    print(p.stdout.strip().splitlines()[-1])
    return time.monotonic() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--channels", type=int, default=20)
    ap.add_argument("--per-channel", type=int, default=1000)
    ap.add_argument("--cassandra", help="host:port[:dc] of a Cassandra to copy into (a fresh keyspace)")
    args = ap.parse_args()
    n = args.channels * args.per_channel
    with tempfile.TemporaryDirectory(prefix="chatd-copy-bench-") as tmp:
        work = Path(tmp)
        (work / "src").mkdir()
        trio.run(populate, work / "src" / "chatd.db", args.channels, args.per_channel)
        (work / "src.toml").write_text(f'data_dir = "{work / "src"}"\n')
        (work / "dst.toml").write_text(f'data_dir = "{work / "dst"}"\n')
        took = copy(work, "src.toml", "dst.toml")
        print(f"sqlite -> sqlite: {n:,} messages in {took:.1f} s (process included): {n / took:,.0f} messages/s")
        if args.cassandra:
            host, port, *dc = args.cassandra.split(":")
            ks = f"chatd_copy_bench_{os.getpid()}"
            (work / "cass.toml").write_text(
                f'data_dir = "{work / "unused"}"\n[store]\nbackend = "cassandra"\n[cassandra]\n'
                f'contact_points = "{host}"\nport = {port}\nlocal_dc = "{dc[0] if dc else ""}"\nkeyspace = "{ks}"\n'
                "replication = \"{'class': 'SimpleStrategy', 'replication_factor': 1}\"\n")
            took = copy(work, "src.toml", "cass.toml")
            print(f"sqlite -> cassandra: {n:,} messages in {took:.1f} s: {n / took:,.0f} messages/s "
                  f"(keyspace {ks} left for inspection)")
            took = copy(work, "src.toml", "cass.toml", "--verify-only")
            print(f"verify sqlite <-> cassandra: {took:.1f} s")


if __name__ == "__main__":
    main()
