"""``chatd bench failover`` against a real cluster (ZooKeeper + shard processes), laid out as
bin/chatd-local-cluster lays it out (run/*.pid, logs/): a kill -9 under load is reported with its
takeover time and `unavailable` answers, and nothing unanswered, lost, duplicated or reordered."""

from __future__ import annotations

import os
import signal

import pytest

from chatd.bench.failover import FailoverOptions, FailoverRun, format_report
from tests.cluster import Cluster, zookeeper_available

pytestmark = pytest.mark.skipif(not zookeeper_available(),
                                reason="ZooKeeper not installed (apt-get install zookeeper); .ci/run installs it")


async def test_failover_bench_reports_a_kill(zk, tmp_path):
    cluster = Cluster(zk, tmp_path, n=2, session_timeout_s=2.0, heartbeat_s=0.3)
    lc = tmp_path / "local-cluster"
    (lc / "run").mkdir(parents=True)
    (lc / "logs").mkdir()
    try:
        await cluster.start()
        for name, proc in cluster.procs.items():
            (lc / "run" / f"{name}.pid").write_text(f"{proc.pid}\n")
        (lc / "run" / "zookeeper.pid").write_text(f"{zk.proc.pid}\n")
        opts = FailoverOptions(api=cluster.api.base, cluster_dir=str(lc), faults=("kill:s2",), clients=8,
                               rate=30, warmup_s=1.0, restart_s=3.0, settle_s=2.0, drain_s=20.0)
        report = await FailoverRun(opts, log=print).run()
        print(format_report(report))
        (row,) = report["faults"]
        assert row["sends"] > 20 and row["unavailable"] > 0
        assert row["first_ack_s"] is not None and row["first_ack_s"] <= 2.0 + 3.0
        assert row["unanswered_beyond_bound"] == 0, row["late"]
        t = report["totals"]
        assert t["lost"] == t["seq_given_twice"] == t["duplicated"] == t["out_of_order"] == 0, t
        assert report["ok"]
        assert (lc / "run" / "s2.pid").read_text().strip() != str(cluster.procs["s2"].pid)  # restarted
    finally:
        try:
            os.kill(int((lc / "run" / "s2.pid").read_text()), signal.SIGTERM)  # the restarted shard
        except (OSError, ValueError):
            pass
        cluster.stop()
