"""AdamW with decay on matrices only, and the warmup + cosine learning-rate schedule (LLaMA 1 §2.2)."""

from __future__ import annotations

import math

import torch
from torch import nn

from minillama.train.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """Weight decay applies to matrices (linear and embedding weights) and not to vectors (RMSNorm gains):
    decaying a gain towards zero only fights the normalisation. The fused kernel runs on CPU and CUDA."""
    matrices = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [dict(params=matrices, weight_decay=cfg.weight_decay), dict(params=vectors, weight_decay=0.0)]
    device_type = next(model.parameters()).device.type
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=device_type in ("cpu", "cuda"))


def learning_rate(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup from 0 to lr over warmup_steps, then cosine decay to min_lr_ratio * lr at max_steps.
    `step` counts optimizer updates from 0, so the first update uses lr / warmup_steps."""
    warmup = min(cfg.warmup_steps, max_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
