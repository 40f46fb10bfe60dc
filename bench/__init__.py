"""Benchmarks (scripts run as ``python bench/NAME.py``) and, in bench/harness/, the real servers
and processes that both the tests and the benchmarks start."""
