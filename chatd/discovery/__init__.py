"""Which shard serves whom. ``local`` is the in-process discovery of ``chatd run``; the
ZooKeeper-backed discovery of cluster mode implements the same :class:`Discovery` face."""
