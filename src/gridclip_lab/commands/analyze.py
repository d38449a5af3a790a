"""``gridclip-lab analyze <frequency|clip-recall|clip-ceiling|transfer|results|study-section|finetune-recipes> ...``: the paper's analyses as tools.

    gridclip-lab analyze frequency --gt GT.json --results A.json [B.json ...] [--labels A B] [--train TRAIN.json]
                               --out plot.png [--csv table.csv] [--size W H]
    gridclip-lab analyze clip-recall --gt GT.json [--images DIR] --clip MODEL[:PRETRAINED] [...] [--k 10 100 300]
                                 [--out DIR] [--batch-size B] [--max-images N]
    gridclip-lab analyze clip-ceiling --world DIR [DIR ...] --out ceiling.json [--clip C] [--max-images N]
    gridclip-lab analyze clip-ceiling --report-from ceiling.json --study S.json --doc docs/results.md
    gridclip-lab analyze transfer --checkpoint C --world DIR [--seed S] [--num-images N] [--out DIR]
    gridclip-lab analyze results --demo runs/demo --out docs/results.md [--figures docs/figures] [--no-transfer] [--study S.json] [--finetune F.json]
    gridclip-lab analyze study-section --study S.json --section NAME --title T [--out docs/results.md] [--clip-recall R.json]
    gridclip-lab analyze finetune-recipes --finetune A.json [B.json ...] --labels A [B ...] [--out docs/results.md]
                                      [--figures docs/figures] [--section NAME] [--title T]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Sequence

from gridclip_lab.analysis.finetune_recipes import RECIPES_SECTION, TITLE, recipe_section
from gridclip_lab.analysis.frequency import default_labels, run_frequency, summarize
from gridclip_lab.analysis.recall import clip_recall, detector_recall, format_recall_table, write_recall_outputs
from gridclip_lab.analysis.results_doc import write_results_doc
from gridclip_lab.analysis.study_doc import render_study_sections
from gridclip_lab.analysis.transfer import TRANSFER_NMS, evaluate_transfer, make_transfer_world
from gridclip.engine.evaluate import format_table
from gridclip.utils.atomic import atomic_write_json
from gridclip_lab.utils.doc_sections import write_section

SUBCOMMANDS = ("frequency", "clip-recall", "clip-ceiling", "transfer", "results", "study-section", "finetune-recipes")


def _size(values: Sequence[int]) -> tuple[int, int]:
    w, h = (int(v) for v in values)
    if w < 50 or h < 50 or w > 10000 or h > 10000:
        raise ValueError(f"--size: expected width and height in pixels between 50 and 10000, got {w} {h}")
    return w, h


def _frequency(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gridclip-lab analyze frequency",
                                description="per-category AP vs training image count (paper Fig. 3) + CSV table")
    p.add_argument("--gt", required=True, help="ground-truth LVIS/COCO JSON (categories with 'frequency'; 'image_count' unless --train)")
    p.add_argument("--results", required=True, nargs="+", help="COCO-format detections, one file per run")
    p.add_argument("--labels", nargs="+", help="one label per results file (default: file names)")
    p.add_argument("--train", help="training JSON whose annotations give the image count per category")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--csv", help="per-category table (default: --out with .csv)")
    p.add_argument("--size", nargs=2, type=int, default=(900, 500), metavar=("W", "H"), help="PNG size in pixels")
    p.add_argument("--style", choices=("lvis", "coco"), help="default: lvis if categories carry 'frequency'")
    a = p.parse_args(argv)
    rows = run_frequency(a.gt, a.results, a.out, labels=a.labels, train=a.train, csv_path=a.csv,
                         size=_size(a.size), style=a.style)
    labels = a.labels or default_labels(a.results)
    print(summarize(rows, labels))
    print(f"wrote {a.out} and {a.csv or Path(a.out).with_suffix('.csv')} ({len(rows)} categories)")
    return 0


def _clip_recall(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gridclip-lab analyze clip-recall",
                                description="fraction of an image's GT categories in CLIP's top k (paper Fig. 4)")
    p.add_argument("--gt", required=True, help="ground-truth COCO/LVIS JSON")
    p.add_argument("--images", help="image folder (default: the JSON's folder)")
    p.add_argument("--clip", nargs="+", default=[], metavar="MODEL[:PRETRAINED]",
                   help="open_clip model[:tag or checkpoint], or a local open_clip directory")
    p.add_argument("--detector", nargs="+", default=[], metavar="MODEL.pt",
                   help="trained GridCLIP files: the recall of their own z-bar (what detection training kept)")
    p.add_argument("--k", nargs="+", type=int, default=[10, 100, 300])
    p.add_argument("--out", default="clip_recall", help="output folder for recall.json / recall.csv / recall.png")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-images", type=int, help="only the first N images with ground truth")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=2, help="image decoding processes")
    p.add_argument("--size", nargs=2, type=int, default=(800, 450), metavar=("W", "H"), help="PNG size in pixels")
    a = p.parse_args(argv)
    if a.batch_size < 1:
        raise ValueError(f"--batch-size: expected a positive integer, got {a.batch_size}")
    if not a.clip and not a.detector:
        raise ValueError("clip-recall: give --clip MODEL ... and / or --detector MODEL.pt ...")
    results = clip_recall(a.gt, a.images, a.clip, a.k, batch_size=a.batch_size, max_images=a.max_images,
                          device=a.device, num_workers=max(0, a.workers)) if a.clip else []
    results += detector_recall(a.gt, a.images, a.detector, a.k, batch_size=a.batch_size, max_images=a.max_images)
    print(f"{results[0].num_images} images, {results[0].num_categories} categories")
    print(format_recall_table(results))
    paths = write_recall_outputs(results, a.out, size=_size(a.size))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _clip_ceiling(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gridclip-lab analyze clip-ceiling",
                                description="box AP of the ensemble's frozen CLIP on a world's val ground-truth boxes "
                                            "(each box scored once per name): what keeping CLIP's knowledge can add")
    p.add_argument("--world", nargs="+", default=[], help="world folders (`gridclip-lab make-world`)")
    p.add_argument("--out", help="the JSON written (a list: one report per world)")
    p.add_argument("--clip", help="the frozen CLIP (default: the world's shipped RN CLIP)")
    p.add_argument("--max-images", type=int, help="only the first N val images")
    p.add_argument("--report-from", help="a JSON of this command: render it instead of measuring")
    p.add_argument("--study", help="with --report-from: a study.json whose grid only AP_r is the reference")
    p.add_argument("--doc", help="with --report-from: the Markdown file whose section clip-ceiling is written")
    a = p.parse_args(argv)
    from gridclip_lab.analysis.clip_ceiling import ceiling_section, clip_ceiling, format_ceiling_table

    if a.report_from:
        reports = json.loads(Path(a.report_from).read_text())
        study = json.loads(Path(a.study).read_text()) if a.study else None
        if a.doc:
            write_section(a.doc, "clip-ceiling", ceiling_section(reports, study))
            print(f"wrote section clip-ceiling of {a.doc}")
        else:
            print(format_ceiling_table(reports))
        return 0
    if not a.world or not a.out:
        raise ValueError("clip-ceiling: give --world DIR ... and --out FILE.json (or --report-from FILE.json)")
    if a.max_images is not None and a.max_images < 1:
        raise ValueError(f"--max-images: expected a positive integer, got {a.max_images}")
    reports = [clip_ceiling(w, clip=a.clip, max_images=a.max_images) for w in a.world]
    atomic_write_json(a.out, reports)
    print(format_ceiling_table(reports))
    print(f"wrote {a.out}")
    return 0


def _transfer(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gridclip-lab analyze transfer",
                                description="evaluate a checkpoint on the shape-word transfer world (Table 3 analogue)")
    p.add_argument("--checkpoint", help="GridCLIP checkpoint (omit to only generate the world)")
    p.add_argument("--world", required=True, help="transfer world folder (generated if missing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--nms", type=float, default=TRANSFER_NMS, help="NMS IoU threshold (paper: 0.6)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="folder for metrics.json")
    a = p.parse_args(argv)
    gt = make_transfer_world(a.world, seed=a.seed, num_images=a.num_images)
    print(f"transfer world: {gt}")
    if not a.checkpoint:
        return 0
    report = evaluate_transfer(a.checkpoint, a.world, nms_thresh=a.nms, batch_size=a.batch_size, device=a.device,
                               progress=True)
    print(f"coco bbox on {report['num_images']} images, vocabulary {report['categories']}, NMS {a.nms}")
    print(format_table(report["metrics"]))
    if a.out:
        atomic_write_json(Path(a.out) / "metrics.json", {**report, "checkpoint": str(a.checkpoint)})
        print(f"wrote {Path(a.out) / 'metrics.json'}")
    return 0


def _results(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gridclip-lab analyze results",
                                description="docs/results.md: the paper's tables, commands and embedded-world numbers")
    p.add_argument("--demo", default="runs/demo", help="a `gridclip-lab demo` output folder (metrics.json)")
    p.add_argument("--out", default="runs/results.md", help="the document written (the repository's: docs/results.md)")
    p.add_argument("--figures", help="folder for Fig. 3 / Fig. 4 PNGs (default: OUT's folder/figures)")
    p.add_argument("--no-figures", action="store_true", help="tables only")
    p.add_argument("--no-transfer", action="store_true",
                   help="do not run the demo model on the transfer world (a cached result is still used)")
    p.add_argument("--study", help="a `gridclip-lab study` study.json: the seeded Tables 4-5, 1x1 vs 3x3, forgetting curve")
    p.add_argument("--finetune", help="a `gridclip-lab finetune-study` finetune.json: the fine-tuning table")
    a = p.parse_args(argv)
    for flag, path in (("--study", a.study), ("--finetune", a.finetune)):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file")
    figures = None if a.no_figures else Path(a.figures) if a.figures else Path(a.out).parent / "figures"
    written = write_results_doc(a.demo, a.out, figures_dir=figures, transfer=not a.no_transfer, study=a.study,
                                finetune=a.finetune)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _study_section(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gridclip-lab analyze study-section",
                                description="the seeded tables of one study.json as a marked section of a Markdown file "
                                            "(the rest of the file is left as it is; no demo run needed)")
    p.add_argument("--study", required=True, help="a `gridclip-lab study` study.json")
    p.add_argument("--section", required=True, help="section name: the text between <!-- NAME:start/end --> is replaced")
    p.add_argument("--title", required=True, help="the section's heading")
    p.add_argument("--out", default="runs/results.md", help="the document written (the repository's: docs/results.md)")
    p.add_argument("--finetune", help="a `gridclip-lab finetune-study` finetune.json")
    p.add_argument("--clip-recall", help="a recall.json of `gridclip-lab analyze clip-recall` whose first model is the "
                                         "student CLIP: the forgetting curve's starting row")
    a = p.parse_args(argv)
    for flag, path in (("--study", a.study), ("--finetune", a.finetune), ("--clip-recall", a.clip_recall)):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file")
    start = None
    if a.clip_recall:
        recall = json.loads(Path(a.clip_recall).read_text())
        start = recall[0]["recall"] if recall else None
    lines = render_study_sections(a.study, a.finetune, None, a.out, start)
    lines[0] = f"## {a.title}"
    write_section(a.out, a.section, "\n".join(lines))
    print(f"wrote section {a.section} of {a.out}")
    return 0


def _finetune_recipes(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gridclip-lab analyze finetune-recipes",
                                description="the fine-tuning recipes of one `gridclip-lab finetune-study` per custom set "
                                            "side by side (table, paired differences, alpha-curve figure) as the marked "
                                            "section finetune-recipes of a Markdown file")
    p.add_argument("--finetune", required=True, nargs="+", help="finetune.json files, one per custom set")
    p.add_argument("--labels", required=True, nargs="+", help="one label per file (e.g. red circle)")
    p.add_argument("--out", default="runs/results.md", help="the document written (the repository's: docs/results.md)")
    p.add_argument("--figures", help="folder for the figure (default: none drawn)")
    p.add_argument("--section", default=RECIPES_SECTION,
                   help=f"the marked section written, also the figure's name (default: {RECIPES_SECTION})")
    p.add_argument("--title", default=TITLE, help="the section's heading")
    a = p.parse_args(argv)
    if len(a.labels) != len(a.finetune):
        raise ValueError(f"--labels: expected one per --finetune file ({len(a.finetune)}), got {len(a.labels)}")
    for path in a.finetune:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--finetune {path}: no such file")
    out = Path(a.out)
    rel = lambda f: os.path.relpath(f, out.parent).replace(os.sep, "/")  # noqa: E731
    lines = recipe_section(list(zip(a.labels, a.finetune)), a.figures, rel, a.title, a.section)
    write_section(out, a.section, "\n".join(lines))
    print(f"wrote section {a.section} of {out}")
    return 0


def main(argv: Sequence[str]) -> int:
    """``gridclip-lab analyze <subcommand>``."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    handlers = {"frequency": _frequency, "clip-recall": _clip_recall, "clip-ceiling": _clip_ceiling, "transfer": _transfer, "results": _results,
                "study-section": _study_section, "finetune-recipes": _finetune_recipes}
    if name not in handlers:
        raise ValueError(f"unknown analysis '{name}' (expected one of: {', '.join(SUBCOMMANDS)})")
    return handlers[name](rest)
