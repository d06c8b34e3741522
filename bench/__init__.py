"""Benchmarks and GPU checks that drive the kernels or the whole model (python -m bench.<module>)."""
