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


def load_training_state(directory: Path, run: RunConfig) -> dict[str, Any]:
    """Read a checkpoint's training state and check it belongs to a run with the same model."""
    run_file = directory / RUN_FILE
    try:
        saved_run = json.loads(run_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MinillamaError(f"--resume: cannot read {run_file}: {exc}") from None
    ours = run.to_dict()["model"]
    theirs = saved_run.get("model", {})
    differing = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if differing:
        key = differing[0]
        raise MinillamaError(f"--resume: checkpoint {directory} is of another model config: model.{key} is "
                             f"{theirs.get(key)!r} there and {ours.get(key)!r} here")
    try:
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which
        raise MinillamaError(f"--resume: cannot read {directory / STATE_FILE}: {exc}") from None
    state["directory"] = directory
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
