"""Benchmarks for gridclip (issue 7). Entry point: ``python benchmarks/run.py`` or ``gridclip bench``.

Every number is reported as a ratio against baselines run in the same process, on the same input,
interleaved round by round, because the machines these run on are shared and noisy.
"""
