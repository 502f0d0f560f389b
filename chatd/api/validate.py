"""Request-body and query validation for the HTTP API: wrong input is ``ChatError("bad_request")``
naming the field, never a 500."""

from __future__ import annotations

import re

from ..errors import ChatError

USERNAME_RE = re.compile(r"[A-Za-z0-9_.-]{3,32}")


def require_object(body) -> dict:
    if not isinstance(body, dict):
        raise ChatError("bad_request", "the request body must be a JSON object")
    return body


def field_str(body: dict, name: str, *, required: bool = True, min_len: int = 0, max_len: int = 1000,
              default=None):
    v = body.get(name)
    if v is None:
        if required:
            raise ChatError("bad_request", f"field {name!r} is required")
        return default
    if not isinstance(v, str):
        raise ChatError("bad_request", f"field {name!r} must be a string")
    if not min_len <= len(v) <= max_len:
        raise ChatError("bad_request", f"field {name!r} must have {min_len} to {max_len} characters")
    return v


def field_int(body: dict, name: str, *, required: bool = True, default=None, lo: int = 0, hi: int = 2**63 - 1):
    v = body.get(name)
    if v is None:
        if required:
            raise ChatError("bad_request", f"field {name!r} is required")
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ChatError("bad_request", f"field {name!r} must be an integer between {lo} and {hi}")
    return v


def field_int_list(body: dict, name: str, max_items: int) -> list[int]:
    v = body.get(name, [])
    if not isinstance(v, list) or len(v) > max_items or any(
            isinstance(x, bool) or not isinstance(x, int) or not 1 <= x < 2**63 for x in v):
        raise ChatError("bad_request", f"field {name!r} must be a list of at most {max_items} user ids")
    return v


def query_int(args, name: str, *, default=None, lo: int = 0, hi: int = 2**63 - 1):
    raw = args.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = int(raw, 10)
    except ValueError:
        raise ChatError("bad_request", f"query parameter {name!r} must be an integer") from None
    if not lo <= v <= hi:
        raise ChatError("bad_request", f"query parameter {name!r} must be between {lo} and {hi}")
    return v


def username(body: dict) -> str:
    name = field_str(body, "username", max_len=32)
    if not USERNAME_RE.fullmatch(name):
        raise ChatError("bad_request", "username must be 3-32 characters of letters, digits, '_', '.', '-'")
    return name
