"""The search service: an HTTP API and its HTML page over a `Searcher` (components.app.http), served by uvicorn or
as a Ray Serve deployment (components.app.ray_serve)."""
