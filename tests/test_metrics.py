"""``/metrics`` of a real ``chatd run`` (prometheus_client's exposition, parsed back with its
parser): the documented names, the operator's metrics moving with real traffic, and the Grafana
dashboard (docs/grafana-chatd.json) using only metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import API, RunningServer, make_config, open_client

ROOT = Path(__file__).resolve().parent.parent


async def scrape(api) -> dict[str, float]:
    """``{sample name{labels}: value}`` and ``{family name: None}`` for every family."""
    r = await api.call("GET", "/metrics")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
    out: dict = {}
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    for family in text_string_to_metric_families(r.body):
        for suffix in ["", *suffixes.get(family.type, [])]:  # what a query may name, samples or not
            out.setdefault(family.name + suffix, None)
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    assert out
    return out


async def test_metrics_follow_traffic(server, nursery):
    api = server.api
    a, b = await api.signup_login("alice"), await api.signup_login("bob")
    ca = await open_client(nursery, a["ws_url"], a["token"])
    ch = f"dm:{a['user']['id']}:{b['user']['id']}"
    for i in range(3):
        await ca.send_message(ch, f"m{i}", client_msg_id=f"id-{i}")
    await ca.send_message(ch, "m0", client_msg_id="id-0")  # a resend
    await api.call("GET", "/v1/nothing-here")
    m = await scrape(api)
    ops = (ROOT / "docs" / "operations.md").read_text()
    table = ops[ops.index("## Metrics"):ops.index("**Dashboard.**")]
    documented = [n for n in re.findall(r"`(chatd_\w+)", table) if "push" not in n and not n.endswith("_")]
    assert len(documented) >= 15  # (push metrics exist with a push provider only)
    for name in documented:
        assert name in m or name.removesuffix("_total") in m, name
    assert m["chatd_ws_connections"] == 1 and m["chatd_ws_authenticated"] == 1
    assert m["chatd_messages_in_total"] == 3 and m["chatd_duplicate_sends_total"] == 1
    assert m["chatd_send_ack_seconds_count"] == 4 and m["chatd_store_append_seconds_count"] == 4
    assert 0 < m["chatd_send_ack_seconds_sum"] < 60
    assert m["chatd_store_ops_total"] >= 3 and m["chatd_store_commits_total"] >= 1
    assert m["chatd_store_commit_seconds_total"] > 0
    assert m["chatd_discovery_writable"] == 1 and m["chatd_discovery_shards"] == 1
    assert m['chatd_errors_total{code="not_found"}'] == 1
    assert m['chatd_http_requests_total{status="404"}'] == 1
    assert m["chatd_http_request_seconds_count"] >= 5  # 2 sign-ups, 2 logins, the 404
    assert "chatd_link_queue_frames" in m  # no links in chatd run: the family without samples


async def test_grafana_dashboard_uses_only_existing_metrics(server):
    dashboard = json.loads((ROOT / "docs" / "grafana-chatd.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = set(re.findall(r"\bchatd_\w+", " ".join(exprs)))
    assert {"chatd_ws_connections", "chatd_send_ack_seconds_bucket", "chatd_link_queue_frames",
            "chatd_store_append_seconds_bucket", "chatd_messages_out_total"} <= used
    exposed = {k.split("{")[0] for k in await scrape(server.api)}
    assert not used - exposed, used - exposed
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("connections", "sends/s", "deliveries/s", "p99", "link queues", "store"):
        assert topic in titles, topic


async def test_metrics_on_a_listener_of_their_own(nursery, tmp_path):
    """Issue 20 (low): ``/metrics`` was public on the API port. With ``server.metrics_host`` it is
    served on that listener only; the API port answers 404 for it (and still serves the API)."""
    cfg = make_config(tmp_path)
    cfg.update({"server": {"metrics_host": "127.0.0.1", "metrics_port": 0}}, source="test")
    cfg.validate()
    server = await RunningServer(nursery, cfg).start()
    try:
        assert server.node.metrics_url.startswith("http://127.0.0.1:")
        assert server.node.metrics_url != server.info.api_url
        r = await server.api.call("GET", "/metrics")
        assert r.status == 404 and r.body["error"]["code"] == "not_found", r
        assert (await server.api.call("GET", "/healthz")).status == 200
        families = await scrape(API(server.node.metrics_url))
        assert "chatd_ws_connections" in families
        assert (await API(server.node.metrics_url).call("GET", "/v1/channels")).status == 404  # nothing else there
    finally:
        await server.stop()
