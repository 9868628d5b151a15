"""Probing against human norms (`jaxprobe run`): experiment, analyses, report."""
