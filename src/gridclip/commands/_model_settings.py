"""``model.*`` settings a command may change on a trained model: the frozen-CLIP ensemble's
(:data:`gridclip.model.gridclip.ENSEMBLE_KEYS`); everything else is what training made."""
from __future__ import annotations

from torch import nn

from gridclip.model.gridclip import ENSEMBLE_KEYS


def set_model_settings(model: nn.Module, settings: dict) -> None:
    """Apply ``{key: value}`` (the ``model`` section of parsed ``key=value`` overrides) to ``model``."""
    if not settings:
        return
    fixed = sorted(set(settings) - set(ENSEMBLE_KEYS)) if hasattr(model, "set_clip_ensemble") else sorted(settings)
    if fixed:
        raise ValueError(f"model.{fixed[0]}: fixed by the trained model; only the frozen-CLIP ensemble's settings of "
                         f"a GridCLIP model change after training ({', '.join('model.' + k for k in ENSEMBLE_KEYS)})")
    model.set_clip_ensemble(**settings)
