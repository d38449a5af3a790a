"""``gridclip serve --checkpoint C [--port 7860] [--host 127.0.0.1] [--vocab ...] [--device cpu]``: web demo."""
from __future__ import annotations

import argparse
import os
from typing import Sequence

from gridclip.checkpoint import load_checkpoint
from gridclip.clip.vocabulary import parse_vocabulary
from gridclip.engine.predict import resolve_device
from gridclip.serve import build_demo
from gridclip.utils.extras import require


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="gridclip serve", description="Web demo (Gradio) for a checkpoint.")
    p.add_argument("--checkpoint", "--model", dest="checkpoint", metavar="MODEL", required=True,
                   help="model file (.pt), model folder, or hf-hub:ORG/NAME[@REVISION]")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--vocab", help="initial vocabulary (default: the checkpoint's)")
    p.add_argument("--score", type=float, default=0.3, help="initial score threshold (default 0.3)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    args = p.parse_args(list(argv))
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port: expected 1..65535, got {args.port}")
    if not 0.0 <= args.score <= 1.0:
        raise ValueError(f"--score: expected a number in [0, 1], got {args.score}")
    device = resolve_device(args.device)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    require("gradio", "serve", "gridclip serve")
    model = load_checkpoint(args.checkpoint, device=device).optimize_for_inference()
    if args.vocab:
        model.set_vocabulary(parse_vocabulary(args.vocab))
    build_demo(model, args.vocab or "", args.score).launch(server_name=args.host, server_port=args.port)
    return 0
