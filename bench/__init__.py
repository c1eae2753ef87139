"""Benchmarks (not tests): each module prints one JSON object with its figures and the raw
baseline measured in the same run. `make bench` runs them all."""
