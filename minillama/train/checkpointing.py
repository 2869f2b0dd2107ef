"""Training checkpoints, the same on one process and on N ranks, under DDP or FSDP:

    OUT/step-NNNNNNN/
      config.json, model.safetensors, tokenizer files   the whole model as a Hugging Face directory (rank 0
                                                         gathers it): `minillama.load` and `transformers` open it
      sharded/shard-0000R-model-00001-of-00001.safetensors
                                                         rank R's shard of the weights and AdamW state, written by
                                                         torch.distributed.checkpoint (DCP) in safetensors
      rng/rank-0000R.pt                                  rank R's random number generator states
      training_state.pt                                  step, counters, the world size it was written at
      run.json                                           the run's config

One format for every run (a single process writes one shard), so a checkpoint saved by N ranks resumes on M:
DCP's reader maps the saved pieces (each shard's offsets are in its safetensors header) onto whatever pieces the
loading ranks hold. The tensors go through `HuggingFaceStorageWriter`/`HuggingFaceStorageReader`, not DCP's
default format, whose `.metadata` file is a pickle: here nothing is unpickled. Weights, AdamW moments and step
counts are all tensors (the optimizer's hyperparameters come from the config, which `load_training_state`
checks); RNG states and counters are plain values read with `torch.load(weights_only=True)`.

All ranks write into one temporary directory that rank 0 creates and, once every rank reports success, renames
(`minillama.files.atomic_directory`): a kill at any instant, of any rank, leaves every `step-*` directory complete
and the previous one loadable. The directory must be on a filesystem every rank sees (on several nodes: a shared
one). Rank 0 also holds the gathered full model in CPU memory while it writes the Hugging Face files.
"""

from __future__ import annotations

import contextlib
import errno
import json
import random
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint.api import CheckpointException

from minillama.errors import MinillamaError

if TYPE_CHECKING:
    from minillama.tokenizer import Tokenizer
    from minillama.train.config import RunConfig
    from minillama.train.parallelize import DistributedContext

STATE_FILE = "training_state.pt"
RUN_FILE = "run.json"
SHARDED_DIR = "sharded"
RNG_DIR = "rng"
PREFIX = "step-"


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary and set-aside directories start with '.')."""
    found = [p for p in Path(out_dir).glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(out_dir: Path) -> Path | None:
    dirs = [d for d in checkpoint_dirs(out_dir) if (d / STATE_FILE).exists()]
    return dirs[-1] if dirs else None


# --------------------------------------------------------------------------------------------------------------
# The tensors: model and optimizer state as one flat {name: tensor} dict (a DTensor shard under FSDP)
# --------------------------------------------------------------------------------------------------------------
def _state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """torch.distributed.checkpoint.state_dict's view of the model and optimizer, keyed by parameter name
    whatever wraps the model. A fresh optimizer gets its state made (one zero-gradient step at lr 0, which
    changes no weight) so that there are tensors of the right shapes and shards to load into."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer)


def _tensor_dict(model: torch.nn.Module, model_state: dict, optim_state: dict) -> dict[str, torch.Tensor]:
    """{"model.<name>": weight, "optim.<name>.<exp_avg|exp_avg_sq|step>": tensor}. A tied output projection
    is the embedding: stored once (safetensors refuses two names for one storage)."""
    tied = {"output.weight"} if model.cfg.tie_embeddings else set()
    flat = {f"model.{name}": tensor for name, tensor in model_state.items() if name not in tied}
    for name, per_param in optim_state["state"].items():
        for key, value in per_param.items():
            if not torch.is_tensor(value):
                raise MinillamaError(f"optimizer state {name}.{key} is a {type(value).__name__}, not a tensor; "
                                     "checkpoints hold tensors only (use AdamW from train/optim.py)")
            flat[f"optim.{name}.{key}"] = value
    return flat


def _into_state_dicts(model: torch.nn.Module, flat: dict[str, torch.Tensor], model_state: dict,
                      optim_state: dict) -> None:
    """The inverse of `_tensor_dict`: put the (loaded) tensors back under the state dicts' keys."""
    for name in model_state:
        model_state[name] = flat["model.tok_embeddings.weight" if name == "output.weight" and
                                 model.cfg.tie_embeddings else f"model.{name}"]
    for name, per_param in optim_state["state"].items():
        for key in per_param:
            per_param[key] = flat[f"optim.{name}.{key}"]


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = dict(torch_rng=torch.get_rng_state(), python_rng=random.getstate())
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


# --------------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------------
class _AnotherRankFailed(Exception):
    pass


@contextlib.contextmanager
def _shared_atomic_directory(final: Path, dist: DistributedContext) -> Iterator[Path]:
    """`atomic_directory(final)` held by rank 0, its temporary directory shared with every rank."""
    from minillama.files import atomic_directory

    if dist.is_main:
        with atomic_directory(final) as tmp:
            dist.broadcast_text(str(tmp))
            yield tmp
    else:
        yield Path(dist.broadcast_text(None))


@contextlib.contextmanager
def _single_process_is_intended() -> Iterator[None]:
    """DCP warns on every save and load without a process group, even when told no_dist=True on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _errno(exc: BaseException) -> int | None:
    if isinstance(exc, CheckpointException):  # DCP gathers every rank's failure
        for failure, _ in exc.failures.values():
            if isinstance(failure, OSError):
                return failure.errno
    return exc.errno if isinstance(exc, OSError) else None


def save_training_checkpoint(out_dir: Path, step: int, model: torch.nn.Module, tokenizer: Tokenizer | None,
                             optimizer: torch.optim.Optimizer, run: RunConfig, *, bad_in_a_row: int,
                             bad_total: int, keep_last: int, max_steps: int, length_decided: bool = True,
                             dist: DistributedContext | None = None) -> Path:
    """Write step-NNNNNNN atomically from every rank (a collective: all ranks call it), then rank 0 deletes all
    but the newest `keep_last` checkpoints. `model` is the Transformer itself (sharded in place under FSDP),
    never DDP's wrapper."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from minillama import checkpoint
    from minillama.model import Transformer
    from minillama.train.parallelize import DistributedContext

    dist = dist or DistributedContext()
    out_dir = Path(out_dir)
    final = out_dir / f"{PREFIX}{step:07d}"
    tensors = _tensor_dict(model, *_state_dicts(model, optimizer))
    # The whole model for the Hugging Face directory: gathered (a collective under FSDP), on rank 0's CPU only.
    full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    failure: BaseException | None = None
    try:
        with _shared_atomic_directory(final, dist) as tmp:
            try:
                with _single_process_is_intended():
                    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDED_DIR),
                                                                              save_distributed=True),
                             no_dist=dist.world_size == 1)
                (tmp / RNG_DIR).mkdir(exist_ok=True)
                torch.save(_rng_state(dist.device), tmp / RNG_DIR / f"rank-{dist.rank:05d}.pt")
                if dist.is_main:
                    with torch.device("meta"):
                        export = Transformer(model.cfg)
                    export.load_state_dict(full_state, assign=True)
                    if model.cfg.tie_embeddings:  # assign=True gives each name its own Parameter: one matrix again
                        export.output.weight = export.tok_embeddings.weight
                    checkpoint.save_model_files(export, tokenizer, tmp)
                    state = dict(step=step, bad_in_a_row=bad_in_a_row, bad_total=bad_total, max_steps=max_steps,
                                 length_decided=length_decided, world_size=dist.world_size)
                    torch.save(state, tmp / STATE_FILE)
                    (tmp / RUN_FILE).write_text(json.dumps(run.to_dict(), indent=2))
            except (OSError, CheckpointException) as exc:
                failure = exc
            # Every rank must have written its part before rank 0 renames; one failure fails them all, inside
            # the block, so that rank 0's atomic_directory removes the temporary directory.
            if dist.count(failure is None) < dist.world_size:
                raise failure or _AnotherRankFailed()
    except (OSError, CheckpointException, _AnotherRankFailed) as exc:
        previous = latest_checkpoint(out_dir)
        kept = f"; the previous checkpoint {previous.name} is intact" if previous else ""
        if _errno(exc) == errno.ENOSPC:
            raise MinillamaError(f"no space left on device while saving checkpoint {final}{kept}") from None
        if isinstance(exc, _AnotherRankFailed):
            raise MinillamaError(f"could not save checkpoint {final}: another rank failed to write its part"
                                 f"{kept}") from None
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[-1]
        raise MinillamaError(f"could not save checkpoint {final}: {reason}{kept}") from None
    if dist.is_main:
        for old in checkpoint_dirs(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


# What a resumed run may change freely: these decide what is logged, evaluated and saved, or how the same step is
# laid out (activation checkpointing recomputes the same values; DDP or FSDP, like the world size, splits the
# same global batch), not what is trained.
# Anything else that differs from the checkpoint's run (the data mixture, the seed, the sequence length, the
# tokens per step, the optimizer, the schedule's length, ...) would silently break exact resume, so it is refused
# unless named with --allow-change.
FREE_ON_RESUME = ("train.log_every", "train.eval_every", "train.eval_tokens", "train.save_every", "train.keep_last",
                  "train.max_bad_steps", "train.sample_prompt", "train.sample_tokens", "train.parallel",
                  "train.activation_checkpointing")


def flatten(table: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"seed": 1}, "data": {"sources": [{"path": "a"}]}} -> {"train.seed": 1, "data.sources[0].path":
    "a"}: every leaf under its full key, as `--set` and error messages name it."""
    if isinstance(table, dict):
        items = {}
        for key, value in table.items():
            items.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return items
    if isinstance(table, list) and table and all(isinstance(v, dict) for v in table):
        items = {}
        for index, value in enumerate(table):
            items.update(flatten(value, f"{prefix}[{index}]"))
        return items
    return {prefix: table}


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every full key whose value differs between two run configs (as `RunConfig.to_dict()`), as (saved, now);
    a key present on one side only reads as None on the other."""
    before, after = flatten(saved), flatten(current)
    return {key: (before.get(key), after.get(key)) for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)}


def _allowed(key: str, allowed: tuple[str, ...]) -> bool:
    return any(key == a or key.startswith((a + ".", a + "[")) for a in allowed)


def load_training_state(directory: Path, run: RunConfig, allow_changes: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a checkpoint's training state and check it belongs to this run: the same model always, and the same
    everything else that decides what is trained unless `allow_changes` names it (a key or a table, e.g.
    "optim.lr" or "data"). The allowed changes come back as state["changes"] {key: (old, new)}."""
    run_file = directory / RUN_FILE
    try:
        saved_run = json.loads(run_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MinillamaError(f"--resume: cannot read {run_file}: {exc}") from None
    changes = config_changes(saved_run, run.to_dict())
    model_changes = [key for key in changes if key.startswith("model.")]
    if model_changes:
        key = model_changes[0]
        raise MinillamaError(f"--resume: checkpoint {directory} is of another model config: {key} is "
                             f"{changes[key][0]!r} there and {changes[key][1]!r} here")
    refused = {k: v for k, v in changes.items() if k not in FREE_ON_RESUME and not _allowed(k, allow_changes)}
    if refused:
        listed = "; ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in refused.items())
        flags = " ".join(f"--allow-change {key}" for key in refused)
        raise MinillamaError(f"--resume: the run's config differs from checkpoint {directory.name}'s, which breaks "
                             f"exact resume: {listed}. To continue with the change on purpose, add {flags}")
    try:
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which
        raise MinillamaError(f"--resume: cannot read {directory / STATE_FILE}: {exc}") from None
    state["directory"] = directory
    state["changes"] = {k: v for k, v in changes.items() if k not in FREE_ON_RESUME}
    return state


def restore(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            dist: DistributedContext | None = None) -> None:
    """Load weights, optimizer state and this rank's RNG states into the run's model and optimizer, after they
    are built and parallelized (under FSDP each rank reads only the pieces of its own shards). The checkpoint may
    come from any world size; the RNG states of a rank the checkpoint did not have stay as seeded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from minillama.train.parallelize import DistributedContext

    dist = dist or DistributedContext()
    directory = state["directory"]
    sharded = directory / SHARDED_DIR
    if not sharded.is_dir():
        raise MinillamaError(f"--resume: {directory} has no {SHARDED_DIR}/ directory of training tensors (a "
                             "checkpoint from an older minillama?); its weights load with minillama.load, but "
                             "the run cannot resume from it")
    model_state, optim_state = _state_dicts(model, optimizer)
    tensors = _tensor_dict(model, model_state, optim_state)
    try:
        with _single_process_is_intended():
            dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(sharded)), no_dist=dist.world_size == 1)
    except (Exception, CheckpointException) as exc:  # a missing tensor, a truncated shard: say which directory
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise MinillamaError(f"--resume: cannot read the training tensors in {sharded}: {reason}") from None
    _into_state_dicts(model, tensors, model_state, optim_state)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    rng_file = directory / RNG_DIR / f"rank-{dist.rank:05d}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, map_location="cpu", weights_only=True)
        torch.set_rng_state(rng["torch_rng"])
        random.setstate(rng["python_rng"])
        if "cuda_rng" in rng and dist.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda_rng"], dist.device)
