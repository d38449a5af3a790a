"""``gridclip export``: a model as an ONNX graph, or as a model folder to share on the Hugging Face Hub.

    gridclip export --checkpoint C [--vocab ...] --out model.onnx [--vocab-input] [--opset 17]
    gridclip export --checkpoint C --format hub --out FOLDER [--vocab ...] [--repo-id ORG/NAME]

``--format hub`` writes FOLDER/model.safetensors, config.json and README.md (:func:`gridclip.save_pretrained`);
``gridclip.load(FOLDER)`` loads it, and uploaded (``hf upload ORG/NAME FOLDER .``) ``gridclip.load("hf-hub:ORG/NAME")``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from gridclip.checkpoint import checkpoint_extra, load_checkpoint, save_pretrained
from gridclip.commands._vocabulary import add_vocabulary_args, given, set_vocabulary_from_args
from gridclip.export import export_onnx, sidecar_path
from gridclip.hub import CARD, CONFIG, WEIGHTS, local_model_path, parse_hub_name

FORMATS = ("onnx", "hub")


def _export_hub(args: argparse.Namespace) -> None:
    if args.vocab_input or args.opset is not None:
        raise ValueError(f"{'--vocab-input' if args.vocab_input else '--opset'}: ONNX only; --format hub writes "
                         "the model itself")
    if args.repo_id is not None:
        try:
            parse_hub_name(f"hf-hub:{args.repo_id}")
        except ValueError:
            raise ValueError(f"--repo-id {args.repo_id!r}: expected ORG/NAME") from None
    source = local_model_path(args.checkpoint)
    model = load_checkpoint(source)
    if given(args):
        set_vocabulary_from_args(model, args)
    out = save_pretrained(model, args.out, extra=checkpoint_extra(source), repo_id=args.repo_id)
    print(f"wrote {out / WEIGHTS}, {out / CONFIG} and {out / CARD}; gridclip.load({str(out)!r}) loads it; "
          f"to share it: hf upload {args.repo_id or 'ORG/NAME'} {out} . (then gridclip.load(\"hf-hub:"
          f"{args.repo_id or 'ORG/NAME'}\"))")


def _export_onnx(args: argparse.Namespace) -> None:
    if args.repo_id is not None:
        raise ValueError("--repo-id: goes with --format hub")
    opset = 17 if args.opset is None else args.opset
    if not 11 <= opset <= 20:
        raise ValueError(f"--opset: expected 11..20, got {opset}")
    out = Path(args.out)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out}: is a folder, expected an .onnx file path")
    model = load_checkpoint(args.checkpoint)
    if not (args.vocab_input and not given(args) and not model.class_names):  # else: fed at run time
        set_vocabulary_from_args(model, args)
    export_onnx(model, out, vocab_input=args.vocab_input, opset=opset)
    print(f"wrote {out} and {sidecar_path(out)}")


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="gridclip export", description="Export a GridCLIP model: its dense part to "
                                "ONNX, or the model as a folder to share on the Hugging Face Hub (--format hub).")
    p.add_argument("--checkpoint", "--model", dest="checkpoint", metavar="MODEL", required=True,
                   help="model file (.pt), model folder, or hf-hub:ORG/NAME[@REVISION]")
    add_vocabulary_args(p)
    p.add_argument("--format", choices=FORMATS, default="onnx",
                   help="onnx (default): a graph for ONNX Runtime; hub: a model folder (model.safetensors, "
                        "config.json, README.md) to upload to the Hugging Face Hub")
    p.add_argument("--out", required=True, help="onnx: output .onnx file (a .onnx.json sidecar is written beside "
                   "it); hub: output folder")
    p.add_argument("--vocab-input", action="store_true", help="onnx: vocabulary embeddings as a second graph input")
    p.add_argument("--opset", type=int, help="onnx: ONNX opset (default 17)")
    p.add_argument("--repo-id", metavar="ORG/NAME", help="hub: the repository the model card names")
    args = p.parse_args(list(argv))
    if args.format == "hub":
        _export_hub(args)
    else:
        _export_onnx(args)
    return 0
