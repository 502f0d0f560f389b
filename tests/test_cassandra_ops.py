"""Operating chatd on a real Apache Cassandra (the session's server, tests/cassandra_server.py):
``chatd store migrate`` re-runs a half-applied step, refuses a replication the live nodes cannot
meet before it creates anything, and every operator mistake ends a real ``python -m chatd.cli``
process with one line that says what to do, never a traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import trio

from chatd.store import cassandra_schema
from chatd.store.cassandra import open_cassandra
from chatd.store.cassandra_schema import MIGRATIONS, SCHEMA_VERSION, drop_keyspace, migrate
from chatd.store.cql import connect, execute_ddl, shutdown
from tests.helpers import TEST_LINK_SECRET, TEST_TOKEN_SECRET, reserved_keywords

BUCKET = 4


# ---- helpers ---------------------------------------------------------------------------------------
@pytest.fixture
def keyspace(cassandra_server):
    """A fresh keyspace name on the real server, dropped after the test (whatever it created)."""
    cfg = cassandra_server.config()
    yield cfg
    trio.run(drop_keyspace, cfg)


async def _cql(cfg, *statements: str) -> list[list[dict]]:
    """Run raw CQL (setting up a half-applied keyspace, reading system_schema), rows per statement."""
    cluster, session = await connect(cfg, None)
    try:
        return [list(await trio.to_thread.run_sync(session.execute, s)) for s in statements]
    finally:
        await shutdown(cluster)


def cql(cfg, *statements: str) -> list[list[dict]]:
    return trio.run(_cql, cfg, *statements)


def schema_of(cfg) -> dict[str, set[str]]:
    """table -> its columns, as the server has them."""
    rows = cql(cfg, f"SELECT table_name, column_name FROM system_schema.columns WHERE keyspace_name = '{cfg.keyspace}'")[0]
    out: dict[str, set[str]] = {}
    for r in rows:
        out.setdefault(r["table_name"], set()).add(r["column_name"])
    return out


def version_row(cfg) -> dict:
    return cql(cfg, f"SELECT version, bucket_size, migrated_at FROM {cfg.keyspace}.schema_version "
                    "WHERE component = 'chatd'")[0][0]


def keyspace_exists(cfg) -> bool:
    return bool(cql(cfg, "SELECT keyspace_name FROM system_schema.keyspaces WHERE keyspace_name = "
                         f"'{cfg.keyspace}'")[0])


def expected_tables() -> set[str]:
    return {re.search(r"\{ks\}\.(\w+)", d).group(1) for _v, ddls in MIGRATIONS for d in ddls
            if d.lstrip().upper().startswith("CREATE TABLE")}


def migrate_to(cfg, version: int, monkeypatch) -> None:
    """``migrate`` as the chatd that knew only schema v1..``version`` ran it."""
    with monkeypatch.context() as m:
        m.setattr(cassandra_schema, "MIGRATIONS", [s for s in MIGRATIONS if s[0] <= version])
        m.setattr(cassandra_schema, "SCHEMA_VERSION", version)
        assert trio.run(migrate, cfg, BUCKET)[1] == version


def chatd(*args: str, config: Path, timeout: float = 90) -> subprocess.CompletedProcess:
    """A real ``chatd`` process; its result (text)."""
    return subprocess.run([sys.executable, "-m", "chatd.cli", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=timeout)


def write_config(tmp_path: Path, server, cfg, **cassandra) -> Path:
    text = f'data_dir = "{tmp_path / "data"}"\n' + server.toml(cfg.keyspace)
    for key, value in cassandra.items():
        line = f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value}"
        text = re.sub(rf"^{key} = .*$", lambda _m: line, text, flags=re.M) if re.search(rf"^{key} = ", text, re.M) \
            else text.replace("[cassandra]\n", f"[cassandra]\n{line}\n")
    text += (f'[auth]\nsecret = "{TEST_TOKEN_SECRET}"\nscrypt_n = 1024\n'
             f'[cluster]\nsecret = "{TEST_LINK_SECRET}"\nzk_hosts = "127.0.0.1:1"\n')
    path = tmp_path / "chatd.toml"
    path.write_text(text)
    return path


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The process failed with exactly one line on stderr, an ``Error:`` line, and no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    return lines[0]


# ---- idempotent migrations ---------------------------------------------------------------------
@pytest.mark.parametrize("step, applied", sorted({(2, "half"), (SCHEMA_VERSION, "all")}))
def test_migrate_completes_a_half_applied_step(keyspace, monkeypatch, step, applied):
    """A migrate that died inside step ``step`` (its first statements, or all of them, ran; the
    version still says step - 1) is finished by the next one; a third run changes nothing."""
    cfg = keyspace
    migrate_to(cfg, step - 1, monkeypatch)
    ddls = dict(MIGRATIONS)[step]
    done = ddls[:(len(ddls) + 1) // 2] if applied == "half" else ddls
    cql(cfg, *(d.format(ks=cfg.keyspace) for d in done))
    assert version_row(cfg)["version"] == step - 1

    assert trio.run(migrate, cfg, BUCKET) == (step - 1, SCHEMA_VERSION)
    tables = schema_of(cfg)
    assert expected_tables() <= set(tables) and "push_token" in tables["push_tokens"]
    row = version_row(cfg)
    assert (row["version"], row["bucket_size"]) == (SCHEMA_VERSION, BUCKET)

    assert trio.run(migrate, cfg, 1000) == (SCHEMA_VERSION, SCHEMA_VERSION)  # a no-op:
    assert version_row(cfg) == row and schema_of(cfg) == tables  # nothing written, bucket size kept

    async def use_it():
        async with open_cassandra(cfg) as store:
            user = await store.create_user("ops-alice", "h", "Alice", 1.0)
            assert (await store.get_user(user.id)).username == "ops-alice"
    trio.run(use_it)


def test_alter_add_steps_rerun(keyspace, monkeypatch):
    """A future step of ``ALTER TABLE ... ADD`` (schema v3's kind) whose first ALTER applied before a
    crash: the re-run takes the existing column as done (``execute_ddl(..., ok_if_exists=True)``).
    Errors that are not "already there" still fail, in one line."""
    cfg = keyspace
    trio.run(migrate, cfg, BUCKET)
    step = (SCHEMA_VERSION + 1, ["ALTER TABLE {ks}.presence ADD ops_probe_a text",
                                 "ALTER TABLE {ks}.presence ADD (ops_probe_b bigint, ops_probe_c text)"])
    cql(cfg, step[1][0].format(ks=cfg.keyspace))
    monkeypatch.setattr(cassandra_schema, "MIGRATIONS", [*MIGRATIONS, step])
    monkeypatch.setattr(cassandra_schema, "SCHEMA_VERSION", step[0])
    assert trio.run(migrate, cfg, BUCKET) == (SCHEMA_VERSION, step[0])
    assert {"ops_probe_a", "ops_probe_b", "ops_probe_c"} <= schema_of(cfg)["presence"]
    assert trio.run(migrate, cfg, BUCKET) == (step[0], step[0])

    async def ddl(statement, **kw):
        cluster, session = await connect(cfg, None)
        try:
            return await execute_ddl(session, statement.format(ks=cfg.keyspace), **kw)
        finally:
            await shutdown(cluster)
    assert trio.run(lambda: ddl(step[1][1], ok_if_exists=True)) is False  # done already
    assert trio.run(lambda: ddl("CREATE TABLE {ks}.presence (user_id bigint PRIMARY KEY)", ok_if_exists=True)) \
        is False
    with pytest.raises(RuntimeError, match=r"^cassandra: ALTER TABLE \w+\.presence ADD failed: "
                                           r"Column with name 'ops_probe_b' already exists$"):
        trio.run(lambda: ddl(step[1][1]))
    with pytest.raises(RuntimeError, match=r"^cassandra: ALTER TABLE \w+\.no_such_table ADD x int failed: "
                                           r"Table '\w+\.no_such_table' doesn't exist$"):
        trio.run(lambda: ddl("ALTER TABLE {ks}.no_such_table ADD x int", ok_if_exists=True))


# ---- operator errors: real processes, one line ----------------------------------------------------
def test_migrate_refuses_replication_above_live_nodes(cassandra_server, keyspace, tmp_path):
    """The default replication (3 per DC) on a one-node cluster: refused before the keyspace exists."""
    server, cfg = cassandra_server, keyspace
    dc = server.dc or "datacenter1"
    config = write_config(tmp_path, server, cfg,
                          replication="{'class': 'NetworkTopologyStrategy', 'replication_factor': 3}")
    line = one_error_line(chatd("store", "migrate", config=config))
    assert line.startswith("Error: chatd store migrate failed: cassandra.replication asks for 3 replicas in "
                           f"data center '{dc}', which has 1 live node"), line
    assert line.endswith(f"lower the replication factor in cassandra.replication to at most 1 or start more "
                         f"nodes; keyspace '{cfg.keyspace}' was not created"), line
    assert not keyspace_exists(cfg)

    config = write_config(tmp_path, server, cfg, replication="{'class': 'NetworkTopologyStrategy', 'dc-x': 1}")
    line = one_error_line(chatd("store", "migrate", config=config))
    assert "cassandra.replication names data center 'dc-x', which this cluster does not have" in line
    assert f"'{dc}': 1 live" in line and not keyspace_exists(cfg)

    config = write_config(tmp_path, server, cfg, replication="{'class': 'SimpleStrategy', 'replication_factor': 2}")
    line = one_error_line(chatd("store", "migrate", config=config))
    assert "asks for 2 replicas in the cluster, which has 1 live node" in line and not keyspace_exists(cfg)


def test_unknown_local_dc_lists_the_dcs(cassandra_server, keyspace, tmp_path):
    server, cfg = cassandra_server, keyspace
    dc = server.dc or "datacenter1"
    config = write_config(tmp_path, server, cfg, local_dc="dc-nowhere")
    expected = (f"cassandra.local_dc = 'dc-nowhere' is not a data center of this cluster; the driver sees: "
                f"'{dc}' (set cassandra.local_dc to one of them)")
    assert one_error_line(chatd("store", "migrate", config=config)) == \
        f"Error: chatd store migrate failed: {expected}"
    assert not keyspace_exists(cfg)
    assert one_error_line(chatd("run", config=config)) == f"Error: {expected}"


def test_startup_on_an_older_schema_says_migrate(cassandra_server, keyspace, tmp_path, monkeypatch):
    """``chatd run``/``shard``/``api`` on a keyspace at schema v1 (or none, or a newer one): one line
    each, not trio's ExceptionGroup traceback; ``chatd store migrate`` then brings it up to date."""
    server, cfg = cassandra_server, keyspace
    config = write_config(tmp_path, server, cfg)
    missing = one_error_line(chatd("run", config=config))
    assert missing == f"Error: Cassandra keyspace '{cfg.keyspace}' does not exist; run `chatd store migrate`"

    migrate_to(cfg, 1, monkeypatch)
    older = (f"Error: Cassandra keyspace '{cfg.keyspace}' has schema v1, this chatd needs v{SCHEMA_VERSION}; "
             "run `chatd store migrate`")
    assert one_error_line(chatd("run", config=config)) == older
    assert one_error_line(chatd("shard", "--shard-id", "s1", config=config)) == older
    assert one_error_line(chatd("api", config=config)) == older

    proc = chatd("store", "migrate", config=config)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"cassandra keyspace {cfg.keyspace}: schema v1 -> v{SCHEMA_VERSION}"

    cql(cfg, f"UPDATE {cfg.keyspace}.schema_version SET version = 99 WHERE component = 'chatd'")
    newer = f"Cassandra keyspace '{cfg.keyspace}' has schema v99, newer than this chatd supports"
    assert one_error_line(chatd("store", "migrate", config=config)).startswith(
        f"Error: chatd store migrate failed: {newer}")
    assert one_error_line(chatd("run", config=config)).startswith(f"Error: {newer}")


def test_existing_keyspace_without_quorum_says_why(cassandra_server, keyspace, tmp_path):
    """A keyspace made elsewhere with 3 replicas on this one node: no LOCAL_QUORUM. Not refused up
    front (a node may be down for maintenance), but the failure says how many replicas were alive."""
    cfg = keyspace
    cql(cfg, f"CREATE KEYSPACE {cfg.keyspace} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 3}}",
        MIGRATIONS[0][1][0].format(ks=cfg.keyspace))
    config = write_config(tmp_path, cassandra_server, cfg)
    expected = (f"cassandra: reading {cfg.keyspace}.schema_version at LOCAL_QUORUM failed: Unable to complete the "
                "operation against any hosts: Cannot achieve consistency level LOCAL_QUORUM (2 replicas required, "
                "1 alive); check that the keyspace's replicas are up (`nodetool status`) and that its replication "
                "factor does not exceed its nodes")
    assert one_error_line(chatd("run", config=config)) == f"Error: {expected}"
    assert one_error_line(chatd("store", "migrate", config=config)) == f"Error: chatd store migrate failed: {expected}"


def test_migrate_without_a_reachable_cassandra(cassandra_server, keyspace, tmp_path):
    import socket
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        config = write_config(tmp_path, cassandra_server, keyspace, port=port)
        line = one_error_line(chatd("store", "migrate", config=config))
    assert line.startswith(f"Error: chatd store migrate failed: cannot connect to Cassandra at "
                           f"{cassandra_server.host} (port {port}): Unable to connect to any servers"), line
    assert line.endswith("check cassandra.contact_points and cassandra.port, and that Cassandra is running")


# ---- the keyword list is the server's ---------------------------------------------------------------
def test_reserved_keyword_list_matches_the_server_under_test(cassandra_server):
    """tests/cql_reserved_keywords.txt is what the Cassandra these tests run reserves."""
    if cassandra_server.version == "external":
        pytest.skip("CHATD_TEST_CASSANDRA names an external server: its jar is not here to compare with")
    home = Path(os.environ.get("CHATD_CASSANDRA_HOME") or
                Path.home() / ".cache" / "chatd" / f"cassandra-{cassandra_server.version}")
    jar = home / "lib" / f"cassandra-all-{cassandra_server.version}.jar"
    with zipfile.ZipFile(jar) as z:
        text = z.read("org/apache/cassandra/cql3/reserved_keywords.txt").decode()
    assert reserved_keywords() == {w.strip().lower() for w in text.splitlines() if w.strip()}

