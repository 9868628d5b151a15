"""Revelio: linear and conv classifiers on diffusion features of real images (`jaxprobe classify`)."""
