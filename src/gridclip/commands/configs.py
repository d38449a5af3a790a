"""``gridclip configs``: the named configs shipped in the package, one line each.

Any command's ``--config NAME`` reads ``gridclip/configs/NAME.yaml`` (a path to a file works too);
``--path`` prints each config's file, e.g. to copy one and edit it (or start a file with
``_base_: NAME`` and change a few keys).
"""
from __future__ import annotations

import argparse

from gridclip.config import config_summary, packaged_configs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gridclip configs", description=__doc__.split("\n\n")[0])
    p.add_argument("--path", action="store_true", help="print each config's file instead of its description")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    named = packaged_configs()
    width = max(map(len, named), default=0)
    for name, path in named.items():
        print(f"{name:<{width}}  {path if args.path else config_summary(path)}")
    return 0
