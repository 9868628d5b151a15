"""Disk -> parameters: diffusers and transformers folders, the local Hugging Face cache, weight-key
conversion, tokenizers, and random-weight builds ("tiny", "sd15-random")."""
