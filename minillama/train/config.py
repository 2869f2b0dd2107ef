"""A training run as one TOML file: `[model]`, `[tokenizer]`, `[data]`, `[optim]`, `[train]` tables.

    minillama train --config configs/shakespeare.toml --set train.max_steps=200 --set optim.lr=1e-3

Every table maps onto a dataclass below; an unknown key or a wrong type fails naming the key in full
(`optim.lrr`, `train.max_steps`). Defaults are the LLaMA recipe (LLaMA 1 paper §2.2, Table 2) scaled to a CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minillama.config import ModelConfig, apply_overrides, build_dataclass, model_config_from_table, read_toml
from minillama.data.sources import DataConfig, data_config_from_paths, data_config_from_table
from minillama.errors import MinillamaError
from minillama.kernels import ATTENTION_KERNELS
from minillama.plan.memory import CHECKPOINTING

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
PARALLEL = ("ddp", "fsdp")  # train.parallel (train/parallelize.py)


@dataclass
class TokenizerSpec:
    """Either an existing tokenizer (`path`: a directory or file `load_tokenizer` reads) or a BPE of
    `vocab_size` trained on the run's own training sources, cached by content."""

    path: str | None = None
    vocab_size: int | None = None  # None: the model's vocab_size


@dataclass
class OptimConfig:
    """AdamW with LLaMA's settings: beta (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices only, gradient
    clipping at 1.0, linear warmup then cosine decay to 10% of the peak rate (LLaMA 1 §2.2)."""

    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        # What torch.optim.AdamW rejects with a ValueError (a traceback) and what the schedule cannot use, named by
        # key. lr = 0 is allowed: a run that must not learn (a baseline, a test that the loss then stays put).
        checks = [("lr", self.lr >= 0, ">= 0"), ("beta1", 0 <= self.beta1 < 1, "in [0, 1)"),
                  ("beta2", 0 <= self.beta2 < 1, "in [0, 1)"), ("eps", self.eps > 0, "positive"),
                  ("weight_decay", self.weight_decay >= 0, ">= 0"), ("grad_clip", self.grad_clip > 0, "positive"),
                  ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
                  ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]")]
        for name, ok, expected in checks:
            if not ok:
                raise MinillamaError(f"optim.{name} must be {expected}, got {getattr(self, name)}")


@dataclass
class TrainConfig:
    max_steps: int = 1000
    # > 0: fit the run to this many seconds of wall clock (from the start of `train`, data preparation
    # included); the step count is estimated from measured step times from early in warmup on and re-estimated
    # after every step (train/trainer.py, TimeBudget); max_steps is the upper bound.
    time_budget_s: float = 0.0
    seq_len: int = 256
    # The batch in tokens per optimizer step (LLaMA: 4M). It becomes batch_tokens / seq_len sequences, split
    # into micro-batches x gradient-accumulation steps; micro_batch_size = 0 picks the largest that fits.
    batch_tokens: int = 16384
    micro_batch_size: int = 0
    # "bf16": autocast with fp32 master weights; "fp32": everything in fp32; "auto": bf16 where its matmuls are
    # native (CUDA with bf16, a CPU with AVX512-BF16 or AMX), fp32 elsewhere (runtime.native_bf16)
    dtype: str = "auto"
    device: str = "auto"  # "auto": cuda if available, else cpu
    seed: int = 1337
    log_every: int = 10
    eval_every: int = 100
    eval_tokens: int = 65536  # validation tokens per evaluation (the whole split if smaller)
    save_every: int = 500
    keep_last: int = 2
    max_bad_steps: int = 5  # this many non-finite losses or gradients in a row stop the run
    compile: bool = False  # torch.compile each block and the loss head (train/parallelize.py)
    # The attention kernel (minillama/kernels.py): "auto" is the blocked kernel on CPU up to 1,024 positions
    # (2-4x faster forward + backward there), PyTorch's scaled_dot_product_attention elsewhere.
    attention: str = "auto"  # "auto" | "sdpa" | "blocked"
    # Recompute activations in backward instead of keeping them (train/parallelize.py): "full" keeps each block's
    # input only, "selective" also its matmul and attention outputs (recomputing norms, RoPE and SwiGLU's
    # element-wise ops); `minillama plan --activation-checkpointing` gives each one's memory.
    activation_checkpointing: str = "none"  # "none" | "selective" | "full"
    # Under torchrun with more than one rank: "ddp" replicates the model and all-reduces gradients; "fsdp" shards
    # weights, gradients and AdamW state over the ranks (FSDP2, ZeRO-3) for models that do not fit one device.
    # Ignored by a single process.
    parallel: str = "ddp"  # "ddp" | "fsdp"
    # Dropout on the embeddings and on each residual branch's output while training (nanoGPT's embedding and
    # residual dropout). LLaMA uses none; a small corpus seen for many epochs can want it.
    dropout: float = 0.0
    sample_prompt: str = ""
    sample_tokens: int = 200  # the sample `minillama train` prints at the end; 0: none

    def __post_init__(self) -> None:
        for name in ("max_steps", "seq_len", "batch_tokens", "log_every", "eval_every", "eval_tokens", "save_every",
                     "keep_last", "max_bad_steps"):
            if getattr(self, name) <= 0:
                raise MinillamaError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.sample_tokens < 0:
            raise MinillamaError(f"train.sample_tokens must be >= 0 (0: no sample), got {self.sample_tokens}")
        if self.micro_batch_size < 0:
            raise MinillamaError(f"train.micro_batch_size must be >= 0, got {self.micro_batch_size}")
        if self.batch_tokens % self.seq_len:
            raise MinillamaError(f"train.batch_tokens={self.batch_tokens} is not a multiple of "
                                 f"train.seq_len={self.seq_len}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise MinillamaError(f"train.dtype must be 'auto', 'bf16' or 'fp32', got {self.dtype!r}")
        if self.activation_checkpointing not in CHECKPOINTING:
            raise MinillamaError(f"train.activation_checkpointing must be one of {', '.join(CHECKPOINTING)}, got "
                                 f"{self.activation_checkpointing!r}")
        if self.parallel not in PARALLEL:
            raise MinillamaError(f"train.parallel must be one of {', '.join(PARALLEL)}, got {self.parallel!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise MinillamaError(f"train.dropout must be in [0, 1), got {self.dropout}")
        if self.attention not in ATTENTION_KERNELS:
            raise MinillamaError(f"train.attention must be one of {', '.join(ATTENTION_KERNELS)}, got "
                                 f"{self.attention!r}")

    @property
    def batch_size(self) -> int:
        """Sequences per optimizer step, over all ranks."""
        return self.batch_tokens // self.seq_len


@dataclass
class RunConfig:
    model: ModelConfig
    data: DataConfig
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_config_from_table(table: dict[str, Any], origin: str = "config") -> RunConfig:
    """Build a RunConfig from a parsed TOML table, naming the key on any error."""
    known = {"model", "data", "tokenizer", "optim", "train"}
    for key in table:
        if key not in known:
            raise MinillamaError(f"{origin}: unknown table [{key}]; known tables: {', '.join(sorted(known))}")
    for key in ("model", "data"):
        if key not in table:
            raise MinillamaError(f"{origin}: missing table [{key}]")
    run = RunConfig(
        model=model_config_from_table(table["model"], "model"),
        data=data_config_from_table(table["data"], "data"),
        tokenizer=build_dataclass(TokenizerSpec, table.get("tokenizer", {}), "tokenizer"),
        optim=build_dataclass(OptimConfig, table.get("optim", {}), "optim"),
        train=build_dataclass(TrainConfig, table.get("train", {}), "train"),
    )
    if run.train.seq_len > run.model.max_seq_len:
        raise MinillamaError(f"train.seq_len={run.train.seq_len} exceeds model.max_seq_len={run.model.max_seq_len}")
    return run


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None,
                    data_paths: list[str] | None = None) -> RunConfig:
    """Read a run TOML (the embedded default recipe when `path` is None), apply `--set` overrides, and with
    `data_paths` replace the recipe's sources by one unweighted source per path (`--data`)."""
    path = Path(path) if path is not None else CONFIG_DIR / "default.toml"
    table = apply_overrides(read_toml(path), overrides or [])
    if data_paths:
        data = table.get("data", {})
        replaced = data_config_from_paths(data_paths, val_fraction=data.get("val_fraction", 0.01),
                                          seed=data.get("seed", 0), train_tokens=data.get("train_tokens"))
        table["data"] = replaced.to_dict()
    return run_config_from_table(table, origin=str(path))
