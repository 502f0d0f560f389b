"""Issue 20 in a real cluster (one shard, two API servers, real ZooKeeper; SQLite and a real
Cassandra): the per-user cap on groups created per hour holds whichever API server a user asks
(it is counted in the store, not per process), and with ``server.metrics_host`` every role that
serves ``/metrics`` (the API servers, the shard's admin port) serves it on that listener only."""

from __future__ import annotations

import re

from tests.cluster import Cluster
from tests.helpers import API, eventually, free_port

CAP = 3


def metrics_url(cluster: Cluster, name: str) -> str | None:
    found = re.findall(r"metrics on (http://127\.0\.0\.1:\d+)/metrics", cluster.log_text(name))
    return found[-1] if found else None


async def test_group_cap_and_metrics_listener_across_api_servers(zk, tmp_path, store_toml, monkeypatch):
    monkeypatch.setenv("CHATD_LIMITS__GROUPS_CREATED_PER_HOUR", str(CAP))
    cluster = Cluster(zk, tmp_path, n=1, store_toml=store_toml,
                      extra='[server]\nmetrics_host = "127.0.0.1"\nmetrics_port = 0\n')
    try:
        await cluster.start()
        second_port = free_port()
        cluster._spawn("api2", ["api", "--api-port", str(second_port)])
        second = API(f"http://127.0.0.1:{second_port}")

        async def second_ready():
            try:
                r = await second.call("GET", "/healthz")
            except OSError:
                return False
            return r.status == 200 and r.body["shards"] == ["s1"]
        await eventually(second_ready)

        alice = await cluster.api.signup_login("alice")
        made = []
        for i in range(CAP):  # alternating API servers: every one counts the same groups
            api = (cluster.api, second)[i % 2]
            r = await api.call("POST", "/v1/groups", {"name": f"g{i}", "members": []}, token=alice["token"])
            assert r.status == 201, r
            made.append(r.body["channel"]["id"])
        for api in (cluster.api, second):
            r = await api.call("POST", "/v1/groups", {"name": "over", "members": []}, token=alice["token"])
            assert r.status == 429 and r.body["error"]["code"] == "too_many_groups", r
            assert int(r.headers["Retry-After"]) > 3000
        listed = await second.call("GET", "/v1/channels", token=alice["token"])
        assert sorted(c["id"] for c in listed.body["channels"]) == sorted(made)

        for name, public in (("api", cluster.api), ("api2", second), ("s1", cluster.admin("s1"))):
            url = await eventually(lambda name=name: metrics_url(cluster, name))
            r = await API(url).call("GET", "/metrics")
            assert r.status == 200 and "chatd_" in r.body, (name, r)
            assert (await public.call("GET", "/metrics")).status == 404, name  # not on the public port
            assert (await public.call("GET", "/healthz")).status == 200, name
    finally:
        cluster.stop()
