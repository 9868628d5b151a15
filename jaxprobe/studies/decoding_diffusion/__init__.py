"""Decoding Diffusion: directions in h-space from prompts and captions (`jaxprobe directions`)."""
