"""Benchmarks of `tracer watch` (not tests: nothing here asserts a time).

Run as root with `.venv/bin/python -m tests.bench.run`; see README.md.
"""
