"""History pages, the same on the WebSocket (``history``) and over HTTP (``GET .../messages``):
read by :func:`read_page`, kept within the answer's byte budget by :func:`within_budget`.

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


def within_budget(msgs: list, ascending: bool, budget: int) -> tuple[list, bool]:
    """The messages of a page that fit ``budget`` bytes of answer (a body counted at 4 bytes a
    character, the most UTF-8 needs, its attachments' JSON, plus 200 for the rest of its object), dropped from the far end
    (the newest of an ``after`` page, the oldest otherwise); at least one. True if any was dropped."""
    kept: list = []
    for msg in (msgs if ascending else reversed(msgs)):
        budget -= len(msg.body) * 4 + len(msg.attachments) + 200
        if budget < 0 and kept:
            break
        kept.append(msg)
    if not ascending:
        kept.reverse()
    return kept, len(kept) < len(msgs)
