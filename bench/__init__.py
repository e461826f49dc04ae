"""Benchmarks for synthguard: `python bench/run.py [--quick]`. They print tables; they are not tests."""
