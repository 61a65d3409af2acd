"""Benchmarks: each script runs from a checkout, on the engine `pip install -e .` installed."""
