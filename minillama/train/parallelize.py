"""Everything applied to the model from outside: activation checkpointing, torch.compile, data parallelism.

The model file knows none of this (torchtitan's separation). Under `torchrun` the environment names the rank and
world size; each rank reads its own slice of every batch (the data loader's job) and DDP averages gradients.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from minillama.errors import MinillamaError
from minillama.runtime import compile_problem, warn


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> DistributedContext:
        """Single process unless started by torchrun (WORLD_SIZE > 1), which sets RANK and LOCAL_RANK."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        import torch.distributed as torch_dist

        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        if not torch_dist.is_initialized():
            torch_dist.init_process_group(backend=backend)
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, device=device)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return value
        import torch.distributed as torch_dist

        value = value.clone()
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.AVG)
        return value

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as torch_dist

            torch_dist.barrier()

    def no_sync_unless(self, model: nn.Module, last: bool):
        """Skip DDP's gradient all-reduce on every micro-batch but the last of an accumulation."""
        if self.world_size > 1 and not last and hasattr(model, "no_sync"):
            return model.no_sync()
        return contextlib.nullcontext()


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of storing them (Chen et al. 2016).

    The block's own forward is wrapped in place, so parameter names (and so checkpoints) do not change and the
    block's hooks still fire around it."""
    for block in model.layers:
        if not isinstance(block.forward, functools.partial):
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block in place, and the head (final norm, output projection, loss).

    Per block, as torchtitan does: the blocks share one compiled graph (their parameters are its inputs), which
    compiles in seconds where a graph of the whole model takes minutes, and the block stays the module that
    hooks (activation checkpointing, FSDP2) wrap. Compiling the head fuses the projection with the fp32 loss."""
    for block in model.layers:
        block.compile()
    model.head_loss = torch.compile(model.head_loss)


def parallelize(model: nn.Module, dist: DistributedContext, compile: bool = False,
                activation_checkpointing: str = "none") -> nn.Module:
    """Apply activation checkpointing, compilation and data parallelism to `model` from outside; returns the
    module to call for training (DDP's wrapper, or `model` itself). `model` stays the Transformer to save: the
    wrappers change no parameter name."""
    if activation_checkpointing not in ("none", "full"):
        raise MinillamaError(f"activation_checkpointing must be 'none' or 'full', got {activation_checkpointing!r}")
    if activation_checkpointing == "full":
        apply_activation_checkpointing(model)
    if compile:
        device_type = next(model.parameters()).device.type
        problem = compile_problem(device_type)
        if problem is None:
            apply_compile(model)
        else:  # a first run must work without a compiler: slower, not dead
            warn(f"torch.compile cannot run here, training without it (train.compile = false): {problem}. "
                 "Install a C++ compiler (g++, or set $CXX) to compile on CPU.")
    if dist.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
