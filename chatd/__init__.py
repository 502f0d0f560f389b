"""chatd: a trio-based, single-binary, sharded chat server.

Layers, from the wire inwards:

* ``chatd.protocol``  sans-I/O codecs (client frames; no trio import)
* ``chatd.shard``     WebSocket sessions, channel owners, local routing
* ``chatd.api``       the HTTP API (quart-trio on hypercorn)
* ``chatd.discovery`` which shard serves whom (in-process for ``chatd run``)
* ``chatd.store``     one async store interface and its backends
* ``chatd.node``      the nursery tree of a role (``serve_run``)
"""

__version__ = "0.1.0"
