"""Fuzzing (hypothesis): mutated valid frames, both codecs, against the codec in memory and against
a live ``chatd run`` process over real sockets. A "session crashed" line in the server's log, a
1011 close or an ``internal`` error frame is a failure; so is a server that stops answering, and
stored data that changed.

Sizes: CI sends ``CHATD_FUZZ_FRAMES`` frames to the live server (default 16,000) and an eighth of
that through the codec per format: 20,000 frames, about 40 s on a loaded 2-core machine (generating
the frames is most of it). CI is derandomized (the same frames every run); the long run
(docs/operations.md, "Fuzzing", has its result) draws new ones:
``CHATD_FUZZ_FRAMES=1000000 CHATD_FUZZ_RANDOM=1 python -m pytest tests/test_fuzz.py -k live -p no:timeout -s``.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import msgpack
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, open_websocket_url

from chatd.protocol import client as proto
from tests.fuzz_frames import BATCH, CODEC_BASES, FRAMES, base_frames, fuzz_settings, wire_frame
from tests.helpers import PASSWORD, _http, free_port


# ---- the codec in memory ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [proto.JSON, proto.MSGPACK])
def test_codec_fuzz(fmt):
    """parse() accepts or raises ProtocolError, nothing else; what it accepts is storable, and every
    error reply it leads to can be encoded and framed."""
    seen = []

    @fuzz_settings(max(200, FRAMES // 8))
    @given(wire_frame(CODEC_BASES, fmt))
    def check(data):
        seen.append(1)
        try:
            req = proto.parse(data, fmt, 64 * 1024)
        except proto.ProtocolError as e:
            out = proto.dumps(proto.error_frame(e.code, e.message, e.request_id), fmt)
            if isinstance(out, str):
                out.encode("utf-8")  # what the session's framing does
            return
        for value in vars(req).values():
            for s in (value if isinstance(value, (tuple, dict)) else [value]):
                if isinstance(s, str):
                    s.encode("utf-8")
        reply = proto.dumps({"type": "x", "id": req.id}, fmt)
        if isinstance(reply, str):
            reply.encode("utf-8")
    check()
    print(f"codec fuzz ({fmt}): {len(seen)} frames")


# ---- a live chatd ---------------------------------------------------------------------------------
class LiveServer:
    """``chatd run`` as an OS process with its log in a file (rate limits off: the fuzzer floods)."""

    def __init__(self, tmp):
        self.api_port, self.ws_port = free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.api_port}"
        self.ws_url = f"ws://127.0.0.1:{self.ws_port}/"
        config = tmp / "chatd.toml"
        config.write_text(
            f'data_dir = "{tmp / "data"}"\n'
            f"[server]\napi_port = {self.api_port}\nws_port = {self.ws_port}\n"
            "[auth]\nscrypt_n = 1024\nsignups_unthrottled = [\"127.0.0.0/8\"]\n"
            "[store]\nsqlite_synchronous = \"normal\"\n"
            "[limits]\nrate_frames_per_s = 1000000.0\nrate_burst = 1000000\n")
        self.log_path = tmp / "chatd.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "chatd.cli", "run", "--config", str(config)],
                                     stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, "chatd exited during start-up"
            try:
                if self.call("GET", "/healthz").status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "chatd did not start"
            time.sleep(0.1)

    def call(self, method, path, body=None, token=None):
        return _http(method, self.base + path, body, token, None)

    def login(self, name: str) -> dict:
        self.call("POST", "/v1/users", {"username": name, "password": PASSWORD})
        r = self.call("POST", "/v1/login", {"username": name, "password": PASSWORD})
        assert r.status == 200, r
        return r.body

    def crashes(self) -> list[str]:
        return [line for line in self.log_path.read_text(errors="replace").splitlines() if "session crashed" in line]

    def metric(self, name: str) -> float:
        text = self.call("GET", "/metrics").body
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    server = LiveServer(tmp_path_factory.mktemp("fuzz"))
    yield server
    server.stop()


async def _send_batch(ws_url: str, fmt: str, token: str, frames: list, before_auth: bool,
                      until: frozenset = frozenset({"fuzz-end"})) -> dict:
    """One connection: (auth,) the frames, then a heartbeat; what came back up to the replies
    with the ids ``until``."""
    sub = "chatd.v1.msgpack" if fmt == proto.MSGPACK else "chatd.v1.json"
    out = {"frames": [], "close": None}
    waiting = set(until)
    enc = (lambda f: msgpack.packb(f)) if fmt == proto.MSGPACK else json.dumps
    dec = (lambda d: msgpack.unpackb(d)) if fmt == proto.MSGPACK else json.loads
    with trio.fail_after(60):
        async with open_websocket_url(ws_url, subprotocols=[sub], max_message_size=2**24) as ws:
            try:
                if not before_auth:
                    await ws.send_message(enc({"type": "auth", "id": "fuzz-auth", "token": token}))
                for data in frames:
                    await ws.send_message(data)
                await ws.send_message(enc({"type": "heartbeat", "id": "fuzz-end"}))
                while True:
                    f = dec(await ws.get_message())
                    out["frames"].append(f)
                    waiting.discard(f.get("id"))
                    if not waiting:
                        break
            except ConnectionClosed as e:
                out["close"] = e.reason.code
    return out


def test_live_session_fuzz(live):
    """Mutated frames over real WebSockets, JSON and msgpack, before and after auth."""
    a, b = live.login("fuzz_a"), live.login("fuzz_b")
    ua, ub = a["user"]["id"], b["user"]["id"]
    ch = f"dm:{min(ua, ub)}:{max(ua, ub)}"
    group = live.call("POST", "/v1/groups", {"name": "fuzz", "members": [ub]}, token=a["token"]).body["channel"]["id"]
    keep = json.dumps({"type": "send", "id": "k", "channel_id": ch, "client_msg_id": "keep", "body": "keep me"})
    assert trio.run(_send_batch, live.ws_url, proto.JSON, a["token"], [keep], False,
                    frozenset({"k", "fuzz-end"}))["close"] is None
    kept = live.call("GET", f"/v1/channels/{ch}/messages?limit=500", token=a["token"]).body["messages"]
    assert [m["body"] for m in kept] == ["keep me"]
    bases = base_frames(ch, group, ub, a["token"])
    state = {"token": a["token"], "frames": 0, "closes": {}}
    examples = max(20, FRAMES // BATCH)

    @fuzz_settings(examples)
    @given(st.sampled_from([proto.JSON, proto.MSGPACK]).flatmap(
        lambda fmt: st.tuples(st.just(fmt), st.lists(wire_frame(bases, fmt), min_size=BATCH, max_size=BATCH),
                              st.booleans())))
    def check(case):
        fmt, frames, before_auth = case
        out = trio.run(_send_batch, live.ws_url, fmt, state["token"], frames, before_auth)
        state["frames"] += len(frames)
        code = out["close"]
        state["closes"][code] = state["closes"].get(code, 0) + 1
        internal = [f for f in out["frames"] if f.get("type") == "error" and f.get("code") == "internal"]
        assert not internal and code != 1011, (out, frames)
        assert code in (None, 1008), (code, out["frames"][-3:])  # 1008: five bad tokens before auth
        assert live.proc.poll() is None, "chatd died"
        auth = next((f for f in out["frames"] if f.get("id") == "fuzz-auth"), None)
        if auth is not None and auth.get("code") == "invalid_token":
            state["token"] = live.login("fuzz_a")["token"]  # a mutated frame cannot log out, but be safe

    started = time.monotonic()
    check()
    took = time.monotonic() - started
    print(f"live fuzz: {state['frames']} frames in {took:.1f} s, closes {state['closes']}")
    assert state["frames"] >= FRAMES
    assert live.crashes() == [], live.crashes()[:5]
    assert live.metric("chatd_session_crashes_total") == 0
    # what was stored before the fuzzing is still there, unchanged, and the channel is gap-free
    now = live.call("GET", f"/v1/channels/{ch}/messages?limit=500&after=0", token=a["token"]).body["messages"]
    assert now[:len(kept)] == kept
    assert [m["seq"] for m in now] == list(range(1, len(now) + 1))
    assert live.call("GET", "/healthz").status == 200
