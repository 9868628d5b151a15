"""Flax models that mirror the PyTorch module trees of transformers' CLIP and diffusers' SD."""
