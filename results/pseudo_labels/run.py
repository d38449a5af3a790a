"""PLAN.md's study: per seed and schedule, grid only's kept model (`runs/study_grid`) with the box ensemble labels the
novel names on world0's det_train images; a grid-only student trains on det_train + those pseudo-boxes; both are
evaluated on world0's val and paired by seed with grid only (ensemble off) and the teacher (box ensemble). From the
repository root: `python results/pseudo_labels/run.py [--jobs 2] [--doc docs/results.md]` (students in
runs/pseudo_labels/, skipped when their result.json is there; writes pseudo_counts.json and report.json here)."""
import argparse
import json
import shutil
from collections import Counter
from pathlib import Path

from gridclip.config import DEFAULT_PSEUDO_SCORE
from gridclip.engine.keep_vocab import PSEUDO_MAX_IOU
from gridclip.engine.pseudo_labels import select_pseudo_boxes, with_pseudo_boxes, write_names_file
from gridclip.utils.atomic import atomic_write_json
from gridclip.utils.threads import torch_threads
from gridclip_lab.study.ensemble_selection import (GRID_ONLY_BOX_SELECTIONS, base_trained_config, chosen_settings,
                                                   evaluate_kept_models, kept_runs)
from gridclip_lab.study.pseudo_labels import teacher_detections, train_student
from gridclip_lab.study.report_lines import (console_lines, difference_lines, evaluation_table, novel_goal_line,
                                            paired_comparisons)
from gridclip_lab.study.spec import StudySpec
from gridclip_lab.variants import run_side_by_side

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grid-runs", default="runs/study_grid/runs", help="grid only's kept models (the teachers)")
    parser.add_argument("--out", default="runs/pseudo_labels")
    parser.add_argument("--iters", default="400,1600")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--doc", help="also write the section pseudo-labels of this Markdown file")
    args = parser.parse_args()
    ITERS = tuple(int(i) for i in args.iters.split(","))
    SEEDS = tuple(int(s) for s in args.seeds.split(","))
    TEACHER_VARIANT, STUDENT_VARIANT = "grid only + ensemble", "grid only"
    world, out = Path("runs/world0"), Path(args.out)
    train = json.loads((world / "det_train.json").read_text())
    novel_ids = [c["id"] for c in train["categories"] if c["frequency"] == "r"]
    names = {c["id"]: c["name"] for c in train["categories"]}
    box = chosen_settings(GRID_ONLY_BOX_SELECTIONS)
    teachers = kept_runs(args.grid_runs)
    out.mkdir(parents=True, exist_ok=True)
    split = write_names_file(train, out / "all_names.txt")

    # 1. the teachers' pseudo-boxes (cached per teacher in its student's folder)
    counts_path = HERE / "pseudo_counts.json"
    counts = json.loads(counts_path.read_text()) if counts_path.is_file() else {}
    tasks, base_ids = [], None
    for iters in ITERS:
        for seed in SEEDS:
            folder = out / f"{iters}_s{seed}"
            pseudo_json = folder / "det_train_pseudo.json"
            if not pseudo_json.is_file():
                teacher = teachers[(TEACHER_VARIANT, seed, iters)]["dir"] / "model.pt"
                print(f"[pseudo] teacher {teacher} ({iters} iterations, seed {seed})", flush=True)
                with torch_threads(2):
                    dets = teacher_detections(teacher, box[iters], world / "det_train.json", world / "det_train" / "images")
                kept = select_pseudo_boxes(dets, train["annotations"], novel_ids, DEFAULT_PSEUDO_SCORE, PSEUDO_MAX_IOU)
                folder.mkdir(parents=True, exist_ok=True)
                atomic_write_json(pseudo_json, with_pseudo_boxes(train, kept), indent=None)
                by_name = Counter(names[d["category_id"]] for d in kept)
                counts[f"{iters}/{seed}"] = {"total": len(kept), "images": len({d["image_id"] for d in kept}),
                                             "per_name": {names[i]: by_name.get(names[i], 0) for i in novel_ids}}
                atomic_write_json(counts_path, counts)
            print(f"[pseudo] {iters}/{seed}: {counts[f'{iters}/{seed}']['total']} pseudo-boxes", flush=True)
            # 2. the student: grid only's study config on det_train + pseudo-boxes, every name trained
            spec = StudySpec(variants=(STUDENT_VARIANT,), seeds=(seed,), iters=(iters,), pairs=())
            cfg, base_ids = base_trained_config(spec, world, STUDENT_VARIANT, seed, iters)
            cfg.data.train_json, cfg.data.base_list = str(pseudo_json), str(split)
            cfg.out_dir = str(folder / "student")
            if not (folder / "student" / "result.json").is_file():
                tasks.append((cfg, base_ids))

    students: dict = {}

    def finished(k: int, result: dict) -> None:
        print(f"[pseudo] student {result['iters']}/{result['seed']}: " +
              " ".join(f"{m} {100 * v:.1f}" for m, v in result["metrics"].items()), flush=True)


    run_side_by_side(train_student, tasks, args.jobs, finished)
    for iters in ITERS:
        for seed in SEEDS:
            folder = out / f"{iters}_s{seed}"
            result = json.loads((folder / "student" / "result.json").read_text())
            students.setdefault(str(iters), {})[seed] = result
            # the record kept in git (runs/ is not): the student's config, result and per-name AP, and the pseudo-boxes
            kept = HERE / "runs" / f"{iters}_s{seed}"
            kept.mkdir(parents=True, exist_ok=True)
            for name in ("config.yaml", "result.json", "per_category_ap.json"):
                shutil.copyfile(folder / "student" / name, kept / name)
            added = json.loads((folder / "det_train_pseudo.json").read_text())["annotations"]
            atomic_write_json(kept / "pseudo_boxes.json", [a for a in added if "pseudo_score" in a])

    # 3. grid only (off) and the teacher (box ensemble) on the same val, paired by seed
    metrics = evaluate_kept_models(args.grid_runs, TEACHER_VARIANT, world, SEEDS,
                                   lambda iters: {"grid only, off": {"clip_ensemble": "off"}, "teacher (box ensemble)": box[iters]},
                                   Path(args.grid_runs).parent / "pseudo_report_cache.json", ITERS)
    STUDENT = "student on pseudo-boxes, off"
    for iters, by_seed in students.items():
        metrics[iters][STUDENT] = {}
        for seed, result in by_seed.items():
            m = dict(result["metrics"])
            per_category = json.loads((out / f"{iters}_s{seed}" / "student" / "per_category_ap.json").read_text())
            base = [per_category[str(i)] for i in base_ids if str(i) in per_category]
            m["APbase"] = sum(base) / len(base)
            metrics[iters][STUDENT][seed] = m
    pairs = paired_comparisons(metrics, ((STUDENT, "grid only, off"), (STUDENT, "teacher (box ensemble)"),
                                         ("teacher (box ensemble)", "grid only, off")))
    # diagnostic only (read by nothing above): the world is exhaustively labelled, so an image's novel names are the
    # ones its neg_category_ids leave out; a pseudo-box whose name is in its image, and the (image, novel name)
    # pairs of det_train that get at least one
    present = {(i["id"], c) for i in train["images"] for c in set(novel_ids) - set(i["neg_category_ids"])}
    for key in counts:
        iters, seed = key.split("/")
        added = json.loads((out / f"{iters}_s{seed}" / "det_train_pseudo.json").read_text())["annotations"]
        found = [(a["image_id"], a["category_id"]) for a in added if "pseudo_score" in a]
        counts[key]["name_in_image"] = sum(f in present for f in found)
        counts[key]["novel_pairs_found"] = len(set(found) & present)
        counts[key]["novel_pairs"] = len(present)
    atomic_write_json(counts_path, counts)
    cost = {iters: {"student_train_seconds": [students[iters][s]["train_seconds"] for s in SEEDS],
                    "student_images_per_second": [students[iters][s]["train_images_per_second"] for s in SEEDS]}
            for iters in students}
    report = {"teacher": {str(k): v for k, v in box.items() if k in ITERS}, "min_score": DEFAULT_PSEUDO_SCORE,
              "max_iou": PSEUDO_MAX_IOU, "pseudo_counts": counts, "metrics": metrics, "pairs": pairs, "cost": cost}
    atomic_write_json(HERE / "report.json", report)
    print("\n".join(console_lines(metrics, pairs)))
    goals = []
    for iters in ITERS:
        key = f"{iters}: {STUDENT} - grid only, off"
        goals.append(novel_goal_line(STUDENT, iters, pairs[f"{key}, APr"], pairs[f"{key}, AP"]))
    print("\n".join(goals))
    if args.doc:
        from gridclip_lab.utils.doc_sections import write_section

        found = ", ".join(f"{k}: {v['total']} boxes, {v['name_in_image']} with a novel name its image holds, "
                          f"{v['novel_pairs_found']} of its {v['novel_pairs']} novel objects' (image, name) pairs"
                          for k, v in sorted(counts.items(), key=lambda kv: (int(kv[0].split("/")[0]), kv[0])))
        lines = ["## Pseudo-boxes of the novel names on the training images (novel names known at training; issue 23)", "",
                 "*Generated by `python results/pseudo_labels/run.py --doc docs/results.md` (plan and rule: "
                 "`results/pseudo_labels/PLAN.md`).* **Another protocol** (VL-PLM's): training reads the base boxes and "
                 "the list of the 10 novel names, never a novel box, caption or val image. Teacher: grid only's kept "
                 "model of the seed and schedule with the box ensemble (weights chosen on world1's val). Its detections of "
                 f"the novel names on det_train's 1068 images scoring >= {DEFAULT_PSEUDO_SCORE} (`DEFAULT_PSEUDO_SCORE`) and "
                 f"overlapping no labelled box (IoU < {PSEUDO_MAX_IOU}) become boxes of those names; a grid-only student "
                 "(the study's config, same seed and schedule, from the CLIP start) trains on det_train + those boxes with "
                 "all 48 names, and is evaluated with the ensemble off: one model, 1.0x GridCLIP's inference; training is "
                 "the teacher's plus the student's iterations. Box AP x100 on world0's val, mean ± sd over seeds 0-2; "
                 "differences paired by seed, mean [95 % CI].", "",
                 f"Pseudo-boxes per schedule/seed ({found}; whether a name is in its image is read from the world's "
                 "exhaustive negative lists, for this line only).", "",
                 *evaluation_table(metrics, str), "", *difference_lines(pairs), "", *goals]
        write_section(args.doc, "pseudo-labels", "\n".join(lines))
        print(f"wrote section pseudo-labels of {args.doc}")

if __name__ == "__main__":  # spawned student workers import this file: nothing runs on import
    main()
