"""What a push looks like on the wire, and what a gateway's answer means. Pure: no I/O, no clock.

* :func:`plan` turns one (recipient, channel) group of outbox rows into one :class:`Notification` per
  device token - coalesced (count + seq range), minus what the token's mark says was pushed already.
* :func:`webhook_request` / :func:`matrix_request` build the HTTP body and headers.
* :func:`webhook_outcome` / :func:`matrix_outcome` classify the answer as an :class:`Outcome`.
* :func:`backoff_s` is the retry schedule.

docs/push.md shows both payloads.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from dataclasses import dataclass
from typing import Callable

from ..store.base import PushEntry, PushToken

SIGNATURE_HEADER = "X-Chatd-Signature"
DELIVERY_HEADER = "X-Chatd-Delivery"
MATRIX_NOTIFY_PATH = "/_matrix/push/v1/notify"

# Outcome kinds
DELIVERED = "delivered"  # the gateway took it
REJECTED = "rejected"  # the gateway says the token is dead: unregister it
RETRY = "retry"  # transport failure, timeout, 5xx, 408, 429: try again later
FAILED = "failed"  # any other 4xx: the request itself is refused; retrying would not help


@dataclass(frozen=True)
class Notification:
    """One push to one device: ``count`` messages of ``channel_id`` (seqs ``first_seq..last_seq``)."""
    user_id: int
    channel_id: str
    sender_id: int  # the sender of the newest message
    count: int
    first_seq: int
    last_seq: int
    device: PushToken
    body: str | None = None  # the newest message's (truncated) body, only with include_body
    unread: int | None = None  # the user's unread messages in all channels (Matrix counts.unread)

    @property
    def id(self) -> str:
        """Stable per (device, channel, seq range): sent as ``X-Chatd-Delivery`` and in the payload, so
        a gateway can drop a retry of a request it did process (our timeout fired after it did)."""
        key = f"{self.device.token}\x00{self.channel_id}\x00{self.first_seq}\x00{self.last_seq}"
        return hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Outcome:
    kind: str
    reason: str = ""


def truncate(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[:max(0, max_chars - 1)] + "…"


def plan(entries: list[PushEntry], tokens: list[PushToken], marks: dict[str, int]) -> list[Notification]:
    """``entries``: one user's outbox rows of one channel, ascending seq. One notification per token
    that has anything above its mark (a token pushed up to seq N never gets seq <= N again)."""
    out = []
    for token in tokens:
        mark = marks.get(token.token, 0)
        pending = [e for e in entries if e.seq > mark]
        if not pending:
            continue
        last = pending[-1]
        out.append(Notification(user_id=last.user_id, channel_id=last.channel_id, sender_id=last.sender_id,
                                count=len(pending), first_seq=pending[0].seq, last_seq=last.seq, device=token,
                                body=last.body or None))
    return out


def backoff_s(attempt: int, base_s: float, cap_s: float, rand: Callable[[], float] = random.random) -> float:
    """Wait before retry number ``attempt`` (1, 2, ...): ``base * 2**(attempt-1)`` capped at ``cap``, with
    "equal jitter" (a uniformly random half of it) so gateways do not see synchronized retry waves."""
    d = min(cap_s, base_s * 2 ** min(attempt - 1, 60))
    return d / 2 + d / 2 * rand()


def sign(secret: str, body: bytes) -> str:
    """The ``X-Chatd-Signature`` value: ``sha256=<hex HMAC-SHA256 of the exact body bytes>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str) -> bool:
    """For receivers (and tests): constant-time check of a ``X-Chatd-Signature`` value."""
    return hmac.compare_digest(sign(secret, body), header or "")


def _dumps(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


# ---- webhook ---------------------------------------------------------------------------------------
def webhook_document(n: Notification, sent_at: float) -> dict:
    doc = {"id": n.id, "type": "message", "user_id": n.user_id,
           "device": {"device_id": n.device.device_id, "provider": n.device.provider, "token": n.device.token,
                      "app_id": n.device.app_id},
           "channel_id": n.channel_id, "sender_id": n.sender_id, "count": n.count,
           "first_seq": n.first_seq, "last_seq": n.last_seq, "sent_at": sent_at}
    if n.body is not None:
        doc["body"] = n.body
    return doc


def webhook_request(n: Notification, secret: str, sent_at: float) -> tuple[bytes, list[tuple[str, str]]]:
    body = _dumps(webhook_document(n, sent_at))
    return body, [("Content-Type", "application/json"), (SIGNATURE_HEADER, sign(secret, body)),
                  (DELIVERY_HEADER, n.id)]


def _rejected(body: bytes) -> list[str]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return []
    rejected = doc.get("rejected") if isinstance(doc, dict) else None
    return [t for t in rejected if isinstance(t, str)] if isinstance(rejected, list) else []


def _by_status(status: int) -> Outcome | None:
    if status >= 500 or status in (408, 429):
        return Outcome(RETRY, f"HTTP {status}")
    if not 200 <= status < 300:
        return Outcome(FAILED, f"HTTP {status}")
    return None


def _answer(status: int, body: bytes, token: str, rejected_reason: str) -> Outcome:
    """What both gateways share: the status decides, then a 2xx ``{"rejected": [...]}`` body."""
    bad = _by_status(status)
    if bad is not None:
        return bad
    if token in _rejected(body):
        return Outcome(REJECTED, rejected_reason)
    return Outcome(DELIVERED)


def webhook_outcome(status: int, body: bytes, token: str) -> Outcome:
    """410 Gone, or a 2xx answer ``{"rejected": [..token..]}``: the token is dead."""
    if status == 410:
        return Outcome(REJECTED, "HTTP 410")
    return _answer(status, body, token, "listed in 'rejected'")


# ---- Matrix Push Gateway API ---------------------------------------------------------------------
def matrix_notify_url(base: str) -> str:
    base = base.rstrip("/")
    return base if base.endswith(MATRIX_NOTIFY_PATH) else base + MATRIX_NOTIFY_PATH


def matrix_document(n: Notification, default_app_id: str) -> dict:
    """``POST /_matrix/push/v1/notify``: the channel is the room, the newest message the event;
    ``counts.unread`` is the user's unread count over all channels (the spec's meaning, the badge
    gateways show), at least the burst's count; one device per request (as Synapse sends them)."""
    unread = n.count if n.unread is None else max(n.unread, n.count)
    note = {"event_id": f"{n.channel_id}:{n.last_seq}", "room_id": n.channel_id, "type": "m.room.message",
            "sender": str(n.sender_id), "prio": "high", "counts": {"unread": unread},
            "devices": [{"app_id": n.device.app_id or default_app_id, "pushkey": n.device.token,
                         "pushkey_ts": int(n.device.created_at),
                         "data": {"provider": n.device.provider, "chatd_id": n.id, "first_seq": n.first_seq,
                                  "last_seq": n.last_seq}}]}
    if n.body is not None:
        note["content"] = {"msgtype": "m.text", "body": n.body}
    return {"notification": note}


def matrix_request(n: Notification, default_app_id: str) -> tuple[bytes, list[tuple[str, str]]]:
    return _dumps(matrix_document(n, default_app_id)), [("Content-Type", "application/json"),
                                                         (DELIVERY_HEADER, n.id)]


def matrix_outcome(status: int, body: bytes, token: str) -> Outcome:
    """The spec's answer is 200 ``{"rejected": [pushkeys]}``; a listed pushkey must not be used again."""
    return _answer(status, body, token, "pushkey listed in 'rejected'")
