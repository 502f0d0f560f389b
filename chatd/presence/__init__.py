"""Presence: who is online. ``tracker`` is the pure state machine (the clock is passed in),
``service`` runs it in trio and publishes changes; in ``chatd run`` the service is in-process, in a
cluster it runs in ``chatd presence`` servers and shards reach it over links (``remote``)."""
