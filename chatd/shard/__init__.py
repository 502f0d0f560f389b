"""The chat shard: WebSocket sessions (``session``: one method per client verb; ``outbox``: what is
written to a connection, its delivery cursors and gap fill; ``wsconn``: the WebSocket connection;
``server``: the listener; ``flusher`` and ``timers``: the tasks all sessions share), the local
connection registry (``hub``), channel ownership and sequencing (``owner``), the fan-out of
committed messages and events to members' devices (``fanout``) and the router that sends a
``send`` to its channel's owner (``router``)."""
