"""Getting a run ready to train: its tokenizer (loaded, or trained on the run's sources and cached), its data
(tokenized once into shards, cached by content), and the model config checked against both."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from minillama.config import ModelConfig
from minillama.errors import MinillamaError
from minillama.files import atomic_directory, atomic_write_json, cache_dir

if TYPE_CHECKING:
    from minillama.tokenizer import Tokenizer
    from minillama.train.config import RunConfig


def _sources_key(run: RunConfig) -> str:
    """A content key for the run's training text: the sources' config, every input file's size and mtime, and
    the validation split held out of it."""
    from minillama.data.sources import resolve_source

    listing = [[s.name, s.text_field, s.max_mb, [f.stat_key() for f in resolve_source(s)]]
               for s in run.data.sources] + [["train-split", run.data.val_fraction, run.data.seed]]
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()[:16]


def resolve_tokenizer(run: RunConfig, show_progress: bool = True) -> Tokenizer:
    """The run's tokenizer: `tokenizer.path` if given, else a BPE trained on the training split of the run's
    sources (cached)."""
    from minillama.data import training_texts
    from minillama.tokenizer import load_tokenizer, train_bpe_from_texts

    spec = run.tokenizer
    if spec.path:
        return load_tokenizer(spec.path)
    vocab_size = spec.vocab_size or run.model.vocab_size
    target = cache_dir() / "tokenizers" / f"bpe-{vocab_size}-{_sources_key(run)}"
    if (target / "tokenizer.json").exists():
        return load_tokenizer(target)
    tokenizer = train_bpe_from_texts(training_texts(run.data), vocab_size, show_progress=show_progress)
    with atomic_directory(target) as tmp:  # a crash mid-save must not leave a cache entry that fails to load
        tokenizer.save(tmp)
    return load_tokenizer(target)


def prepare_run_data(run: RunConfig, tokenizer: Tokenizer, show_progress: bool = True) -> Path:
    """Tokenized shards of the run's sources, in the cache, keyed by sources and tokenizer."""
    from minillama.data import prepare_data

    key = hashlib.sha256(json.dumps([run.data.to_dict(), tokenizer.fingerprint], sort_keys=True).encode())
    out = cache_dir() / "data" / key.hexdigest()[:16]
    prepare_data(run.data, tokenizer, out, progress=show_progress)
    return out


def model_config_for(model: ModelConfig, tokenizer: Tokenizer) -> ModelConfig:
    """The model config with the tokenizer's BOS/EOS ids; its vocabulary must hold every token id."""
    if tokenizer.vocab_size > model.vocab_size:
        raise MinillamaError(f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's vocabulary of "
                             f"{tokenizer.vocab_size}; set model.vocab_size >= {tokenizer.vocab_size}")
    return dataclasses.replace(model, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)


def prepare_run(run: RunConfig, out_dir: Path, show_progress: bool = True) -> tuple[Tokenizer, Path, ModelConfig]:
    """(tokenizer, prepared data directory, model config) for a run."""
    tokenizer = resolve_tokenizer(run, show_progress)
    model_cfg = model_config_for(run.model, tokenizer)
    data_dir = prepare_run_data(run, tokenizer, show_progress)
    return tokenizer, data_dir, model_cfg


def write_run_record(out_dir: Path, run: RunConfig, data_dir: Path, per_rank_batch_size: int, world_size: int,
                     resumed_at: int | None = None, changes: dict[str, tuple] | None = None) -> None:
    """OUT/run.json (`minillama.data.inspect.run_record`): the resolved config and where its data lives, so
    `minillama data inspect OUT --step N` can show exactly what the run was fed. A resume that changed the config
    on purpose (--allow-change) appends {step, changes: {key: [old, new]}} to `changes_on_resume`, which a fresh
    run starts empty."""
    from minillama.data.inspect import RUN_RECORD, read_run_record, run_record

    history = (read_run_record(out_dir) or {}).get("changes_on_resume", []) if resumed_at is not None else []
    if changes:
        history.append(dict(step=resumed_at, changes={key: list(pair) for key, pair in changes.items()}))
    record = run_record(run.to_dict(), data_dir, seq_len=run.train.seq_len, seed=run.train.seed,
                        per_rank_batch_size=per_rank_batch_size, world_size=world_size)
    record["changes_on_resume"] = history
    atomic_write_json(Path(out_dir) / RUN_RECORD, record)
