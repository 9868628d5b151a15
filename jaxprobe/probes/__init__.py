"""Probes: closed-form ridge and optax linear probes, fitted for many feature sets at once.

Public surface: `RidgeCV` (scikit-learn conventions), `probe_sweep` (tidy table for thousands of
feature sets), `cross_validate_ridge` / `cross_validate` (the batched engine), fold plans, metrics
and statistics.
"""

from jaxprobe.probes.alignment import Alignment, align_by_concept
from jaxprobe.probes.crossval import CVResult, cross_validate, cross_validate_ridge
from jaxprobe.probes.estimators import LogisticProbe, RidgeCV
from jaxprobe.probes.folds import FoldPlan, nested_plan
from jaxprobe.probes.linear import ProbeConfig
from jaxprobe.probes.sweep import aggregate, probe_sweep, run_probe_files

__all__ = [
    "Alignment", "CVResult", "FoldPlan", "LogisticProbe", "ProbeConfig", "RidgeCV", "cross_validate",
    "aggregate", "align_by_concept", "cross_validate_ridge", "nested_plan", "probe_sweep", "run_probe_files",
]
