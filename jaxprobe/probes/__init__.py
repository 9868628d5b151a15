"""Probes: closed-form ridge and optax linear probes, fitted for many feature sets at once.

Public surface: `RidgeCV` and `BandedRidgeCV` (scikit-learn conventions), `probe_sweep` (tidy table
for thousands of feature sets), `variance_partition` (unique and shared variance of two feature
spaces, per pair and target), `cross_validate_ridge` / `cross_validate_banded` / `cross_validate`
(the batched engine), fold plans, metrics and statistics.

`RidgeCV`, `BandedRidgeCV` and `LogisticProbe` live in `estimators`, which loads scikit-learn (about a second):
they are imported on first use, so that `probe_sweep` and the CLI do not pay for it.
"""

from jaxprobe.probes.alignment import Alignment, align_by_concept
from jaxprobe.probes.banded import cross_validate_banded, kernel_weights
from jaxprobe.probes.crossval import CVResult, cross_validate, cross_validate_ridge
from jaxprobe.probes.folds import FoldPlan, nested_plan
from jaxprobe.probes.linear import ProbeConfig
from jaxprobe.probes.partition import variance_partition
from jaxprobe.probes.sweep import aggregate, probe_sweep, run_probe_files

__all__ = [
    "Alignment", "BandedRidgeCV", "CVResult", "FoldPlan", "LogisticProbe", "ProbeConfig", "RidgeCV",
    "aggregate", "align_by_concept", "cross_validate", "cross_validate_banded", "cross_validate_ridge",
    "kernel_weights", "nested_plan", "probe_sweep", "run_probe_files", "variance_partition",
]


def __getattr__(name: str):
    if name in ("BandedRidgeCV", "LogisticProbe", "RidgeCV"):
        from jaxprobe.probes import estimators

        return getattr(estimators, name)
    raise AttributeError(f"module 'jaxprobe.probes' has no attribute {name!r}")
