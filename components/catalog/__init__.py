"""The searchable catalogue: a living index of database images (stable ids, atomic generations), the model identity
that keeps descriptor spaces apart, and the searcher that answers image queries with both."""
