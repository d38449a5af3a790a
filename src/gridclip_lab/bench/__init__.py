"""Benchmarks for gridclip. Entry point: ``gridclip-lab bench`` (``gridclip_lab.commands.bench``).

Every number is reported as a ratio against baselines run in the same process, on the same input,
interleaved round by round, because the machines these run on are shared and noisy.
"""
