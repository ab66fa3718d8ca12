"""Benchmarks of the task queue; the results and how to run them are in docs/benchmarks.md."""
