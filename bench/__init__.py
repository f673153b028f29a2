"""Firesight's benchmark suite: speed and memory of each part against the bare library doing the same work.

Run it with `python -m bench` (`--quick` for the short version, `--help` for the sections); see BENCHMARKS.md.
"""
