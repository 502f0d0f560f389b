"""The chat shard: WebSocket sessions (``session``), the local connection registry (``hub``),
channel ownership and sequencing (``owner``), membership checks (``membership``) and the router
that decides where a frame goes (``router``)."""
