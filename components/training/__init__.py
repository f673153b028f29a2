"""Training jobs, the epoch loop, samplers and the per-worker loops."""
