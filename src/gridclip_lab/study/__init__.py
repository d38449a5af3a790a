"""Ablation studies on the embedded shape world: variants x seeds x schedule lengths, cached runs,
seed statistics (``gridclip-lab study``). The variants and the way one is trained are
:mod:`gridclip_lab.variants`."""
from gridclip_lab.study.aggregate import aggregate, format_study
from gridclip_lab.study.runner import plan_runs, run_study
from gridclip_lab.study.spec import StudySpec, run_config, run_key
from gridclip_lab.study.stats import paired_differences, summarize, t_quantile
from gridclip_lab.variants import METRICS, VARIANTS

__all__ = ["METRICS", "VARIANTS", "StudySpec", "aggregate", "format_study", "paired_differences",
           "plan_runs", "run_config", "run_key", "run_study", "summarize", "t_quantile"]
