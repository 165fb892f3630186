"""Benchmark plumbing shared by `python -m kw_ops bench` and the scripts in benchmarks/."""
