"""The fuzzer's frames (hypothesis strategies), shared by tests/test_fuzz.py and
tests/test_protocol_fastpath.py: valid client frames (``base_frames``), mutated as values
(``mutated_frame``), encoded and maybe mutated again as text or bytes (``wire_frame``); the
settings every fuzz test runs with, and its size (``CHATD_FUZZ_FRAMES``; ``CHATD_FUZZ_RANDOM`` draws
new frames instead of the same ones every run). Pure: no I/O."""

from __future__ import annotations

import copy
import json
import os

import msgpack
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from chatd.protocol import client as proto

FRAMES = int(os.environ.get("CHATD_FUZZ_FRAMES", "16000"))
RANDOM = bool(os.environ.get("CHATD_FUZZ_RANDOM"))
BATCH = 50  # frames per live example (one connection)
FUZZ_TYPES = sorted(proto.REQUEST_TYPES - {"logout"})  # a logout would end the example's connection


def fuzz_settings(examples: int):
    return settings(max_examples=examples, deadline=None, database=None, derandomize=not RANDOM,
                    phases=[Phase.explicit, Phase.generate, Phase.shrink],
                    suppress_health_check=list(HealthCheck))


# ---- mutated frames -------------------------------------------------------------------------------
NASTY_STRINGS = ["\ud83d", "x\udc00y", "\x00", "a\x00b", "", "i" * 65, "c" * 129, "dm:1:2", "dm:2:1",
                 "g:0000000000000000", "g:zz", "💬" * 3, "\\", '"', "v1.a.b", "null"]
leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.integers(), st.floats(),
                 st.text(max_size=12), st.sampled_from(NASTY_STRINGS), st.binary(max_size=8))
nasty = st.recursive(leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                     max_leaves=8)


def base_frames(ch: str, group: str, peer: int, token: str) -> list[dict]:
    return [
        {"type": "auth", "id": 1, "token": token, "cursors": {ch: 0}},
        {"type": "send", "id": 2, "channel_id": ch, "client_msg_id": "c1", "body": "hello"},
        {"type": "send", "id": "s", "channel_id": group, "client_msg_id": "c2", "body": "x" * 40},
        {"type": "sync", "id": 3, "cursors": {ch: 0, group: 1}},
        {"type": "history", "id": 4, "channel_id": ch, "before": 10, "after": 1, "limit": 5},
        {"type": "heartbeat", "id": 5},
        {"type": "typing", "id": 6, "channel_id": group},
        {"type": "read", "id": 7, "channel_id": ch, "seq": 1},
        {"type": "presence", "id": 8, "user_ids": [peer]},
        {"type": "subscribe_presence", "id": 9, "user_ids": [peer, peer + 1]},
        {"type": "unsubscribe_presence", "id": 10, "user_ids": [peer]},
    ]


@st.composite
def mutated_frame(draw, bases: list[dict]):
    frame = copy.deepcopy(draw(st.sampled_from(bases)))
    if frame["type"] == "send" and draw(st.booleans()):  # a new message: the store path, not dedup
        frame["client_msg_id"] = draw(st.text(min_size=1, max_size=24) | st.sampled_from(NASTY_STRINGS))
        frame["body"] = draw(st.text(max_size=64) | st.sampled_from(NASTY_STRINGS))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["set", "set", "del", "add", "type", "deep", "wrap"]))
        if not isinstance(frame, dict):
            break
        keys = list(frame)
        if op == "set" and keys:
            frame[draw(st.sampled_from(keys))] = draw(nasty)
        elif op == "del" and keys:
            del frame[draw(st.sampled_from(keys))]
        elif op == "add":
            frame[draw(st.text(max_size=8))] = draw(nasty)
        elif op == "type":
            frame["type"] = draw(st.sampled_from([*FUZZ_TYPES, "", "Send", "x" * 50]))
        elif op == "deep":
            nested: list = []
            for _ in range(draw(st.sampled_from([3, 9, 200]))):  # deeper: see "nest" in wire_frame
                nested = [nested]
            frame[draw(st.sampled_from(keys or ["x"]))] = nested
        elif op == "wrap":
            frame = draw(st.sampled_from([[frame], "frame", 7, None]))
    return frame


_PACKER_OPTS = dict(use_bin_type=True, unicode_errors="surrogatepass")  # lone surrogates: invalid UTF-8


def _encode(frame, fmt: str):
    if fmt == proto.JSON:
        return json.dumps(frame, default=lambda b: b.decode("latin-1"))  # lone surrogates: \\udXXX escapes
    try:
        return msgpack.packb(frame, **_PACKER_OPTS)
    except (OverflowError, TypeError, ValueError):
        return msgpack.packb(repr(frame), **_PACKER_OPTS)


@st.composite
def wire_frame(draw, bases: list[dict], fmt: str):
    """A mutated frame, encoded, then maybe mutated as text (JSON) or bytes (msgpack)."""
    data = _encode(draw(mutated_frame(bases)), fmt)
    if draw(st.integers(0, 19)) == 0:  # nest the whole frame deeper than any encoder would
        n = draw(st.sampled_from([10, 1000, 50_000]))
        data = "[" * n + data + "]" * n if fmt == proto.JSON else b"\x91" * n + data
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        edit = draw(st.sampled_from(["delete", "insert", "truncate", "flip"]))
        if fmt == proto.JSON:
            piece = draw(st.sampled_from(["{", "}", "[", "]", '"', "\\", "\\ud83d", ",", ":", "0", "\u0000", "é"]))
        else:
            piece = bytes([draw(st.integers(0, 255))])
        if edit == "delete":
            data = data[:i] + data[i + 1:]
        elif edit == "insert":
            data = data[:i] + piece + data[i:]
        elif edit == "truncate":
            data = data[:i]
        else:
            data = data[:i] + piece + data[i + 1:]
    return data


# the frames of the in-memory codec tests (no server behind them)
CODEC_BASES = base_frames("dm:1:2", "g:00000000000000aa", 2, "v1.eyJ1IjoxfQ.sig")
