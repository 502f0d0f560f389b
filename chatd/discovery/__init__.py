"""Which shard serves whom. ``local`` is the in-process discovery of ``chatd run``; ``zk`` the
ZooKeeper-backed discovery of cluster mode; both have the face of
:class:`~chatd.discovery.base.Discovery`. ``view`` and ``hashing`` are pure data."""
