"""Probes: closed-form ridge and optax linear probes, fitted for many feature sets at once.

Public surface: `RidgeCV` (scikit-learn conventions), `probe_sweep` (tidy table for thousands of
feature sets), `cross_validate_ridge` / `cross_validate` (the batched engine), fold plans, metrics
and statistics.

`RidgeCV` and `LogisticProbe` live in `estimators`, which loads scikit-learn (about a second):
they are imported on first use, so that `probe_sweep` and the CLI do not pay for it.
"""

from jaxprobe.probes.alignment import Alignment, align_by_concept
from jaxprobe.probes.crossval import CVResult, cross_validate, cross_validate_ridge
from jaxprobe.probes.folds import FoldPlan, nested_plan
from jaxprobe.probes.linear import ProbeConfig
from jaxprobe.probes.sweep import aggregate, probe_sweep, run_probe_files

__all__ = [
    "Alignment", "CVResult", "FoldPlan", "LogisticProbe", "ProbeConfig", "RidgeCV", "cross_validate",
    "aggregate", "align_by_concept", "cross_validate_ridge", "nested_plan", "probe_sweep", "run_probe_files",
]


def __getattr__(name: str):
    if name in ("LogisticProbe", "RidgeCV"):
        from jaxprobe.probes import estimators

        return getattr(estimators, name)
    raise AttributeError(f"module 'jaxprobe.probes' has no attribute {name!r}")
