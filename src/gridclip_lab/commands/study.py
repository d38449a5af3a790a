"""``gridclip-lab study``: the paper's ablations on the embedded world, variants x seeds x schedule lengths.

Every run is cached in OUT/runs/<config hash>/; a killed study started again with the same arguments
resumes. OUT/study.json holds per-run metrics, per-variant mean / std / 95 % CI and paired differences.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from gridclip.utils.files import read_json
from gridclip_lab.demo import DEFAULT_ITERS
from gridclip_lab.study import VARIANTS, StudySpec, format_study, run_study
from gridclip_lab.study.aggregate import seed_spread
from gridclip_lab.variants import variant_list
from gridclip.utils.atomic import atomic_write_json


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise ValueError(f"--{what}: expected a comma list of integers, got {text!r}") from None


def _pairs(texts: list[str]) -> list[tuple[str, str]]:
    out = []
    for t in texts:
        a, sep, b = t.partition(" - ")
        if not sep:
            raise ValueError(f"--pair: expected 'VARIANT A - VARIANT B' (spaces around '-'), got {t!r}")
        out.append((a.strip(), b.strip()))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gridclip-lab study", description=" ".join(__doc__.split("\n\n")[0].split()),
                                epilog="variants: " + ", ".join(VARIANTS))
    p.add_argument("--out", default="runs/study", help="study folder (runs cached in OUT/runs/, OUT/study.json)")
    p.add_argument("--spec", help="JSON file with StudySpec fields (variants, seeds, iters, pairs, ...); "
                                  "the flags below override it")
    p.add_argument("--variants", help=f"comma list (default: GridCLIP,grid only)")
    p.add_argument("--seeds", help="comma list of training seeds (default: 0,1,2)")
    p.add_argument("--iters", help="comma list of schedule lengths in iterations (default: 400)")
    p.add_argument("--pair", action="append", default=None,
                   help="paired difference 'A - B' (repeatable; default: 'GridCLIP - grid only')")
    p.add_argument("--metrics", help="comma list of AP, AP50, APr, APc, APf (default: AP,APr,APc,APf)")
    p.add_argument("--world", help="an existing world folder (default: generate one into OUT/world)")
    p.add_argument("--world-size", choices=("small", "default"), help="size of the generated world")
    p.add_argument("--clip", help="CLIP backbone dir (default: the shipped shapes-RN-tiny)")
    p.add_argument("--teacher", help="teacher CLIP dir (default: the shipped shapes-ViT-tiny)")
    p.add_argument("--keep-models", action="store_true", help="keep every run's model.pt")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained side by side, one process and one torch thread each (numbers do not depend on it)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write OUT/study.json from the runs already finished")
    p.add_argument("--write-demo-spread", metavar="FILE",
                   help="also write the seed spread at the demo's schedule (for gridclip_lab/configs/demo_seed_spread.json)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    return p


def spec_from_args(a: argparse.Namespace) -> StudySpec:
    values: dict = {}
    if a.spec:
        path = Path(a.spec)
        values = read_json(path, "study spec file")
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a JSON object of StudySpec fields")
    if a.variants:
        values["variants"] = variant_list(a.variants)
    if a.seeds:
        values["seeds"] = _ints(a.seeds, "seeds")
    if a.iters:
        values["iters"] = _ints(a.iters, "iters")
    if a.variants or a.seeds or a.iters:
        values.pop("subsets", None)  # the flags define a plain grid: every variant x seed x length
    if a.variants and "pairs" in values:  # a spec's pairs that the flags' variants leave out are dropped
        values["pairs"] = [p for p in values["pairs"] if all(v in values["variants"] for v in p)]
    if a.pair is not None:
        values["pairs"] = _pairs(a.pair)
    if a.metrics:
        values["metrics"] = _csv(a.metrics)
    if a.world_size:
        values["world_size"] = a.world_size
    if a.clip:
        values["clip_model"] = a.clip
    if a.teacher:
        values["teacher_model"] = a.teacher
    if a.overrides:
        values["overrides"] = list(values.get("overrides", [])) + list(a.overrides)
    if "pairs" not in values and "variants" in values:  # default pair only where both variants run
        values["pairs"] = [p for p in StudySpec.pairs if all(v in values["variants"] for v in p)]
    return StudySpec.from_dict(values, where=a.spec or "gridclip-lab study")


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    spec = spec_from_args(a)
    study = run_study(spec, a.out, world_dir=a.world, progress=not a.no_progress, keep_models=a.keep_models,
                      train_missing=not a.report_only, jobs=a.jobs)
    print(format_study(study))
    if a.write_demo_spread:
        atomic_write_json(a.write_demo_spread, seed_spread(study, DEFAULT_ITERS))
        print(f"[study] seed spread at {DEFAULT_ITERS} iterations -> {a.write_demo_spread}")
    print(f"[study] {study['runs_done']}/{study['runs_total']} runs, {study['seconds_of_runs']:.0f} s of runs -> "
          f"{Path(a.out) / 'study.json'}")
    return 0
