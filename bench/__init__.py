"""Benchmarks (run as scripts: `python bench/NAME.py`) and the naive references the tests and
benchmarks compare the job's fast paths against (bench/reference.py)."""
