"""``gridclip info [--config F] [key=value ...]``: architecture summary and inference parameter count."""
from __future__ import annotations

import argparse
from typing import Sequence

from gridclip.config import load_config
from gridclip.model import build_model
from gridclip.model.summary import summarize


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="gridclip info", description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--config", help="YAML config (default: the paper's RN50 settings)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args(list(argv))
    cfg = load_config(a.config, a.overrides)
    # Parameter shapes do not depend on the weights: build without loading (no download needed).
    model = build_model(cfg.model, load_clip_weights=False)
    print("\n".join(summarize(model)))
    return 0
