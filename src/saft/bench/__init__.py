"""Benchmarks that measure methods against baselines in the same run."""
