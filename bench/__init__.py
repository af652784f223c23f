"""Benchmarks: `python -m bench.engine`, `python -m bench.batch`, ... from the repository root (see README)."""
