"""Getting a run ready to train: its tokenizer (loaded, or trained on the run's sources and cached), its data
(tokenized once into shards, cached by content), and the model config checked against both."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from minillama.config import ModelConfig
from minillama.errors import MinillamaError


def cache_dir() -> Path:
    """~/.cache/minillama, or $MINILLAMA_CACHE, or $XDG_CACHE_HOME/minillama."""
    if os.environ.get("MINILLAMA_CACHE"):
        return Path(os.environ["MINILLAMA_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "minillama"


def _sources_key(run) -> str:
    """A content key for the run's sources: their config plus every input file's size and mtime."""
    from minillama.data.sources import resolve_source

    listing = [[s.name, s.text_field, s.max_mb, [f.stat_key() for f in resolve_source(s)]]
               for s in run.data.sources]
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()[:16]


def resolve_tokenizer(run, show_progress: bool = True):
    """The run's tokenizer: `tokenizer.path` if given, else a BPE trained on the run's sources (cached)."""
    from minillama.tokenizer import load_tokenizer, train_bpe_from_texts

    spec = run.tokenizer
    if spec.path:
        return load_tokenizer(spec.path)
    vocab_size = spec.vocab_size or run.model.vocab_size
    target = cache_dir() / "tokenizers" / f"bpe-{vocab_size}-{_sources_key(run)}"
    if (target / "tokenizer.json").exists():
        return load_tokenizer(target)
    tokenizer = train_bpe_from_texts(_source_texts(run), vocab_size, show_progress=show_progress)
    tokenizer.save(target)
    return load_tokenizer(target)


def _source_texts(run):
    """Every document of the run's sources, as text, in source order."""
    from minillama.data.sources import document_units, read_unit, resolve_source

    for source in run.data.sources:
        for unit in document_units(resolve_source(source), source.text_field):
            documents, _invalid_bytes, _skipped = read_unit(unit)
            for _index, text in documents:
                yield text


def prepare_run_data(run, tokenizer, show_progress: bool = True) -> Path:
    """Tokenized shards of the run's sources, in the cache, keyed by sources and tokenizer."""
    from minillama.data import prepare_data

    key = hashlib.sha256(json.dumps([run.data.to_dict(), tokenizer.fingerprint], sort_keys=True).encode())
    out = cache_dir() / "data" / key.hexdigest()[:16]
    prepare_data(run.data, tokenizer, out, progress=show_progress)
    return out


def model_config_for(model: ModelConfig, tokenizer) -> ModelConfig:
    """The model config with the tokenizer's BOS/EOS ids; its vocabulary must hold every token id."""
    if tokenizer.vocab_size > model.vocab_size:
        raise MinillamaError(f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's vocabulary of "
                             f"{tokenizer.vocab_size}; set model.vocab_size >= {tokenizer.vocab_size}")
    return dataclasses.replace(model, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)


def prepare_run(run, out_dir: Path, show_progress: bool = True):
    """(tokenizer, prepared data directory, model config) for a run."""
    tokenizer = resolve_tokenizer(run, show_progress)
    model_cfg = model_config_for(run.model, tokenizer)
    data_dir = prepare_run_data(run, tokenizer, show_progress)
    return tokenizer, data_dir, model_cfg


def sample_text(checkpoint: Path, run, max_new_tokens: int | None = None) -> str:
    """A sample from a saved checkpoint, with the run's prompt, at temperature 0.8 and a fixed seed."""
    from minillama.checkpoint import load
    from minillama.infer import generate

    model, tokenizer = load(checkpoint)
    prompt = run.train.sample_prompt
    text = generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens or run.train.sample_tokens,
                    temperature=0.8, top_k=200, seed=run.train.seed)
    return prompt + text
