"""Secrets and file modes (issue 20, H2): a published placeholder or a short secret is refused at
start-up, the example configs ship none, ``chatd secret`` makes one, and the data directory and
its files are private to the chatd user from their creation."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from chatd.cli import main
from chatd.config import Config, ConfigError

REPO = Path(__file__).resolve().parent.parent
GOOD = "k" * 32


def cluster_config(**sections) -> Config:
    cfg = Config.from_mapping({"auth": {"secret": GOOD}, "cluster": {"secret": GOOD}})
    cfg.update(sections, source="test")
    return cfg


@pytest.mark.parametrize("value", ["change-me-token-secret", "change-me-link-secret", "x", "k" * 31,
                                   "CHANGE-ME-please-" + "x" * 40])
@pytest.mark.parametrize("key", ["auth", "cluster"])
def test_placeholder_and_short_secrets_are_refused(key, value):
    cfg = cluster_config(**{key: {"secret": value}})
    with pytest.raises(ConfigError, match=rf"{key}\.secret .*chatd secret"):
        cfg.validate()
        cfg.validate_cluster("shard")


def test_a_strong_secret_passes_and_chatd_run_may_leave_it_empty():
    cluster_config().validate()
    cluster_config().validate_cluster("api")
    Config.from_mapping({}).validate()  # chatd run: empty auth.secret = generated into the data dir


def test_push_webhook_secret_is_checked_too():
    base = {"provider": "webhook", "webhook_url": "http://127.0.0.1:1/"}
    with pytest.raises(ConfigError, match=r"push\.webhook_secret is shorter than 32 bytes"):
        Config.from_mapping({"push": {**base, "webhook_secret": "s"}}).validate()
    Config.from_mapping({"push": {**base, "webhook_secret": GOOD}}).validate()


@pytest.mark.parametrize("name", ["api.toml", "shard.toml", "presence.toml"])
def test_example_cluster_configs_ship_no_secret(name):
    result = CliRunner().invoke(main, [name.split(".")[0], "--config", str(REPO / "config" / name)], env={})
    assert result.exit_code == 1 and "cluster.secret must be set" in result.output, result.output
    text = (REPO / "config" / name).read_text()
    assert "change-me" not in text


def test_chatd_secret_prints_a_fresh_strong_secret():
    runs = [CliRunner().invoke(main, ["secret"]) for _ in range(2)]
    values = [r.output.strip() for r in runs]
    assert all(r.exit_code == 0 for r in runs) and values[0] != values[1]
    for v in values:
        assert len(v) >= 43  # 32 random bytes, URL-safe base64
        cluster_config(auth={"secret": v}, cluster={"secret": v}).validate_cluster("shard")


def test_units_set_a_private_umask():
    for unit in sorted((REPO / "systemd").glob("*.service")):
        assert "\nUMask=0077\n" in unit.read_text(), unit.name


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


async def test_data_dir_and_files_are_private_from_creation(tmp_path):
    """``chatd run`` on a fresh data dir under the usual umask (022): the dir and every dir in it
    (media) 0700, secret.key and the database files 0600."""
    import os

    import trio

    from chatd.node import serve_run
    from tests.conftest import make_config

    old = os.umask(0o022)
    try:
        config = make_config(tmp_path)
        async with trio.open_nursery() as nursery:
            box: list = []
            await nursery.start(lambda task_status: serve_run(config, task_status=task_status, node_out=box))
            box[0].request_stop()
    finally:
        os.umask(old)
    data = tmp_path / "data"
    assert _mode(data) == 0o700
    dirs = [d for d in data.rglob("*") if d.is_dir()]  # media/, media/objects, media/tmp, ...
    assert data / "media" in dirs and {str(d): _mode(d) for d in dirs} == {str(d): 0o700 for d in dirs}
    files = [data / "secret.key", data / "chatd.db"] + sorted(data.glob("chatd.db-*"))
    assert all(f.exists() for f in files[:2]), files
    assert {f.name: _mode(f) for f in files} == {f.name: 0o600 for f in files}
    assert not list(data.glob("*.tmp"))
