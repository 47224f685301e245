"""Overhead and memory benchmarks (not tests): ``python -m benchmarks.<name>`` from the repository root."""
