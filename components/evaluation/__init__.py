"""Retrieval metrics, the query protocol, validation inside a job, and figures."""
