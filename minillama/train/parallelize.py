"""Everything applied to the model from outside: activation checkpointing, torch.compile, data parallelism.

The model file knows none of this (torchtitan's separation). Under `torchrun` the environment names the rank and
world size; each rank reads its own slice of every batch (the data loader's job), and either
- "ddp": every rank holds the whole model and DDP averages gradients (all-reduce); right for models whose
  weights, gradients and AdamW state (16 bytes a parameter) fit on one device, or
- "fsdp": FSDP2 (`fully_shard`, ZeRO-3) shards weights, gradients and optimizer state over the ranks, gathers
  one transformer block's weights at a time for its forward and backward, and reduce-scatters its gradients.

Order, as in torchtitan's parallelize: activation checkpointing, then compile, per block, then `fully_shard` per
block and at the root (the embedding, final norm and output projection: with tied embeddings one matrix), all on
the meta device; then the sharded model is materialised and filled from one seeded full initialisation
(`load_full_state`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from minillama.errors import MinillamaError
from minillama.plan.memory import CHECKPOINTING
from minillama.runtime import compile_problem, resolve_device, warn
from minillama.train.config import PARALLEL


@dataclass
class DistributedContext:
    """This process's place in the job, and the few collectives the trainer uses. They reduce with SUM only:
    ReduceOp.AVG began as NCCL's (gloo rejects it in older PyTorch releases; 2.13's accepts it), and a sum is
    what every backend reduces alike."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: str = "auto") -> DistributedContext:
        """A single process on `device` (train.device) unless started by torchrun (WORLD_SIZE > 1), which sets
        RANK and LOCAL_RANK: then rank r runs on cuda:LOCAL_RANK with NCCL when `device` resolves to CUDA, else on
        the CPU with gloo, and the process group is initialised from torchrun's rendezvous (env://)."""
        wanted = resolve_device(device)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls(device=wanted)
        import torch.distributed as torch_dist

        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if wanted.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise MinillamaError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} CUDA "
                                     "devices; start at most that many processes per node (--nproc-per-node)")
            wanted = torch.device("cuda", local_rank)
            torch.cuda.set_device(wanted)
        if not torch_dist.is_initialized():
            if wanted.type == "cuda":  # device_id: NCCL connects now, not at the first collective
                torch_dist.init_process_group(backend="nccl", device_id=wanted)
            else:
                torch_dist.init_process_group(backend="gloo")
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, device=wanted)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of `value` over all ranks (a copy; `value` is left alone)."""
        if self.world_size == 1:
            return value
        import torch.distributed as torch_dist

        value = value.clone()
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM)
        return value

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over ranks: SUM, then divide."""
        return value if self.world_size == 1 else self.sum(value) / self.world_size

    def count(self, flag: bool) -> int:
        """How many ranks pass `flag` true: ranks agree on a stop request (any) or a finished save (all)."""
        if self.world_size == 1:
            return int(flag)
        return int(self.sum(torch.tensor([int(flag)], device=self.device)).item())

    def broadcast_int(self, value: int) -> int:
        """Rank 0's `value` on every rank (decisions made from one rank's clock, such as a time budget's)."""
        if self.world_size == 1:
            return value
        import torch.distributed as torch_dist

        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        torch_dist.broadcast(tensor, src=0)
        return int(tensor.item())

    def broadcast_text(self, text: str | None) -> str:
        """Rank 0's `text` on every rank (the name of a temporary directory rank 0 created)."""
        if self.world_size == 1:
            return text or ""
        import torch.distributed as torch_dist

        data = torch.tensor(list((text or "").encode()), dtype=torch.uint8, device=self.device)
        length = self.broadcast_int(data.numel() if self.is_main else 0)
        buffer = data if self.is_main else torch.empty(length, dtype=torch.uint8, device=self.device)
        torch_dist.broadcast(buffer, src=0)
        return bytes(buffer.cpu().tolist()).decode()

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as torch_dist

            torch_dist.barrier()

    def close(self) -> None:
        """Tear the process group down at the end of a run (PyTorch warns about one left open).

        The pause first: gloo's worker thread drops a finished collective's work object after the caller has
        returned from it, and dropping it releases tensors, which takes the GIL. If the group is destroyed before
        that (here, or when the DDP model that holds it is freed), its destructor joins that thread while holding
        the GIL, and the process hangs at exit (seen under load with torch 2.13: the join in ~ProcessGroupGloo
        against the GIL wait in ~AsyncBarrierWork). Sleeping releases the GIL, so the thread finishes first."""
        if self.world_size > 1:
            import torch.distributed as torch_dist

            if torch_dist.is_initialized():
                time.sleep(0.2)
                torch_dist.destroy_process_group()

    def no_sync_unless(self, model: nn.Module, last: bool):
        """Skip DDP's gradient all-reduce on every micro-batch but the last of an accumulation. FSDP has no
        such switch here on purpose: skipping its reduce-scatter would keep whole unsharded gradients, the
        memory FSDP exists to save, so it reduces every micro-batch."""
        if self.world_size > 1 and not last and hasattr(model, "no_sync"):
            return model.no_sync()
        return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------------------
# Activation checkpointing
# --------------------------------------------------------------------------------------------------------------
_aten = torch.ops.aten
# What "selective" keeps: the outputs of matmuls and of fused attention (with its log-sum-exp), the expensive ops;
# norms, RoPE, SiLU, the gating product, casts and the blocked kernel's softmax are recomputed in backward.
# torchtitan's op-level selective AC (torchtitan/models/llama3/infra/parallelize.py, `_save_list`) keeps the same
# families. plan/memory.py `layer_activation_bytes(..., "selective")` counts what this keeps (tests/test_plan.py).
SAVED_BY_SELECTIVE = {
    _aten.mm, _aten.addmm, _aten.bmm,
    _aten._scaled_dot_product_flash_attention, _aten._scaled_dot_product_efficient_attention,
    _aten._scaled_dot_product_cudnn_attention, _aten._scaled_dot_product_flash_attention_for_cpu,
}


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op.overloadpacket in SAVED_BY_SELECTIVE else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: nn.Module, mode: str = "full") -> None:
    """Recompute each block's activations in the backward pass instead of storing them (Chen et al. 2016):
    "full" keeps only the block's input and recomputes the whole block; "selective" also keeps the outputs of
    its matmuls and attention (torch.utils.checkpoint with a selective policy, Korthikanti et al. 2022 in
    spirit: recompute what is cheap and large, keep what is costly).

    The block's own forward is wrapped in place, so parameter names (and so checkpoints) do not change and the
    block's hooks (FSDP's all-gather) still fire around it."""
    if mode not in ("selective", "full"):
        raise MinillamaError(f"activation_checkpointing must be one of {', '.join(CHECKPOINTING)}, "
                             f"got {mode!r}")
    options = {"use_reentrant": False}
    if mode == "selective":
        options["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
    for block in model.layers:
        if not isinstance(block.forward, functools.partial):
            block.forward = functools.partial(checkpoint, block.forward, **options)


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block in place, and the head (final norm, output projection, loss).

    Per block, as torchtitan does: the blocks share one compiled graph (their parameters are its inputs), which
    compiles in seconds where a graph of the whole model takes minutes, and the block stays the module that
    hooks (activation checkpointing, FSDP2) wrap. Compiling the head fuses the projection with the fp32 loss."""
    for block in model.layers:
        block.compile()
    model.head_loss = torch.compile(model.head_loss)


# --------------------------------------------------------------------------------------------------------------
# FSDP2
# --------------------------------------------------------------------------------------------------------------
def apply_fsdp(model: nn.Module, dtype: str) -> None:
    """fully_shard each block, then the root, in place. bf16: weights gathered and computed in bf16, gradients
    reduce-scattered in fp32 (sums of many bf16 gradients lose low bits), fp32 master weights and AdamW state
    sharded; fp32: everything in fp32. The last block is not resharded after its forward: its backward comes
    next and would gather it again at once (torchtitan does the same)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == "bf16" \
        else MixedPrecisionPolicy()
    for index, block in enumerate(model.layers):
        fully_shard(block, mp_policy=policy, reshard_after_forward=index < len(model.layers) - 1)
    fully_shard(model, mp_policy=policy)


@torch.no_grad()
def load_full_state(model: nn.Module, full_state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Materialise a model sharded on the meta device and fill it from a full state dict that only rank 0 holds
    (on its CPU; other ranks pass {}): each tensor is broadcast from rank 0 and every rank keeps its shard.

    This is how the sharded run starts from exactly the weights a single-process run with the same seed has:
    random init on the shards themselves (DTensor's RNG) draws other numbers. Rank 0 holds the whole fp32 model
    in CPU memory meanwhile (4 bytes a parameter: 5 GB for 1b, 32 GB for llama3-8b)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    model.reset_buffers()  # RoPE frequencies: derived from the config, never in a state dict


# --------------------------------------------------------------------------------------------------------------
# All of it
# --------------------------------------------------------------------------------------------------------------
def parallelize(model: nn.Module, dist: DistributedContext, compile: bool = False,
                activation_checkpointing: str = "none", parallel: str = "ddp", dtype: str = "bf16") -> nn.Module:
    """Apply activation checkpointing, compilation and data parallelism to `model` from outside; returns the
    module to call for training (DDP's wrapper, or `model` itself, sharded in place under FSDP). `model` stays
    the Transformer to save: the wrappers change no parameter name.

    With parallel = "fsdp" and more than one rank, `model` must be on the meta device; materialise it afterwards
    with `load_full_state`. With one rank `parallel` changes nothing."""
    if activation_checkpointing not in CHECKPOINTING:
        raise MinillamaError(f"activation_checkpointing must be one of {', '.join(CHECKPOINTING)}, "
                             f"got {activation_checkpointing!r}")
    if parallel not in PARALLEL:
        raise MinillamaError(f"parallel must be one of {', '.join(PARALLEL)}, got {parallel!r}")
    if activation_checkpointing != "none":
        apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        problem = compile_problem(dist.device.type)
        if problem is None:
            apply_compile(model)
        else:  # a first run must work without a compiler: slower, not dead
            warn(f"torch.compile cannot run here, training without it (train.compile = false): {problem}. "
                 "Install a C++ compiler (g++, or set $CXX) to compile on CPU.")
    if dist.world_size == 1:
        return model
    if parallel == "fsdp":
        apply_fsdp(model, dtype)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
