"""Pure units: config loading, tokens and passwords, ids, rendezvous hashing, token bucket, metrics."""

from __future__ import annotations

import pytest

from chatd import auth, ids
from chatd.config import Config, ConfigError
from chatd.discovery import hashing
from chatd.errors import ChatError
from chatd.metrics import Metrics
from chatd.ratelimit import TokenBucket


def test_config_file_env_and_unknown_keys(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('data_dir = "/var/lib/chatd"\n[server]\napi_port = 9000\n[limits]\nmax_group_members = 50\n')
    cfg = Config.load(p, env={"CHATD_SERVER__WS_PORT": "9001", "CHATD__LOG_LEVEL": "debug", "UNRELATED": "x"})
    assert (cfg.data_dir, cfg.server.api_port, cfg.server.ws_port, cfg.log_level) == ("/var/lib/chatd", 9000, 9001, "debug")
    assert cfg.limits.max_group_members == 50
    p.write_text("[server]\napi_prot = 9000\n")
    with pytest.raises(ConfigError, match="api_prot"):
        Config.load(p, env={})
    p.write_text("[nonsense]\nx = 1\n")
    with pytest.raises(ConfigError, match="nonsense"):
        Config.load(p, env={})
    with pytest.raises(ConfigError, match="api_port"):
        Config.load(None, env={"CHATD_SERVER__API_PORT": "eighty"})
    with pytest.raises(ConfigError, match="typo"):
        Config.load(None, env={"CHATD_SERVER__TYPO": "1"})
    p.write_text("[server]\napi_port = true\n")
    with pytest.raises(ConfigError):
        Config.load(p, env={})
    p.write_text("server = 5\n")
    with pytest.raises(ConfigError, match="table"):
        Config.load(p, env={})
    p.write_text("[store]\nbackend = \"mysql\"\n")
    with pytest.raises(ConfigError, match="mysql"):
        Config.load(p, env={})
    with pytest.raises(ConfigError, match="heartbeat_interval_s must be > 0"):  # told to every client
        Config.load(None, env={"CHATD_LIMITS__HEARTBEAT_INTERVAL_S": "0"})
    p.write_text("not toml [")
    with pytest.raises(ConfigError, match="invalid TOML"):
        Config.load(p, env={})
    with pytest.raises(ConfigError, match="not found"):
        Config.load(tmp_path / "missing.toml", env={})


def test_commit_delay_is_configured_and_bounded():
    assert Config.load(None, env={"CHATD_STORE__COMMIT_DELAY_S": "0.002"}).store.commit_delay_s == 0.002
    assert Config.load(None, env={"CHATD_STORE__COMMIT_DELAY_S": "0"}).store.commit_delay_s == 0
    for bad in ("-0.001", "0.5"):
        with pytest.raises(ConfigError, match="commit_delay_s"):
            Config.load(None, env={"CHATD_STORE__COMMIT_DELAY_S": bad})


def test_example_configs_load():
    from pathlib import Path
    for path in sorted(Path(__file__).parent.parent.glob("config/*.toml")):
        Config.load(path, env={})


def test_tokens():
    token, exp = auth.issue_token("s3cret", 42, "dev1", 60, now=1000)
    assert exp == 1060
    assert auth.verify_token("s3cret", token, now=1059) == (42, "dev1")
    with pytest.raises(ChatError) as e:
        auth.verify_token("s3cret", token, now=1060)
    assert e.value.code == "token_expired"
    for bad in (token + "x", token.replace("v1.", "v2."), "a.b", "", "v1..", token[:-1]):
        with pytest.raises(ChatError) as e:
            auth.verify_token("s3cret", bad, now=1000)
        assert e.value.code == "invalid_token"
    with pytest.raises(ChatError):
        auth.verify_token("other", token, now=1000)


def test_passwords():
    h = auth.hash_password("hunter2-hunter2", 2**10)
    assert h.startswith("scrypt$1024$") and "hunter2" not in h
    assert auth.verify_password("hunter2-hunter2", h)
    assert not auth.verify_password("hunter3-hunter3", h)
    assert not auth.verify_password("x", "garbage")
    assert h != auth.hash_password("hunter2-hunter2", 2**10)  # salted


def test_channel_ids():
    assert ids.dm_channel_id(7, 3) == ids.dm_channel_id(3, 7) == "dm:3:7"
    assert ids.dm_members("dm:3:7") == (3, 7)
    for bad in ("dm:7:3", "dm:3:3", "dm:03:7", "dm:3", "g:xyz", "g:0123456789abcdeF", "", "dm:1:99999999999999999999"):
        assert not ids.is_valid_channel_id(bad), bad
    g = ids.new_group_id()
    assert ids.is_valid_channel_id(g) and ids.is_group(g)
    with pytest.raises(ValueError):
        ids.dm_channel_id(1, 1)


def test_rendezvous_hashing_moves_only_the_dead_nodes_keys():
    nodes = ["s1", "s2", "s3", "s4"]
    keys = [f"c{i}" for i in range(2000)]
    before = {k: hashing.owner(k, nodes) for k in keys}
    counts = {n: sum(1 for v in before.values() if v == n) for n in nodes}
    assert all(350 < c < 650 for c in counts.values()), counts
    after = {k: hashing.owner(k, ["s1", "s2", "s4"]) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == "s3" for k in moved)
    assert hashing.rank("c1", nodes)[0] == before["c1"]
    with pytest.raises(LookupError):
        hashing.owner("k", [])


def test_token_bucket():
    b = TokenBucket(rate_per_s=2, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert b.retry_after_s() == pytest.approx(0.5)
    assert b.take(0.5) and not b.take(0.5)
    assert [b.take(100.0) for _ in range(4)] == [True, True, True, False]  # capped at burst


def test_metrics_exposition():
    m = Metrics()
    m.errors.inc(code="bad_frame")
    m.store_latency.observe(0.003)
    text = m.render()
    assert '# TYPE chatd_errors_total counter' in text
    assert 'chatd_errors_total{code="bad_frame"} 1' in text
    assert 'chatd_store_append_seconds_bucket{le="0.005"} 1' in text
    assert 'chatd_store_append_seconds_bucket{le="0.0025"} 0' in text
    assert "chatd_store_append_seconds_count 1" in text


def test_systemd_units_start_real_commands():
    """Each unit's ExecStart names a chatd command that exists and a config option it takes."""
    import configparser
    from pathlib import Path

    from click.testing import CliRunner

    from chatd.cli import main
    units = sorted((Path(__file__).parent.parent / "systemd").glob("*.service"))
    assert {u.name for u in units} >= {"chatd.service", "chatd-api.service", "chatd-shard@.service"}
    for unit in units:
        cp = configparser.ConfigParser(strict=False, interpolation=None)
        cp.read(unit)
        service = cp["Service"]
        assert service["KillSignal"] == "SIGTERM" and service["Restart"] == "on-failure"
        argv = service["ExecStart"].split()
        assert argv[0].endswith("/chatd")
        result = CliRunner().invoke(main, [argv[1], "--help"])
        assert result.exit_code == 0, (unit.name, result.output)
        for opt in [a for a in argv[2:] if a.startswith("--")]:
            assert opt in result.output, (unit.name, opt)


def test_view_routes_logins_home_or_least_loaded():
    from chatd.discovery.view import ShardInfo, View
    shards = {s: ShardInfo(s, f"ws://{s}/", "", load) for s, load in (("s1", 10), ("s2", 500), ("s3", 3))}
    view = View(7, shards)
    user = next(u for u in range(1, 1000) if view.home_of(u) == "s2")
    assert view.pick_for_login(user).shard_id == "s2"  # no threshold: always home
    assert view.pick_for_login(user, overload_connections=100).shard_id == "s3"  # home overloaded
    assert view.pick_for_login(user, overload_connections=1000).shard_id == "s2"
    calm = next(u for u in range(1, 1000) if view.home_of(u) == "s1")
    assert view.pick_for_login(calm, overload_connections=100).shard_id == "s1"
    assert ShardInfo.from_json(shards["s2"].to_json()) == shards["s2"]
    with pytest.raises(LookupError):
        View().pick_for_login(1)


def test_cluster_roles_refuse_to_start_without_secrets(tmp_path):
    from click.testing import CliRunner

    from chatd.cli import main
    for role in ("shard", "api", "presence"):
        result = CliRunner().invoke(main, [role], env={})
        assert result.exit_code == 1 and "cluster.secret must be set" in result.output, (role, result.output)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[cluster]\nsecret = "x"\n')
    result = CliRunner().invoke(main, ["shard", "--config", str(cfg)], env={})
    assert result.exit_code == 1 and "auth.secret must be set" in result.output
    result = CliRunner().invoke(main, ["run", "--config", str(tmp_path / "missing.toml")], env={})
    assert result.exit_code == 1 and "config file not found" in result.output


def test_login_guard_counts_failures_only_and_stays_bounded():
    from chatd.api.loginguard import LoginGuard
    g = LoginGuard(per_user_burst=2, per_user_per_min=60.0, per_ip_burst=100, per_ip_per_min=60.0, max_entries=50)
    assert g.retry_after("u", "1.2.3.4", 0.0) == 0.0
    g.failed("U", "1.2.3.4", 0.0)
    g.failed("u", "5.6.7.8", 0.0)  # usernames are case-insensitive; addresses do not matter to it
    assert g.retry_after("u", "9.9.9.9", 0.0) == pytest.approx(1.0)
    assert g.retry_after("u", "9.9.9.9", 0.5) == pytest.approx(0.5)
    assert g.retry_after("u", "9.9.9.9", 1.0) == 0.0
    g.failed("u", "1.2.3.4", 1.0)
    g.succeeded("u")  # the right password clears the account's failures
    assert g.retry_after("u", "1.2.3.4", 1.0) == 0.0
    for i in range(1000):  # a spray over many names and addresses cannot grow the tables without bound
        g.failed(f"name{i}", f"10.0.{i // 250}.{i % 250}", 2.0 + i / 1000)
    assert len(g) <= 2 * 50
    assert g.retry_after("name999", "x", 3.0) == 0.0  # one failure of a burst of two: still allowed
