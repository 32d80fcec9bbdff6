"""Benchmarks: pyworker against its peers, side by side in one run. Not part of `make test`."""
