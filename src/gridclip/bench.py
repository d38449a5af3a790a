"""``gridclip bench``: speed and memory benchmarks against baselines (issue 7).

The benchmarks live in the repository's ``benchmarks/`` folder (scripts, not part of the installed
package); this entry point finds that folder (next to ``src/`` in a source checkout, or in the current
directory) and runs ``benchmarks/run.py``'s ``main``. ``gridclip bench --help`` lists the options.
"""
from __future__ import annotations

import sys
from pathlib import Path


def _repo_root() -> Path:
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / "benchmarks" / "run.py").is_file():
            return root
    raise FileNotFoundError("benchmarks/run.py not found next to the gridclip sources nor in the current "
                            "directory: `gridclip bench` runs from a source checkout of gridclip")


def cli(argv: list[str]) -> int:
    root = str(_repo_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.run import main

    return main(argv)
