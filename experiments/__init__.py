"""Resumable sweeps and their reports: ``python -m experiments.sweep``, ``python -m experiments.plot``, ...

Run from the repository root; the sweeps start the examples as
``python -m examples.<name>``.
"""
