"""Training checkpoints: `OUT/step-NNNNNNN/` = a Hugging Face model directory (loadable by `minillama.load` and by
`transformers` as it is) + `training_state.pt` (optimizer, step, RNG states, counters) + `run.json` (the config).

Written into a temporary directory, fsynced, then renamed: a rename is atomic, so a kill at any instant leaves
every `step-*` directory complete and the previous one loadable. Weights are loaded from safetensors and the
training state with `torch.load(weights_only=True)`: nothing is unpickled.
"""

from __future__ import annotations

import errno
import json
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from minillama.errors import MinillamaError

if TYPE_CHECKING:
    from minillama.tokenizer import Tokenizer
    from minillama.train.config import RunConfig

STATE_FILE = "training_state.pt"
RUN_FILE = "run.json"
PREFIX = "step-"


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary and set-aside directories start with '.')."""
    found = [p for p in Path(out_dir).glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(out_dir: Path) -> Path | None:
    dirs = [d for d in checkpoint_dirs(out_dir) if (d / STATE_FILE).exists()]
    return dirs[-1] if dirs else None


def save_training_checkpoint(out_dir: Path, step: int, model: torch.nn.Module, tokenizer: Tokenizer | None,
                             optimizer: torch.optim.Optimizer, run: RunConfig, *, bad_in_a_row: int,
                             bad_total: int, keep_last: int, max_steps: int, length_decided: bool = True) -> Path:
    """Write step-NNNNNNN atomically, then delete all but the newest `keep_last` checkpoints."""
    from minillama.checkpoint import save_model_files
    from minillama.files import atomic_directory

    out_dir = Path(out_dir)
    final = out_dir / f"{PREFIX}{step:07d}"
    try:
        with atomic_directory(final) as tmp:
            save_model_files(model, tokenizer, tmp)
            state = dict(step=step, optimizer=optimizer.state_dict(), torch_rng=torch.get_rng_state(),
                         python_rng=random.getstate(), bad_in_a_row=bad_in_a_row, bad_total=bad_total,
                         max_steps=max_steps, length_decided=length_decided)
            if torch.cuda.is_available():
                state["cuda_rng"] = torch.cuda.get_rng_state_all()
            torch.save(state, tmp / STATE_FILE)
            (tmp / RUN_FILE).write_text(json.dumps(run.to_dict(), indent=2))
    except OSError as exc:
        previous = latest_checkpoint(out_dir)
        kept = f"; the previous checkpoint {previous.name} is intact" if previous else ""
        if exc.errno == errno.ENOSPC:
            raise MinillamaError(f"no space left on device while saving checkpoint {final}{kept}") from None
        raise MinillamaError(f"could not save checkpoint {final}: {exc.strerror or exc}{kept}") from None
    for old in checkpoint_dirs(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# What a resumed run may change freely: these decide what is logged, evaluated and saved, not what is trained.
# Anything else that differs from the checkpoint's run (the data mixture, the seed, the sequence length, the
# tokens per step, the optimizer, the schedule's length, ...) would silently break exact resume, so it is refused
# unless named with --allow-change.
FREE_ON_RESUME = ("train.log_every", "train.eval_every", "train.eval_tokens", "train.save_every", "train.keep_last",
                  "train.max_bad_steps", "train.sample_prompt", "train.sample_tokens")


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


def restore(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load weights, optimizer state and RNG states into a freshly built model and optimizer."""
    from minillama.checkpoint import load_state

    # A tied output projection is stored once, as the embedding; loading that restores both.
    missing, unexpected = model.load_state_dict(load_state(state["directory"], model.cfg), strict=False)
    if set(missing) - ({"output.weight"} if model.cfg.tie_embeddings else set()) or unexpected:
        raise MinillamaError(f"--resume: {state['directory']} does not match the model: missing {missing}, "
                             f"unexpected {unexpected}")
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
