"""Operators' logs: ``chatd run --log-format json`` writes one JSON object per line with the role,
the node id and the security events' fields; ``log_levels`` sets levels per logger."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import ChatdRun


def with_top_keys(run: ChatdRun, text: str) -> None:
    """Put top-level keys in the run's config file (before its first table)."""
    first, rest = run.config.read_text().split("\n", 1)
    run.config.write_text(first + "\n" + text + rest)


async def test_json_logs_carry_role_node_and_security_events(tmp_path):
    run = ChatdRun(tmp_path)
    with_top_keys(run, 'log_format = "json"\nlog_levels = ["chatd.shard=warning"]\n')
    await run.start()
    try:
        alice = await run.api.signup_login("alice")
        r = await run.api.call("POST", "/v1/login", {"username": "alice", "password": "wrong-password"})
        assert r.status == 401
    finally:
        run.proc.terminate()
        assert await run.wait_exit() == 0
    lines = (tmp_path / "chatd.log").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(r["role"] == "run" and r["node"] == "shard-1" and r["level"] and r["logger"] for r in records)
    security = [r["security"] for r in records if r["logger"] == "chatd.security"]
    assert {"event": "login", "outcome": "ok", "user": alice["user"]["id"], "device": alice["device_id"],
            "addr": "127.0.0.1"} in security
    assert any(s["event"] == "login" and s["outcome"] == "failed" and s["username"] == "alice" for s in security)
    assert any(r["message"].startswith("chatd run ready") for r in records)
    assert not [r for r in records if r["logger"].startswith("chatd.shard") and r["level"] == "info"]


async def test_bad_log_levels_are_refused_in_one_line(tmp_path):
    run = ChatdRun(tmp_path)
    with_top_keys(run, 'log_levels = ["chatd.shard:debug"]\n')
    proc = subprocess.run([sys.executable, "-m", "chatd.cli", "run", "--config", str(run.config)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "log_levels: 'chatd.shard:debug' is not 'logger=level'" in proc.stderr and "Traceback" not in proc.stderr
