"""Inference: sampling and KV-cache generation."""

from minillama.infer.generate import generate, generate_ids, sample_checkpoint
from minillama.infer.sampling import sample_next

__all__ = ["generate", "generate_ids", "sample_checkpoint", "sample_next"]
