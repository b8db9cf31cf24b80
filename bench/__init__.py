"""Benchmarks (run as scripts; see docs/benchmarks.md), their helpers, and tests of that tooling (bench/test_*.py).

Benchmarks import product packages and bench/ only, never tests/ (tests/test_packaging.py checks it).
"""
