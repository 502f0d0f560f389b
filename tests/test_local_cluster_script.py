"""bin/chatd-local-cluster: starts ZooKeeper + 3 shards + API, they route 1:1 and group messages
across shards, and it stops everything cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.cluster import zookeeper_available
from tests.helpers import API, dm, eventually, free_port, open_client

SCRIPT = Path(__file__).parent.parent / "bin" / "chatd-local-cluster"
pytestmark = pytest.mark.skipif(not zookeeper_available(),
                                reason="ZooKeeper not installed (apt-get install zookeeper); .ci/run installs it")


async def test_local_cluster_script(tmp_path, nursery):
    env = dict(os.environ, CLUSTER_DIR=str(tmp_path / "lc"), ZK_PORT=str(free_port()), API_PORT=str(free_port()),
               WS_BASE_PORT=str(free_port()), CHATD=str(Path(sys.executable).parent / "chatd"))
    run = lambda cmd: subprocess.run([str(SCRIPT), cmd], env=env, capture_output=True, text=True, timeout=120)  # noqa: E731
    started = await trio.to_thread.run_sync(run, "start")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert "ready:" in started.stdout
        api = API(f"http://127.0.0.1:{env['API_PORT']}")
        people = []
        while len({p["shard_id"] for p in people}) < 3:
            people.append(await api.signup_login(f"script{len(people)}"))
        by_shard = {p["shard_id"]: p for p in people}
        a, b, c = by_shard["s1"], by_shard["s2"], by_shard["s3"]
        r = await api.call("POST", "/v1/groups", {"name": "trio", "members": [b["user"]["id"], c["user"]["id"]]},
                           token=a["token"])
        group = r.body["channel"]["id"]
        ca, cb, cc = [await open_client(nursery, p["ws_url"], p["token"]) for p in (a, b, c)]
        assert (await ca.send_message(dm(a, b), "s1 to s2"))["seq"] == 1
        assert (await cb.next_event("message"))["body"] == "s1 to s2"
        assert (await cc.send_message(group, "s3 to all"))["seq"] == 1
        for client in (ca, cb, cc):
            msgs = [m for m in await client.messages(2 if client is ca else 1) if m["channel_id"] == group]
            assert [m["body"] for m in msgs] == ["s3 to all"]
        # the presence server of the local cluster knows who is connected
        ids = [p["user"]["id"] for p in (a, b, c)]

        async def all_online() -> bool:
            r = await api.call("GET", "/v1/presence?user_ids=" + ",".join(map(str, ids)), token=a["token"])
            return r.status == 200 and all(v["status"] == "online" for v in r.body["users"].values())
        await eventually(all_online)
    finally:
        stopped = await trio.to_thread.run_sync(run, "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    status = await trio.to_thread.run_sync(run, "status")
    assert "running" not in status.stdout


def test_bench_dm_across_the_local_cluster(tmp_path):
    """`chatd bench dm --cross-shard --cluster-dir` against the script's cluster: the pairs straddle
    shards, the report sums the CPU of every chatd process (by role too), nothing is lost."""
    env = dict(os.environ, CLUSTER_DIR=str(tmp_path / "lc"), ZK_PORT=str(free_port()), API_PORT=str(free_port()),
               WS_BASE_PORT=str(free_port()), CHATD=str(Path(sys.executable).parent / "chatd"))
    run = lambda cmd: subprocess.run([str(SCRIPT), cmd], env=env, capture_output=True, text=True, timeout=120)  # noqa: E731
    started = run("start")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        proc = subprocess.run([sys.executable, "-m", "chatd.cli", "bench", "dm", "--api",
                               f"http://127.0.0.1:{env['API_PORT']}", "--cluster-dir", env["CLUSTER_DIR"],
                               "--cross-shard", "--clients", "12", "--rate", "60", "--duration", "2", "--procs", "1",
                               "--json", "--no-progress", "--check"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        r = json.loads(proc.stdout)
    finally:
        run("stop")
    c = r["counts"]
    assert c["sent"] > 0 and c["acked"] == c["sent"] and c["delivered"] == 2 * c["sent"]
    assert (c["lost"], c["duplicated"], c["out_of_order"]) == (0, 0, 0)
    cl = r["cluster"]
    assert cl["shards"] == ["s1", "s2", "s3"] and sum(cl["devices_by_shard"].values()) == 12
    # as many of the 6 pairs straddle two shards as the shards' shares allow (homes are random)
    possible = min(6, 12 - max(cl["devices_by_shard"].values()))
    assert cl["sends_partner_on_other_shard"] == round(possible / 6, 3) > 0
    s = r["server"]
    assert set(s["procs"]) == {"s1", "s2", "s3", "p1", "api"}
    assert s["cpu_s"] == pytest.approx(sum(p["cpu_s"] for p in s["procs"].values()), abs=0.002)
    assert set(s["cpu_us_per_send_by_role"]) == {"shard", "presence", "api"}
    assert s["cpu_us_per_send_by_role"]["shard"] > 0
