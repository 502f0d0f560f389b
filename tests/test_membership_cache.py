"""The membership cache's bounds (chatd/membership.py): channels, and member entries in all -- groups
of 1,000 must not let 100,000 cached channels grow to gigabytes. A store stand-in answers members
(the cache's logic is what is tested; the store contract suite tests the stores)."""

from __future__ import annotations

from chatd.membership import Membership


class Groups:
    def __init__(self, sizes: dict[str, int]):
        self.sizes = sizes
        self.reads = 0

    async def members(self, channel_id):
        self.reads += 1
        return list(range(1, self.sizes[channel_id] + 1))

    async def get_channel(self, channel_id):
        return object()


def gid(i: int) -> str:
    return f"g:{i:016x}"


async def test_cache_bounded_by_member_entries():
    store = Groups({gid(i): 1000 for i in range(10)})
    cache = Membership(store, max_cached=100, max_cached_members=3500)
    for i in range(10):
        assert len(await cache.members(gid(i))) == 1000
    assert cache.statistics() == {"channels": 3, "members": 3000}  # the three most recent
    assert [cache.cached(gid(i)) is not None for i in range(10)] == [False] * 7 + [True] * 3
    reads = store.reads
    await cache.members(gid(9))
    assert store.reads == reads  # still cached: no store read
    cache.invalidate(gid(9))
    assert cache.statistics() == {"channels": 2, "members": 2000}


async def test_cache_bounded_by_channels_and_zero_caches_nothing():
    store = Groups({gid(i): 2 for i in range(5)})
    cache = Membership(store, max_cached=2)
    for i in range(5):
        await cache.members(gid(i))
    assert cache.statistics() == {"channels": 2, "members": 4}
    none = Membership(store, max_cached=0)
    await none.members(gid(0))
    assert none.statistics() == {"channels": 0, "members": 0}
