"""The HTTP API: ``app`` builds the quart-trio application, ``server`` runs it on hypercorn."""
