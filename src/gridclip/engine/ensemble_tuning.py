"""Choose a trained model's frozen-CLIP ensemble weights on a held-out split (``gridclip tune-ensemble``).

The measured box ensemble (``clip_ensemble: dense``, box candidates, centerness outside; docs/training.md) has two
weights, ``ensemble_weight_novel`` for the names the model was not trained with boxes on and
``ensemble_weight_base`` for the others (``model.ensemble_trained_names``). Their best values move with the model
(the longer it trained, the lower), so they are chosen for the model at hand, on data the reported numbers never
see, by the rule the project's studies use (:data:`RULE`), plus a final gate: the ensemble stays off unless it
beats the model alone on the held-out names without boxes (an ensemble that adds nothing only costs time).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

W_NOVEL = (0.1, 0.2, 0.35, 0.5, 0.65, 0.8)
W_BASE = (0.0, 0.2, 0.35, 0.5)
FVLM_W_NOVEL, FVLM_W_BASE = 0.65, 0.35  # F-VLM's weights: ties go to the nearest
TIE = 0.005  # metrics are in [0, 1]: half an AP point
BOX_ENSEMBLE = {"clip_ensemble": "dense", "ensemble_upsample": 1.0, "ensemble_box_scale": 1.0,
                "ensemble_candidates": "box", "ensemble_centerness": "outside"}
OFF = {"clip_ensemble": "off"}
RULE = ("Step 1, ensemble_weight_base 0.35: ensemble_weight_novel by the held-out AP of the names not trained with "
        "boxes (skipped when the split has none with ground truth). Step 2, with step 1's choice: "
        "ensemble_weight_base by the held-out AP of the names trained with boxes. In each step, settings within 0.5 AP "
        "points of the best are tied and the weight nearest F-VLM's (0.65 novel, 0.35 base) wins. Gate: the chosen "
        "ensemble is kept only if its AP of the names without boxes is more than 0.5 points above the model alone's "
        "and its AP of all names is not more than 0.5 points below; else the ensemble is off. With no name without "
        "boxes in the split, the gate compares the AP of all names.")

Setting = dict[str, Any]
Scores = dict[str, float | None]


def group_ap(per_category_ap: Mapping[int, float], ids: Sequence[int]) -> float | None:
    """Mean per-category AP over ``ids`` that have ground truth (None: none has)."""
    values = [per_category_ap[i] for i in ids if i in per_category_ap and per_category_ap[i] >= 0]
    return sum(values) / len(values) if values else None


def pick(candidates: Sequence[tuple[Setting, Scores]], metric: str, weight: str, preferred: float,
         cost: Callable[[Setting], Any] = lambda s: 0) -> Setting:
    """The best setting by ``metric``: those within :data:`TIE` of the best are tied, the cheapest of them
    (``cost``) wins, then the one whose ``weight`` is nearest ``preferred``."""
    best = max(m[metric] for _, m in candidates)
    tied = [(s, m) for s, m in candidates if m[metric] >= best - TIE]
    return min(tied, key=lambda sm: (cost(sm[0]), abs(sm[0][weight] - preferred), -sm[1][metric]))[0]


def tune(evaluate: Callable[[Setting], Scores], *, trunk: str = "frozen", w_novel: Sequence[float] = W_NOVEL,
         w_base: Sequence[float] = W_BASE) -> dict[str, Any]:
    """Run :data:`RULE` with ``evaluate(setting) -> {"AP", "AP_novel", "AP_trained"}`` (held-out; a group without
    ground truth is None); ``trunk``: every setting's ``ensemble_trunk``. Returns the chosen setting (``OFF`` when the
    gate closes), step 1's and step 2's choices and every evaluation in order."""
    evaluations: list[dict[str, Any]] = []

    def run(s: Setting) -> Scores:
        scores = evaluate(s)
        evaluations.append({"setting": s, "scores": scores})
        return scores

    alone = run(OFF)
    if alone["AP_trained"] is None:
        raise ValueError("the held-out split has no ground truth for any name the model was trained with boxes on")
    base = {**BOX_ENSEMBLE, **({"ensemble_trunk": trunk} if trunk != "frozen" else {})}
    has_novel = alone["AP_novel"] is not None
    if has_novel:
        step1 = [(s, run(s)) for s in ({**base, "ensemble_weight_novel": float(w), "ensemble_weight_base": FVLM_W_BASE}
                                       for w in w_novel)]
        first = pick(step1, "AP_novel", "ensemble_weight_novel", FVLM_W_NOVEL)
        step2 = [(s, m) for s, m in step1 if s == first]
    else:
        first = {**base, "ensemble_weight_novel": FVLM_W_NOVEL, "ensemble_weight_base": FVLM_W_BASE}
        step2 = []
    for w in w_base:
        s = {**first, "ensemble_weight_base": float(w)}
        if s not in [c for c, _ in step2]:
            step2.append((s, run(s)))
    second = pick(step2, "AP_trained", "ensemble_weight_base", FVLM_W_BASE)
    scores = next(m for s, m in step2 if s == second)
    if has_novel:
        gain = scores["AP_novel"] - alone["AP_novel"] > TIE and scores["AP"] >= alone["AP"] - TIE
    else:
        gain = scores["AP"] - alone["AP"] > TIE
    return {"rule": RULE, "chosen": second if gain else OFF, "ensemble_kept": bool(gain), "step1_choice": first,
            "step2_choice": second, "model_alone": alone, "evaluations": evaluations}


def overrides(setting: Setting) -> list[str]:
    """``model.key=value`` arguments for `gridclip eval` / `detect --set` that apply ``setting``."""
    return [f"model.{k}={v:g}" if isinstance(v, float) else f"model.{k}={v}" for k, v in setting.items()]


def tune_model(model: torch.nn.Module, cfg: Any, *, trunk: str = "frozen", w_novel: Sequence[float] = W_NOVEL,
               w_base: Sequence[float] = W_BASE, batch_size: int | None = None, device: str | torch.device = "cpu",
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """:func:`tune` on a trained GridCLIP ``model`` and the held-out evaluation data of ``cfg`` (a
    :class:`~gridclip.config.Config`; ``cfg.eval.vocabulary`` respected): the names the model was trained with boxes
    on (``model.cfg.ensemble_trained_names``) against the others, one evaluation of the split per setting. The model
    is left with the chosen setting. Adds ``names_without_boxes`` and ``overrides`` (``model.*`` arguments)."""
    from gridclip.engine.evaluate import build_eval_dataset, evaluate_model

    trained = set(model.cfg.ensemble_trained_names)
    if not trained:
        raise ValueError("the model records no names trained with boxes (model.ensemble_trained_names); a model "
                         "trained by this version does")
    # the held-out categories under the names the model scores them by, whatever the data format
    dataset = build_eval_dataset(cfg.data)
    model.set_vocabulary(cfg.eval.vocabulary or dataset.category_names)
    names = dict(zip(dataset.category_ids, model.class_names))
    groups = {"AP_trained": [i for i, n in names.items() if n in trained],
              "AP_novel": [i for i, n in names.items() if n not in trained]}

    def evaluate(setting: Setting) -> Scores:
        model.set_clip_ensemble(**setting)
        model.optimize_for_inference()
        evaluation, _ = evaluate_model(model, cfg, batch_size=batch_size, device=device)
        scores = {"AP": float(evaluation.metrics["AP"]),
                  **{k: group_ap(evaluation.per_category_ap, ids) for k, ids in groups.items()}}
        if log is not None:
            shown = " ".join(f"{k} {100 * v:.1f}" if v is not None else f"{k} -" for k, v in scores.items())
            log(f"{' '.join(overrides(setting))}: {shown}")
        return scores

    report = tune(evaluate, trunk=trunk, w_novel=w_novel, w_base=w_base)
    model.set_clip_ensemble(**report["chosen"])
    model.optimize_for_inference()
    return {"names_without_boxes": sorted(names[i] for i in groups["AP_novel"]), **report,
            "overrides": overrides(report["chosen"])}
