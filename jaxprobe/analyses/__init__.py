"""Analyses of the probe results: where attributes are decodable, which groups stand out, how entangled they are.

    profile = decoding.decoding_profile(table)                    # per feature set, mean over targets
    group_table = groups.group_decoding(table)                    # each group against the average
    similarity = disentanglement.correlation_similarity(predictions, Y, feature_sets)
    summary, C = disentanglement.confusability(predictions, Y, feature_sets)

`summary.ExperimentResults` gathers one run for `jaxprobe.report`; `summary.summarize` puts its
numbers into words.
"""

from jaxprobe.analyses.decoding import decoding_profile, stage_of
from jaxprobe.analyses.disentanglement import confusability, correlation_matrices, correlation_similarity
from jaxprobe.analyses.groups import group_decoding
from jaxprobe.analyses.summary import ExperimentResults, summarize

__all__ = [
    "ExperimentResults", "confusability", "correlation_matrices", "correlation_similarity", "decoding_profile",
    "group_decoding", "stage_of", "summarize",
]
