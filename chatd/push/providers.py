"""Push gateways, chosen by ``push.provider``: each turns a :class:`~chatd.push.payload.Notification`
into one HTTP POST and the answer into an :class:`~chatd.push.payload.Outcome`. A provider never
raises for a gateway problem: transport failures are ``retry`` outcomes. An HTTP provider owns a
pooled :class:`~chatd.push.http.GatewayClient` unless given a ``post`` function; ``aclose`` closes it."""

from __future__ import annotations

import logging
import time
from typing import Awaitable, Callable, Protocol

from ..config import PushConfig
from . import http, payload
from .payload import RETRY, Notification, Outcome

log = logging.getLogger(__name__)

PostFn = Callable[[str, bytes, list, float], Awaitable[http.HTTPResponse]]


class Provider(Protocol):
    name: str

    async def send(self, n: Notification) -> Outcome: ...


class _HTTPProvider:
    name = ""

    def __init__(self, url: str, timeout_s: float, post: PostFn | None = None):
        http.split_url(url)  # refuse a bad URL at start-up, not at the first push
        self.url = url
        self.timeout_s = timeout_s
        self._client = http.GatewayClient() if post is None else None
        self._post = post or self._client.post

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def request(self, n: Notification) -> tuple[bytes, list[tuple[str, str]]]:
        raise NotImplementedError

    def outcome(self, status: int, body: bytes, token: str) -> Outcome:
        raise NotImplementedError

    async def send(self, n: Notification) -> Outcome:
        body, headers = self.request(n)
        try:
            resp = await self._post(self.url, body, headers, self.timeout_s)
        except http.TransportError as e:
            return Outcome(RETRY, str(e))
        return self.outcome(resp.status, resp.body, n.device.token)


class WebhookProvider(_HTTPProvider):
    """POST the chatd JSON document, signed: ``X-Chatd-Signature: sha256=<HMAC-SHA256(secret, body)>``."""
    name = "webhook"

    def __init__(self, url: str, secret: str, timeout_s: float, post: PostFn | None = None,
                 clock: Callable[[], float] = time.time):
        super().__init__(url, timeout_s, post)
        self.secret = secret
        self._clock = clock

    def request(self, n):
        return payload.webhook_request(n, self.secret, round(self._clock(), 3))

    def outcome(self, status, body, token):
        return payload.webhook_outcome(status, body, token)


class MatrixProvider(_HTTPProvider):
    """The Matrix Push Gateway API (``POST /_matrix/push/v1/notify``), e.g. Sygnal in front of APNs/FCM."""
    name = "matrix"
    needs_unread_total = True  # counts.unread: the service reads the user's total before sending

    def __init__(self, gateway_url: str, default_app_id: str, timeout_s: float, post: PostFn | None = None):
        super().__init__(payload.matrix_notify_url(gateway_url), timeout_s, post)
        self.default_app_id = default_app_id

    def request(self, n):
        return payload.matrix_request(n, self.default_app_id)

    def outcome(self, status, body, token):
        return payload.matrix_outcome(status, body, token)


def make_provider(cfg: PushConfig) -> Provider | None:
    """The configured provider; None for ``provider = "none"``."""
    if cfg.provider == "webhook":
        return WebhookProvider(cfg.webhook_url, cfg.webhook_secret, cfg.request_timeout_s)
    if cfg.provider == "matrix":
        return MatrixProvider(cfg.matrix_gateway_url, cfg.matrix_app_id, cfg.request_timeout_s)
    return None
