"""What the API's route modules and its error handlers share: the error answer, the shard a user
connects to, the membership check of a channel route.

Error policy: every error answer is ``{"error": {"code", "message"}}`` with the code's status
(:mod:`chatd.errors`) unless one is given, counted in ``chatd_errors_total``; no live shard is
``unavailable`` (503, retry); a :class:`RetryLater` carries ``Retry-After``; a channel id that is no channel id is ``no_such_channel`` (404), a
caller who is not a member ``not_member`` (403).
"""

from __future__ import annotations

from ..discovery.view import ShardInfo
from ..errors import ChatError
from ..ids import is_valid_channel_id
from ..membership import Membership
from ..metrics import Metrics
from .host import Discovery


class RetryLater(ChatError):
    """A refusal that says when to come back: answered with ``Retry-After`` (whole seconds, at least 1)."""

    def __init__(self, code: str, message: str, retry_after_s: float):
        super().__init__(code, message)
        self.retry_after_s = retry_after_s


def error_answer(metrics: Metrics, code: str, message: str, status: int | None = None) -> tuple[dict, int]:
    metrics.errors.inc(code=code)
    e = ChatError(code, message)
    return {"error": e.to_dict()}, status or e.http_status


def transport_urls(shard: ShardInfo) -> dict:
    """``ws_url`` and the same shard's SSE / long-poll / frames URLs (docs/protocol.md,
    "Transports"): ``ws[s]://host[:port]/prefix/`` gives ``http[s]://host[:port]/prefix/v1/stream``
    and so on (a proxy in front maps the same prefix to the shard port)."""
    ws = shard.ws_url
    scheme, sep, rest = ws.partition("://")
    http = ("https" if scheme == "wss" else "http") + sep + rest
    if not http.endswith("/"):
        http += "/"
    return {"ws_url": ws, "shard_id": shard.shard_id, "stream_url": http + "v1/stream",
            "poll_url": http + "v1/poll", "frames_url": http + "v1/frames"}


def shard_for(discovery: Discovery, user_id: int) -> ShardInfo:
    try:
        return discovery.pick_shard(user_id)
    except LookupError:
        raise ChatError("unavailable", "no chat shard is available; retry") from None


async def require_member(membership: Membership, channel_id: str, user_id: int) -> frozenset[int]:
    """The channel's members, or raise unless ``user_id`` is one of them."""
    if not is_valid_channel_id(channel_id):
        raise ChatError("no_such_channel", f"{channel_id[:70]!r} is not a channel id")
    return await membership.require_member(channel_id, user_id)
