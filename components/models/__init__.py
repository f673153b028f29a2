"""Backbones, poolings, whitening, RetrievalNet and its checkpoints, NetSpec."""
