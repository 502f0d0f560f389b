"""History pages, the same on the WebSocket (``history``) and over HTTP (``GET .../messages``).

``more`` is exact: it is true only when a message exists beyond the page in the paging direction
(above the page for ``after`` pages, below it otherwise), found by reading one message more than
the page holds. A page that ends at the channel's first (or last) message says ``more: false``.
"""

from __future__ import annotations


async def read_page(store, channel_id: str, after: int | None, before: int | None, limit: int):
    """``(messages ascending by seq, more)``; see :meth:`chatd.store.base.Store.read_messages` for
    the window ``after``/``before`` select."""
    msgs = await store.read_messages(channel_id, after=after, before=before, limit=limit + 1)
    more = len(msgs) > limit
    if more:
        msgs = msgs[:limit] if after is not None else msgs[1:]
    return msgs, more
