"""The chat shard: WebSocket sessions (``session``), the local connection registry (``hub``),
channel ownership and sequencing (``owner``), the fan-out of committed messages and events to
members' devices (``fanout``) and the router that sends a ``send`` to its channel's owner
(``router``)."""
