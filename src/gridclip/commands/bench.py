"""``gridclip bench``: speed and memory benchmarks (see :mod:`gridclip.bench`)."""
from __future__ import annotations

from typing import Sequence

from gridclip.bench import cli


def main(argv: Sequence[str]) -> int:
    return cli(list(argv))
