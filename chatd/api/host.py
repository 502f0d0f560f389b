"""What the HTTP API uses of the node that serves it (``Node`` of ``chatd run`` and ``chatd
shard``, ``ApiNode`` of ``chatd api``), as typing protocols: the route modules touch nothing
else, so a new use shows here first.

A node may also carry ``push`` (a push service, absent on the API role): the push-token routes
tell it when a user's tokens changed, if there is one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Protocol

from ..config import Config
from ..discovery.base import Discovery  # the API reads view, writable, live() and pick_shard()
from ..membership import Membership
from ..metrics import Metrics
from ..store.base import Store

if TYPE_CHECKING:
    from ..media.service import MediaService


class Presence(Protocol):
    async def statuses(self, user_ids: list[int]) -> dict[int, dict]: ...

    def logout(self, user_id: int, device: str) -> None: ...


class ApiHost(Protocol):
    config: Config
    store: Store
    secret: str
    metrics: Metrics
    membership: Membership
    presence: Presence
    discovery: Discovery
    media: "MediaService"

    def connection_count(self) -> int: ...

    def membership_changed(self, channel_id: str) -> None: ...

    def notify_members(self, event: dict, user_ids: Iterable[int]) -> None: ...

    def device_logged_out(self, user_id: int, device_id: str, token_key: str, except_session=None,
                          before: float = 0.0) -> None: ...

    def tokens_revoked_before(self, user_id: int, device_id: str | None, before: float) -> None: ...
