"""``gridclip export --checkpoint C [--vocab ...] --out model.onnx [--vocab-input] [--opset 17]``."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from gridclip.checkpoint import load_checkpoint
from gridclip.commands._vocabulary import add_vocabulary_args, given, set_vocabulary_from_args
from gridclip.export import export_onnx, sidecar_path


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="gridclip export", description="Export GridCLIP's dense part to ONNX.")
    p.add_argument("--checkpoint", required=True, help="GridCLIP checkpoint (.pt)")
    add_vocabulary_args(p)
    p.add_argument("--out", required=True, help="output .onnx file (a .onnx.json sidecar is written beside it)")
    p.add_argument("--vocab-input", action="store_true", help="vocabulary embeddings as a second graph input")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    args = p.parse_args(list(argv))
    if not 11 <= args.opset <= 20:
        raise ValueError(f"--opset: expected 11..20, got {args.opset}")
    out = Path(args.out)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out}: is a folder, expected an .onnx file path")
    model = load_checkpoint(args.checkpoint)
    if not (args.vocab_input and not given(args) and not model.class_names):  # else: fed at run time
        set_vocabulary_from_args(model, args)
    export_onnx(model, out, vocab_input=args.vocab_input, opset=args.opset)
    print(f"wrote {out} and {sidecar_path(out)}")
    return 0
