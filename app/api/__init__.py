"""The HTTP layer: app factory, routes, middleware, schemas, errors, and the serving pipeline
(decode pool, dynamic batcher, metrics) behind the routes."""
