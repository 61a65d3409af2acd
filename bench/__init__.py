"""Benchmarks: each script runs from a checkout, installed or not."""
