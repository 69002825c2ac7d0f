"""Serving benchmarks: the real service vs a naive baseline vs the bare model (see README.md)."""
