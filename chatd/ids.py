"""Identifiers: channel ids and their parsing. Pure functions, no I/O.

* 1:1 channel: ``dm:<low user id>:<high user id>``; it exists implicitly for any two users.
* group channel: ``g:<16 hex digits>``, created through the API.
"""

from __future__ import annotations

import re
import secrets

MAX_CHANNEL_ID_LEN = 64
# The largest user id, seq or request id: a signed 64-bit integer (SQLite's INTEGER, Cassandra's
# bigint, msgpack's int64). Every bound check on those numbers uses this one constant.
MAX_INT64 = 2**63 - 1
_DM = re.compile(r"dm:([1-9][0-9]{0,18}):([1-9][0-9]{0,18})")
_GROUP = re.compile(r"g:[0-9a-f]{16}")


def dm_channel_id(a: int, b: int) -> str:
    if a == b:
        raise ValueError("a 1:1 channel needs two different users")
    lo, hi = sorted((a, b))
    return f"dm:{lo}:{hi}"


def new_group_id() -> str:
    return "g:" + secrets.token_hex(8)


def dm_members(channel_id: str) -> tuple[int, int] | None:
    """The two users of a canonical 1:1 channel id, or None if it is not one."""
    m = _DM.fullmatch(channel_id)
    if not m:
        return None
    a, b = int(m.group(1)), int(m.group(2))
    if not a < b or b > MAX_INT64:
        return None
    return a, b


def is_valid_channel_id(channel_id: str) -> bool:
    if not isinstance(channel_id, str) or len(channel_id) > MAX_CHANNEL_ID_LEN:
        return False
    return dm_members(channel_id) is not None or _GROUP.fullmatch(channel_id) is not None


def is_group(channel_id: str) -> bool:
    return channel_id.startswith("g:")
