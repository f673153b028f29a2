"""Embedding, faiss indexes and search-time post-processing."""
