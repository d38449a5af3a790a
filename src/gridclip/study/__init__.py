"""Ablation studies on the embedded shape world: variants x seeds x schedule lengths, cached runs,
seed statistics (``gridclip study``)."""
from gridclip.study.aggregate import aggregate, format_study
from gridclip.study.runner import evaluate_run, plan_runs, run_study
from gridclip.study.spec import METRICS, VARIANTS, StudySpec, run_config, run_key
from gridclip.study.stats import paired_differences, summarize, t_quantile

__all__ = ["METRICS", "VARIANTS", "StudySpec", "aggregate", "evaluate_run", "format_study", "paired_differences",
           "plan_runs", "run_config", "run_key", "run_study", "summarize", "t_quantile"]
