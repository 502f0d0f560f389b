"""Push notifications for members with no connected device (docs/push.md).

``service.PushService`` (outbox writer, slot leases, sender), ``providers`` (webhook, Matrix Push
Gateway), ``payload`` (the wire formats and answers, pure), ``http`` (the pooled httpx client)."""

from __future__ import annotations

from ..config import Config
from .providers import MatrixProvider, WebhookProvider, make_provider
from .service import PushService

__all__ = ["PushService", "WebhookProvider", "MatrixProvider", "make_provider", "make_push_service"]


def make_push_service(config: Config, store, shards=None, online=None) -> PushService | None:
    """The configured service of a chat process, or None with ``push.provider = "none"``."""
    provider = make_provider(config.push)
    if provider is None:
        return None
    return PushService(store, config.push, config.server.shard_id, provider, shards=shards, online=online)
