"""chatd bench: its pure parts in memory, and a CI smoke of the real command against a chatd run it
starts itself. The smoke asserts correctness only (nothing lost, duplicated, out of order), never a
speed."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from click.testing import CliRunner

from chatd.bench import seqs
from chatd.bench.cli import bench
from chatd.bench.histogram import Histogram, bucket_index, bucket_range
from chatd.bench.plot import render_svg
from chatd.bench.population import Population, split
from chatd.bench.report import REPORT_KEYS, account, build_report, format_summary
from chatd.bench.scenarios import SCENARIOS, BenchOptions, DeviceSpec, plan_channels
from chatd.bench.stats import Stats
from chatd.bench.target import server_opt_env
from chatd.bench.worker import count_at, time_of
from chatd.bench.ws import (GUID, OP_BINARY, OP_CLOSE, OP_PING, OP_TEXT, FrameParser, HandshakeError,
                            check_handshake_response, encode_frame, mask)


# ---- histogram ---------------------------------------------------------------------------------

def test_histogram_buckets_are_contiguous_and_precise():
    prev_hi = -1
    for i in range(0, 40 * 128):
        lo, hi = bucket_range(i)
        assert lo == prev_hi + 1
        assert bucket_index(lo) == i and bucket_index(hi) == i
        assert (hi - lo) <= lo / 128 + 1  # relative precision < 1/128
        prev_hi = hi


def test_histogram_percentiles_match_exact_within_precision():
    rng = random.Random(7)
    values = [int(rng.lognormvariate(8, 1.2)) for _ in range(20_000)]
    h = Histogram()
    for v in values:
        h.record(v)
    values.sort()
    for q in (50, 90, 99, 99.9):
        exact = values[max(0, int(len(values) * q / 100 + 0.999999) - 1)]
        assert exact <= h.percentile(q) <= exact * (1 + 1 / 128) + 1
    assert h.percentile(100) == h.max == values[-1]
    assert h.min == values[0]
    assert h.total == len(values)


def test_histogram_small_values_exact_and_empty():
    h = Histogram()
    assert h.percentile(99) == 0 and h.summary_ms()["count"] == 0
    for v in (1, 2, 3, 4):
        h.record(v)
    assert [h.percentile(q) for q in (25, 50, 75, 100)] == [1, 2, 3, 4]


def test_histogram_merge_equals_recording_everything_in_one():
    rng = random.Random(3)
    a, b, both = Histogram(), Histogram(), Histogram()
    for _ in range(5000):
        v = rng.randrange(1, 10_000_000)
        (a if rng.random() < 0.5 else b).record(v)
        both.record(v)
    merged = Histogram.from_dict(json.loads(json.dumps(a.to_dict())))  # survives JSON (string keys)
    merged.merge(Histogram.from_dict(b.to_dict()))
    assert merged.counts == both.counts
    assert (merged.total, merged.min, merged.max, merged.sum) == (both.total, both.min, both.max, both.sum)
    assert merged.percentile(99.9) == both.percentile(99.9)


# ---- seq sets ----------------------------------------------------------------------------------

def test_seqset_in_order_gaps_and_duplicates():
    s = seqs.SeqSet()
    assert all(s.add(i) for i in (1, 2, 3))
    assert s.ranges == [[1, 3]] and s.top() == 3
    assert s.add(6) and s.ranges == [[1, 3], [6, 6]] and s.top() == 3
    assert not s.add(2) and not s.add(6)
    assert s.add(5) and s.ranges == [[1, 3], [5, 6]]
    assert s.add(4) and s.ranges == [[1, 6]] and s.top() == 6
    assert 4 in s and 7 not in s and len(s) == 6
    t = seqs.SeqSet()
    t.add(2)
    assert t.top() == 0 and t.add(1) and t.ranges == [[1, 2]]


def test_range_union_and_intersection():
    a = seqs.from_values([1, 2, 3, 7, 8, 10])
    b = seqs.from_values([2, 3, 4, 8, 9, 10, 11])
    assert a == [[1, 3], [7, 8], [10, 10]]
    assert seqs.union(a, b) == [[1, 4], [7, 11]]
    assert seqs.intersection_size(a, b) == 4  # 2, 3, 8, 10
    assert seqs.intersection_size(a, []) == 0


# ---- WebSocket framing -------------------------------------------------------------------------

def _server_frame(opcode, payload, fin=True):
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        return struct.pack("!BB", b0, n) + payload
    if n < 65536:
        return struct.pack("!BBH", b0, 126, n) + payload
    return struct.pack("!BBQ", b0, 127, n) + payload


def test_client_frames_are_masked_and_parse_back():
    for n in (0, 5, 125, 126, 65535, 65536, 70000):
        payload = bytes(random.Random(n).randrange(256) for _ in range(n))
        key = b"\x01\x02\x03\x04"
        frame = encode_frame(OP_BINARY, payload, key)
        assert frame[1] & 0x80  # masked, as a client must
        assert mask(mask(payload, key), key) == payload
        assert FrameParser().feed(frame) == [(OP_BINARY, payload)]


def test_parser_handles_partial_input_fragments_and_control_frames():
    stream = (_server_frame(OP_TEXT, b'{"a":1}') + _server_frame(OP_TEXT, b"he", fin=False)
              + _server_frame(OP_PING, b"p") + _server_frame(0x0, b"ll", fin=False)
              + _server_frame(0x0, b"o") + _server_frame(OP_TEXT, b"x" * 300)
              + _server_frame(OP_CLOSE, struct.pack("!H", 1001)))
    p = FrameParser()
    out = []
    for i in range(0, len(stream), 3):  # three bytes at a time
        out += p.feed(stream[i:i + 3])
    assert out == [(OP_TEXT, b'{"a":1}'), (OP_PING, b"p"), (OP_TEXT, b"hello"), (OP_TEXT, b"x" * 300),
                   (OP_CLOSE, struct.pack("!H", 1001))]


def test_handshake_accept_is_checked():
    key = b"dGhlIHNhbXBsZSBub25jZQ=="
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
    ok = (f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {accept}\r\n"
          "Sec-WebSocket-Protocol: chatd.v1.json").encode()
    assert check_handshake_response(ok, key) == "chatd.v1.json"
    with pytest.raises(HandshakeError):
        check_handshake_response(ok.replace(accept.encode(), b"AAAA"), key)
    with pytest.raises(HandshakeError):
        check_handshake_response(b"HTTP/1.1 400 Bad Request", key)


# ---- planning and pacing -----------------------------------------------------------------------

def test_plans_and_options():
    assert plan_channels("dm", 4, 10) == [plan_channels("dm", 2, 10)[0], plan_channels("storm", 4, 10)[1]]
    assert [p.members for p in plan_channels("group", 6, 3)] == [(0, 1, 2), (3, 4, 5)]
    assert [p.members for p in plan_channels("group", 4, 100)] == [(0, 1, 2, 3)]
    assert plan_channels("idle", 5, 10) == []
    BenchOptions("dm", clients=10).validate()
    for bad in (BenchOptions("dm", clients=3), BenchOptions("group", clients=15, group_size=10),
                BenchOptions("group", group_size=1001), BenchOptions("dm", size=10),
                BenchOptions("dm", ramp_up_s=10, duration_s=5)):
        with pytest.raises(ValueError):
            bad.validate()
    assert server_opt_env("store.sqlite_synchronous=normal") == ("CHATD_STORE__SQLITE_SYNCHRONOUS", "normal")
    assert server_opt_env("log_level=warning") == ("CHATD__LOG_LEVEL", "warning")


def test_pacing_schedule_is_the_inverse_of_the_count():
    for ramp in (0.0, 2.0):
        for k in (1, 10, 999, 1000, 5000):
            t = time_of(k, 1000.0, ramp)
            assert count_at(t, 1000.0, ramp) == pytest.approx(k)
    assert count_at(10, 1000.0, 2.0) == pytest.approx(9000)  # the ramp costs half its length


# ---- report and plot ---------------------------------------------------------------------------

def _device(i, ch):
    return DeviceSpec(index=i, user_index=i, user_id=i + 1, token="t", ws_url="ws://x/", tag=f"p{i}.",
                      channels=(ch,), send_channel=ch)


def _worker_result(worker, devices, acked, books):
    st = Stats()
    st.sent = st.acked = sum(len(v) for v in acked.values())
    st.delivered = sum(seqs.size(r) for b in books.values() for r in b.values())
    for ch, values in acked.items():
        st.acked_seqs[ch].extend(values)
    for v in (900, 1500, 2500):
        st.h_ack.record(v)
        st.h_deliver.record(v * 2)
    st.timeline["sent"] = [2, 1]
    st.timeline["acked"] = [2, 1]
    st.timeline["delivered"] = [4, 2]
    st.timeline["cpu_util"] = [0.1, 0.1]
    r = st.to_dict()
    r.update(worker=worker, cpu_s=0.2, wall_s=2.0, drain_s=0.1, books=books, rusage_maxrss_kib=1000)
    return r


def test_report_shape_and_loss_accounting():
    ch = "dm:1:2"
    pop = Population("p", [1, 2], [_device(0, ch), _device(1, ch)], {ch: [0, 1]})
    results = [_worker_result(0, [0], {ch: [1, 3]}, {0: {ch: [[1, 3]]}}),
               _worker_result(1, [1], {ch: [2]}, {1: {ch: [[1, 2]]}})]  # device 1 lacks seq 3
    meta = {"started_at": "2026-01-01T00:00:00+00:00", "target": {"api": "http://x", "self_started": True},
            "setup_s": 0.1, "run_s": 2.0, "connected": 2, "connect_failed": 0, "server": None}
    report, hists = build_report(BenchOptions("dm", clients=2, duration_s=2), pop, results, meta)
    assert tuple(report) == REPORT_KEYS
    c = report["counts"]
    assert (c["sent"], c["acked"], c["expected_deliveries"], c["lost"]) == (3, 3, 6, 1)
    assert report["ok"] is False and "1 deliveries lost" in report["problems"]
    assert report["latency_ms"]["send_ack"]["count"] == 6
    assert report["latency_ms"]["send_deliver"]["max"] == pytest.approx(5.0, rel=0.01)
    assert report["timeline"][0] == {"t": 0, "sent": 4, "acked": 4, "delivered": 8}
    assert report["throughput"]["delivered_per_s"] == 6.0
    json.dumps(report)
    assert "deliveries lost" in format_summary(report)
    root = ET.fromstring(render_svg(report, hists))
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert len(root.findall(".//{http://www.w3.org/2000/svg}polyline")) >= 4
    assert account({ch: [0, 1]}, {ch: [[1, 3]]}, {0: {ch: [[1, 3]]}, 1: {ch: [[1, 3]]}})["lost"] == 0


def test_cross_shard_pairs_and_topology():
    from chatd.bench.topology import cross_shard_order, role_of, topology
    from chatd.discovery import hashing

    shards = ["s1", "s1", "s1", "s2", "s2", "s3"]
    order = cross_shard_order(shards)
    assert sorted(order) == list(range(6))
    assert all(shards[order[k]] != shards[order[k + 1]] for k in range(0, 6, 2))  # every pair straddles
    lopsided = cross_shard_order(["a", "a", "a", "a", "b", "b"])
    assert sum(["a", "a", "a", "a", "b", "b"][lopsided[k]] != ["a", "a", "a", "a", "b", "b"][lopsided[k + 1]]
               for k in range(0, 6, 2)) == 2  # as many as the shares allow
    with pytest.raises(ValueError):
        BenchOptions("group", clients=4, group_size=4, cross_shard=True).validate()
    # one pair: user 1 on s1, user 2 on s2; the report says where its sends go
    live = ["s1", "s2", "s3"]
    ch = "dm:1:2"
    devs = [_device(0, ch), _device(1, ch)]
    devs[0].shard, devs[1].shard = "s1", "s2"
    t = topology(devs, {ch: [0, 1]}, live)
    owner = hashing.owner(f"c:{ch}", live)
    assert t["sends_partner_on_other_shard"] == 1.0
    assert t["sends_owner_remote"] == (0.5 if owner in ("s1", "s2") else 1.0)
    assert t["devices_by_shard"] == {"s1": 1, "s2": 1}
    assert t["link_frames_per_send"] > 0
    devs[1].shard = "s1"
    assert topology(devs, {ch: [0, 1]}, live) is None  # one shard: no cluster section
    assert [role_of(n) for n in ("s1", "s12", "p1", "api", "4242", "server")] == \
        ["shard", "shard", "presence", "api", "server", "server"]


def test_server_pid_and_cluster_dir_need_api(tmp_path):
    out = CliRunner().invoke(bench, ["dm", "--server-pid", "1"])
    assert out.exit_code == 2 and "need --api" in out.output
    out = CliRunner().invoke(bench, ["dm", "--api", "http://127.0.0.1:1", "--cluster-dir", str(tmp_path)])
    assert out.exit_code == 2 and "no chatd pid files" in out.output


def test_split_spreads_pairs_over_processes():
    devs = [_device(i, "dm:1:2") for i in range(5)]
    parts = split(devs, 2)
    assert [[d.index for d in p] for p in parts] == [[0, 2, 4], [1, 3]]
    assert len(split(devs, 10)) == 5


def test_help_documents_every_scenario_and_option():
    out = CliRunner().invoke(bench, ["--help"], terminal_width=200).output
    for name in SCENARIOS:
        assert f"  {name} " in out
    for opt in ("--clients", "--rate", "--duration", "--size", "--ramp-up", "--seed", "--procs", "--format",
                "--json", "--plot", "--api", "--group-size", "--server-opt", "--server-env", "TOTAL",
                "--cross-shard", "--cluster-dir", "--server-pid"):
        assert opt in out


# ---- CI smoke: the real command against a self-started chatd run --------------------------------

def _bench(*args, timeout=60) -> dict:
    proc = subprocess.run([sys.executable, "-m", "chatd.cli", "bench", *args, "--json", "--no-progress"],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _assert_exact(report, deliveries_per_ack):
    c = report["counts"]
    assert c["sent"] > 0
    assert c["acked"] == c["sent"]
    assert c["expected_deliveries"] == c["acked"] * deliveries_per_ack
    assert c["delivered"] == c["expected_deliveries"]
    assert (c["lost"], c["duplicated"], c["out_of_order"]) == (0, 0, 0)
    assert report["ok"], report["problems"]


def test_smoke_dm():
    r = _bench("dm", "--clients", "10", "--duration", "3", "--rate", "200", "--procs", "2")
    _assert_exact(r, 2)  # the partner and the sender's own device
    assert r["latency_ms"]["send_deliver"]["count"] == r["counts"]["acked"]
    assert r["generator"]["procs"] == 2
    assert r["server"]["pid"] == r["target"]["server_pid"]
    s = r["server"]
    assert s["cpu_us_per_send"] == round(s["cpu_s"] / r["counts"]["sent"] * 1e6, 1) > 0
    assert 0 < s["cpu_us_per_delivery"] < s["cpu_us_per_send"]


def test_smoke_group_msgpack():
    r = _bench("group", "--clients", "10", "--group-size", "5", "--duration", "2", "--rate", "100",
               "--format", "msgpack", "--procs", "1")
    _assert_exact(r, 5)


def test_smoke_storm():
    r = _bench("storm", "--clients", "10", "--duration", "3", "--rate", "200", "--reconnect-interval", "0.4",
               "--procs", "2")
    _assert_exact(r, 2)
    assert r["counts"]["reconnects"] > 0 and r["counts"]["storm_drops"] > 0


def test_smoke_group_mix_converges():
    """--mix: edits, deletes and reactions in the load, counted like messages (nothing lost,
    duplicated or out of order), and every device's folded view equals the folded HTTP history."""
    r = _bench("group", "--clients", "6", "--group-size", "3", "--duration", "3", "--rate", "60", "--procs", "2",
               "--mix", "send=60,edit=15,delete=10,react=15")
    _assert_exact(r, 3)
    assert r["lifecycle"] == {"devices_compared": 6, "mismatched": 0, "devices_behind": 0, "converged": True}
    assert r["options"]["mix"] == [["send", 60.0], ["edit", 15.0], ["delete", 10.0], ["react", 15.0]]


def test_idle_clients_heartbeat_at_the_interval_the_auth_reply_names():
    """The bench's clients (like the web client) take the heartbeat interval from the server's auth
    reply: at 0.5 s, 4 clients held for 3 s send about 24 heartbeats; at the default (20 s) at most
    one each (the first comes at a random point of the first interval)."""
    fast = _bench("idle", "--clients", "4", "--duration", "3", "--ramp-up", "0", "--procs", "1",
                  "--server-opt", "limits.heartbeat_interval_s=0.5")
    assert 8 <= fast["counts"]["heartbeats"] <= 40, fast["counts"]  # (at a 5 s interval: at most 4)
    default = _bench("idle", "--clients", "4", "--duration", "3", "--ramp-up", "0", "--procs", "1")
    assert default["counts"]["heartbeats"] <= 4, default["counts"]


@pytest.mark.parametrize("transport", ["sse", "poll"])
def test_smoke_http_transports(transport):
    """The same checks over SSE and long polling (+ POST /v1/frames), in a storm: reconnects
    resume from the devices' own cursors."""
    r = _bench("storm", "--clients", "10", "--duration", "3", "--rate", "100", "--reconnect-interval", "0.4",
               "--procs", "1", "--transport", transport)
    _assert_exact(r, 2)
    assert r["counts"]["reconnects"] > 0 and r["counts"]["storm_drops"] > 0
    assert r["options"]["transport"] == transport


def test_http_transports_refuse_msgpack():
    with pytest.raises(ValueError, match="JSON only"):
        BenchOptions(scenario="dm", clients=2, transport="sse", fmt="msgpack").validate()
