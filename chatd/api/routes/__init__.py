"""The HTTP API's routes, one module per resource; each has ``register(app, node)``, which adds its
routes to the app (:func:`chatd.api.app.create_app` calls them in turn)."""
