"""Tokenize a mixture once: token shards per source and split, and a manifest that says what they hold.

Output directory layout:

    manifest.json                  sources, documents, bytes and tokens per split, weights, epochs, sha256s
    <source>.train.00000.bin ...   flat token ids (uint16 when the vocabulary fits, else uint32), numpy.memmap
    <source>.val.00000.bin ...
    tokenizer/                     a copy of the tokenizer (tokenizer.save), so `data inspect` can decode

Document format: each document is `BOS text EOS` (BOS left out if the tokenizer has none), concatenated. EOS
separates documents as the issue asks; BOS is kept too because LLaMA prompts start with BOS at inference
(Meta's generation.py encodes prompts with bos=True): a model that never saw BOS during pretraining would see
an untrained embedding as the first token of every prompt. It costs one token per document. Both specials carry
zero bytes of text, which matters for bits per byte (see loader.py).

Tokenization runs in a process pool over units of ~MBs of documents; each worker gets the tokenizer once (fork
inherits it; spawn platforms unpickle it) and uses `encode_batch` when the tokenizer has it. Results
come back in order (`imap`), so the shards are identical whatever the number of workers. Everything is written to
a temporary directory, fsynced and renamed over the output (`minillama.files.atomic_directory`), so an
interrupted run leaves the previous data intact.

Re-running with the same sources (names, file sizes and mtimes), split settings and tokenizer fingerprint is a
cache hit and reads nothing; weights, epochs and train_tokens only change the manifest's mixture figures, which
are recomputed and rewritten without re-tokenizing.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import multiprocessing
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from minillama.data.sources import (
    DataConfig,
    DataWarning,
    DocumentUnit,
    SourceConfig,
    document_units,
    first_chars,
    read_unit,
    resolve_source,
)
from minillama.errors import MinillamaError
from minillama.files import atomic_directory, atomic_write_json, read_json

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_DIRNAME = "tokenizer"
DEFAULT_SHARD_TOKENS = 1 << 27  # 128M tokens: 256 MB in uint16; big enough for few files, small enough to copy
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32: half the disk and page cache for LLaMA 1/2."""
    if vocab_size <= 0:
        raise MinillamaError(f"tokenizer vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise MinillamaError(f"tokenizer vocab_size {vocab_size} is too big for uint32 token shards (max 2**32)")


def split_tail(text: str, fraction: float) -> tuple[str, str]:
    """(head, tail) with the tail about `fraction` of the characters, starting at a line start when there is
    one after the cut point (so no line is split between train and validation)."""
    cut = round(len(text) * (1.0 - fraction))  # rounded: a one-line document stays in training whole
    if 0 < cut < len(text) and text[cut - 1] != "\n":
        newline = text.find("\n", cut)
        if newline >= 0:
            cut = newline + 1
    return text[:cut], text[cut:]


# --------------------------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Task:
    units: tuple[DocumentUnit, ...]
    val_docs: frozenset[int]  # document indices held out for validation (split by document)
    tail_fraction: float  # > 0: hold out the tail of every document instead


_WORKER: dict[str, Any] = {}


def _init_worker(value: Any) -> None:
    """Pool initializer: the tokenizer arrives once per worker process, not once per task."""
    _WORKER["tokenizer"] = value
    _WORKER["encode_batch"] = getattr(value, "encode_batch", None)
    _WORKER["bos"] = getattr(value, "bos_id", None)
    _WORKER["eos"] = value.eos_id
    _WORKER["vocab_size"] = int(value.vocab_size)
    _WORKER["dtype"] = token_dtype(int(value.vocab_size))


def _utf8_len(text: str) -> tuple[str, int]:
    try:
        return text, len(text.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates, e.g. from a "\ud800" escape in JSON
        text = text.encode("utf-8", errors="replace").decode("utf-8")
        return text, len(text.encode("utf-8"))


def _encode_documents(texts: list[str]) -> tuple[np.ndarray, int, int]:
    """Documents -> (BOS ids EOS ... as the shard dtype, number of documents, UTF-8 bytes)."""
    tokenizer, bos, eos = _WORKER["tokenizer"], _WORKER["bos"], _WORKER["eos"]
    cleaned, n_bytes = [], 0
    for text in texts:
        text, size = _utf8_len(text)
        cleaned.append(text)
        n_bytes += size
    if not cleaned:
        return np.zeros(0, _WORKER["dtype"]), 0, 0
    encode_batch = _WORKER["encode_batch"]
    encoded = encode_batch(cleaned) if encode_batch is not None else [tokenizer.encode(t) for t in cleaned]
    flat: list[int] = []
    for ids in encoded:
        if bos is not None:
            flat.append(bos)
        flat.extend(ids)
        flat.append(eos)
    tokens = np.array(flat, dtype=np.int64)
    if tokens.size and (tokens.max() >= _WORKER["vocab_size"] or tokens.min() < 0):
        bad = int(tokens.max() if tokens.max() >= _WORKER["vocab_size"] else tokens.min())
        raise MinillamaError(f"tokenizer produced token id {bad}, outside its vocab_size {_WORKER['vocab_size']}")
    return tokens.astype(_WORKER["dtype"]), len(cleaned), n_bytes


def _split_documents(docs: list[tuple[int, str]], tail_fraction: float, val_docs: frozenset[int]
                     ) -> Iterator[tuple[str, str]]:
    """("train" | "val", text) for (index, text) documents: the held-out documents are validation, or, in tail
    mode, the last `tail_fraction` of each text is."""
    for index, text in docs:
        if not text:
            continue
        if tail_fraction > 0:
            head, tail = split_tail(text, tail_fraction)
            if head:
                yield "train", head
            if tail:
                yield "val", tail
        else:
            yield ("val" if index in val_docs else "train"), text


def _tokenize_task(task: _Task) -> dict[str, Any]:
    splits: dict[str, list[str]] = {"train": [], "val": []}
    invalid, skipped = [], []
    for unit in task.units:
        docs, n_invalid, skip_reason = read_unit(unit)
        if n_invalid:
            invalid.append((unit.path, n_invalid))
        if skip_reason:
            skipped.append((unit.path, skip_reason))
        for split, text in _split_documents(docs, task.tail_fraction, task.val_docs):
            splits[split].append(text)
    result: dict[str, Any] = {"invalid": invalid, "skipped": skipped,
                              "input_bytes": sum(u.size_bytes for u in task.units)}
    for split, texts in splits.items():
        result[split] = _encode_documents(texts)
    return result


# --------------------------------------------------------------------------------------------------------------
# Main side
# --------------------------------------------------------------------------------------------------------------
class _ShardWriter:
    """Appends tokens to <prefix>.00000.bin, .00001.bin, ... of at most `shard_tokens` each, hashing as it goes
    (no second read for the sha256) and fsyncing each shard when it is complete."""

    def __init__(self, directory: Path, prefix: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.prefix, self.dtype, self.shard_tokens = directory, prefix, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file = None
        self._hash = None
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        while tokens.size:
            if self._file is None:
                name = f"{self.prefix}.{len(self.shards):05d}.bin"
                self._file = open(self.directory / name, "wb")
                self._hash, self._count = hashlib.sha256(), 0
                self.shards.append({"file": name, "tokens": 0, "sha256": ""})
            part = tokens[: self.shard_tokens - self._count]
            view = memoryview(part).cast("B")
            self._file.write(view)
            self._hash.update(view)
            self._count += part.size
            tokens = tokens[part.size:]
            if self._count == self.shard_tokens:
                self._finish()

    def _finish(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.shards[-1].update(tokens=self._count, sha256=self._hash.hexdigest())
        self._file = None

    def close(self) -> list[dict[str, Any]]:
        if self._file is not None:
            self._finish()
        return self.shards


def mixture_weights(sources: list[SourceConfig], train_tokens_by_source: list[int],
                    train_tokens: int | None) -> list[float]:
    """Each source's share of training tokens, summing to 1.

    All weights given: normalised. None given: proportional to tokens x epochs (epochs default 1, i.e. natural
    proportions). Some given: the unweighted sources take tokens x epochs / train_tokens each and the weighted
    ones share the rest in proportion to their weights."""
    given = [s.weight for s in sources]
    if all(w is not None for w in given):
        total = sum(given)
        return [w / total for w in given]
    raw = [n * (s.epochs or 1.0) for s, n in zip(sources, train_tokens_by_source)]
    if all(w is None for w in given):
        total = sum(raw)
        return [r / total for r in raw]
    _check_mixture(sources, train_tokens)
    unweighted = [s.name for s in sources if s.weight is None]
    fixed = {i: raw[i] / train_tokens for i, w in enumerate(given) if w is None}
    rest = 1.0 - sum(fixed.values())
    if rest <= 0:
        raise MinillamaError(f"sources {', '.join(unweighted)} need {1 - rest:.0%} of data.train_tokens="
                             f"{train_tokens} for their epochs, leaving nothing for the weighted sources")
    weighted_total = sum(w for w in given if w is not None)
    return [fixed[i] if w is None else rest * w / weighted_total for i, w in enumerate(given)]


def _check_mixture(sources: list[SourceConfig], train_tokens: int | None) -> None:
    """Fail before tokenizing when the weights cannot be worked out afterwards."""
    unweighted = [s.name for s in sources if s.weight is None]
    if unweighted and len(unweighted) < len(sources) and train_tokens is None:
        raise MinillamaError(f"sources {', '.join(unweighted)} have no weight while others do: give every source "
                             "a weight, or none, or set data.train_tokens so epochs convert to a share")


def apply_mixture(manifest: dict[str, Any], sources: list[SourceConfig], train_tokens: int | None) -> list[str]:
    """Fill each manifest source's weight, tokens per epoch and implied epochs; return epoch-cap warnings."""
    entries = manifest["sources"]
    weights = mixture_weights(sources, [e["train"]["tokens"] for e in entries], train_tokens)
    notes = []
    for entry, source, weight in zip(entries, sources, weights):
        tokens = entry["train"]["tokens"]
        entry["weight"] = weight
        entry["weight_config"] = source.weight
        entry["epochs_cap"] = source.epochs
        entry["tokens_per_epoch"] = tokens  # one pass over this source's training split
        entry["train_tokens_per_epoch"] = tokens / weight  # mixture tokens trained for this source to do one pass
        entry["epochs"] = None if train_tokens is None else train_tokens * weight / tokens
        if entry["epochs"] is not None and source.epochs is not None and entry["epochs"] > source.epochs * 1.000001:
            notes.append(f"source {source.name!r}: weight {weight:.4f} over {train_tokens:,} training tokens "
                         f"means {entry['epochs']:.2f} epochs, above its cap of {source.epochs}")
    manifest["train_tokens"] = train_tokens
    manifest["warnings"] = notes
    return notes


def _val_selection(n_docs: int, fraction: float, seed: int, name: str) -> tuple[str, frozenset[int]]:
    """("documents", held-out indices) when the fraction is at least one whole document, else ("tail", {})."""
    if fraction <= 0:
        return "none", frozenset()
    n_val = min(round(n_docs * fraction), n_docs - 1)
    if n_val < 1:
        return "tail", frozenset()
    digest = hashlib.sha256(f"minillama-val/{seed}/{name}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return "documents", frozenset(int(i) for i in rng.choice(n_docs, size=n_val, replace=False))


def training_texts(cfg: DataConfig, max_chars: int | None = None) -> Iterator[str]:
    """The training split of every source, document by document, split exactly as `prepare_data` splits it;
    stops once `max_chars` are given. A tokenizer trained on these never sees the validation text (a BPE trained
    on it would learn the validation split's own words and flatter its loss)."""
    def texts() -> Iterator[str]:
        for source in cfg.sources:
            units = document_units(resolve_source(source), source.text_field)
            mode, val_docs = _val_selection(sum(u.n_docs for u in units), cfg.val_fraction, cfg.seed, source.name)
            tail_fraction = cfg.val_fraction if mode == "tail" else 0.0
            for unit in units:
                yield from (text for split, text in _split_documents(read_unit(unit)[0], tail_fraction, val_docs)
                            if split == "train")

    return first_chars(texts(), max_chars)


def _tasks(units: list[DocumentUnit], val_docs: frozenset[int], tail: float, target_bytes: int) -> list[_Task]:
    tasks, group, size = [], [], 0
    for unit in units:
        group.append(unit)
        size += unit.size_bytes
        if size >= target_bytes or len(group) >= 512:
            tasks.append(group)
            group, size = [], 0
    if group:
        tasks.append(group)
    held_out = sorted(val_docs)
    out = []
    for group in tasks:
        lo, hi = group[0].first_doc, group[-1].first_doc + group[-1].n_docs
        mine = held_out[bisect.bisect_left(held_out, lo): bisect.bisect_left(held_out, hi)]
        out.append(_Task(tuple(group), frozenset(mine), tail))
    return out


def _cache_key(cfg: DataConfig, files: list[list[Any]], tokenizer: Any, shard_tokens: int) -> str:
    """Everything that decides the shards' bytes: the format, the inputs' names/sizes/mtimes, the split settings
    and the tokenizer. Weights, epochs and train_tokens are left out: they do not change a token."""
    uses_python = any(p.startswith("python:") for s in cfg.sources for p in s.paths)
    key = {
        "format": FORMAT_VERSION, "shard_tokens": shard_tokens, "val_fraction": cfg.val_fraction, "seed": cfg.seed,
        "tokenizer": [str(tokenizer.fingerprint), int(tokenizer.vocab_size), getattr(tokenizer, "bos_id", None),
                      tokenizer.eos_id],
        "python": sys.version if uses_python else None,
        "sources": [{"name": s.name, "text_field": s.text_field, "max_mb": s.max_mb,
                     "files": [f.stat_key() for f in fs]} for s, fs in zip(cfg.sources, files)],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / MANIFEST_NAME
    manifest = read_json(path, missing=f"{data_dir} is not a prepared data directory: {path} not found")
    if (not isinstance(manifest, dict) or manifest.get("format") != "minillama-data"
            or manifest.get("version") != FORMAT_VERSION):
        raise MinillamaError(f"{path}: not a minillama data manifest of version {FORMAT_VERSION}")
    return manifest


def manifest_shards(manifest: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every shard a manifest lists ({"file", "tokens", "sha256"}), source by source, train before val."""
    for entry in manifest["sources"]:
        for split in SPLITS:
            yield from entry[split]["shards"]


def _cache_hit(out_dir: Path, key: str) -> dict[str, Any] | None:
    if not (out_dir / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = read_manifest(out_dir)
    except MinillamaError:
        return None
    if manifest.get("cache_key") != key:
        return None
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for shard in manifest_shards(manifest):
        path = out_dir / shard["file"]
        if not path.is_file() or path.stat().st_size != shard["tokens"] * itemsize:
            return None
    return manifest


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise MinillamaError(f"output {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise MinillamaError(f"refusing to overwrite {out_dir}: it is not empty and holds no {MANIFEST_NAME}")


def _worker_count(workers: int | None, n_tasks: int) -> int:
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers < 1:
        raise MinillamaError(f"workers must be at least 1, got {workers}")
    return max(1, min(workers, n_tasks))


def prepare_data(cfg: DataConfig, tokenizer: Any, out_dir: str | Path, workers: int | None = None,
                 train_tokens: int | None = None, progress: bool = True,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS) -> dict[str, Any]:
    """Tokenize `cfg`'s sources into `out_dir` (or find them already there) and return the manifest.

    `tokenizer` is a tokenizer object or a path for `minillama.tokenizer.load_tokenizer`. `train_tokens`
    (default cfg.train_tokens) is the planned number of training tokens, for which the manifest reports the
    epochs each source's weight implies. `workers`: tokenizer processes (default: the usable CPU cores).
    The returned manifest has one key more than manifest.json: `cache_hit`, True when nothing was tokenized."""
    out_dir = Path(out_dir)
    train_tokens = cfg.train_tokens if train_tokens is None else train_tokens
    if train_tokens is not None and train_tokens <= 0:
        raise MinillamaError(f"train_tokens must be positive, got {train_tokens}")
    if shard_tokens <= 0:
        raise MinillamaError(f"shard_tokens must be positive, got {shard_tokens}")
    _check_mixture(cfg.sources, train_tokens)
    files = [resolve_source(s) for s in cfg.sources]  # bad paths first: the commonest mistake, found cheaply
    if isinstance(tokenizer, (str, Path)):
        from minillama.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    vocab_size = int(tokenizer.vocab_size)
    dtype = token_dtype(vocab_size)
    if getattr(tokenizer, "eos_id", None) is None:
        raise MinillamaError("the tokenizer has no EOS token; prepared data separates documents with EOS")

    key = _cache_key(cfg, files, tokenizer, shard_tokens)
    cached = _cache_hit(out_dir, key)
    if cached is not None:
        before = json.dumps(cached, sort_keys=True)
        notes = apply_mixture(cached, cfg.sources, train_tokens)
        cached["config"] = cfg.to_dict()
        if json.dumps(cached, sort_keys=True) != before:
            atomic_write_json(out_dir / MANIFEST_NAME, cached, indent=1)
        for note in notes:
            warnings.warn(note, DataWarning, stacklevel=2)
        return {**cached, "cache_hit": True}
    _check_out_dir(out_dir)

    plans = []  # per source: (config, files, document units, validation mode, held-out document indices)
    for source, source_files in zip(cfg.sources, files):
        units = document_units(source_files, source.text_field)
        n_docs = sum(u.n_docs for u in units)
        mode, val_docs = _val_selection(n_docs, cfg.val_fraction, cfg.seed, source.name)
        plans.append((source, source_files, units, mode, val_docs))
    total_bytes = sum(u.size_bytes for _, _, units, _, _ in plans for u in units)
    n_workers = _worker_count(workers, max(1, total_bytes >> 16))
    target = max(64 << 10, min(8 << 20, total_bytes // (8 * n_workers) + 1))
    tasks = [(i, task) for i, (_, _, units, mode, val_docs) in enumerate(plans)
             for task in _tasks(units, val_docs, cfg.val_fraction if mode == "tail" else 0.0, target)]
    n_workers = _worker_count(workers, len(tasks))

    with atomic_directory(out_dir) as tmp:
        tokenizer_dir = _save_tokenizer(tokenizer, tmp / TOKENIZER_DIRNAME)
        stats = _run_tasks(tasks, plans, tokenizer, tmp, dtype, shard_tokens, n_workers, total_bytes, progress)
        manifest = _build_manifest(cfg, plans, stats, tokenizer, dtype, key, tokenizer_dir)
        notes = apply_mixture(manifest, cfg.sources, train_tokens)
        atomic_write_json(tmp / MANIFEST_NAME, manifest, indent=1)
    for note in notes:
        warnings.warn(note, DataWarning, stacklevel=2)
    return {**manifest, "cache_hit": False}


def _save_tokenizer(tokenizer: Any, path: Path) -> str | None:
    save = getattr(tokenizer, "save", None)
    if save is None:
        return None
    save(path)
    return TOKENIZER_DIRNAME


def _run_tasks(tasks: list[tuple[int, _Task]], plans: list[Any], tokenizer: Any, tmp: Path, dtype: np.dtype,
               shard_tokens: int, n_workers: int, total_bytes: int, progress: bool) -> list[dict[str, Any]]:
    stats = [{"invalid_utf8_bytes": 0, "invalid_files": [], "skipped_files": [],
              **{split: {"documents": 0, "bytes": 0, "tokens": 0} for split in SPLITS}} for _ in plans]
    writers = {(i, split): _ShardWriter(tmp, f"{source.name}.{split}", dtype, shard_tokens)
               for i, (source, *_) in enumerate(plans) for split in SPLITS}
    # fork (Linux) hands each worker the tokenizer object as it is; spawn (macOS, Windows) pickles it once per
    # worker, which minillama's tokenizers support by pickling their defining files.
    fork = "fork" in multiprocessing.get_all_start_methods()
    pool = None
    if n_workers == 1:
        _init_worker(tokenizer)
        results = map(_tokenize_task, (task for _, task in tasks))
    else:
        # A tokenizers-library parent that has already encoded would print a fork warning in every child, and
        # its Rust thread pool in each worker would oversubscribe the cores the workers already fill.
        previous = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            context = multiprocessing.get_context("fork" if fork else "spawn")
            pool = context.Pool(n_workers, initializer=_init_worker, initargs=(tokenizer,))
        finally:
            if previous is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous
        results = pool.imap(_tokenize_task, [task for _, task in tasks])
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress,
               dynamic_ncols=True)
    try:
        tokens_done = 0
        for (i, _), result in zip(tasks, results):
            source = plans[i][0]
            for split in SPLITS:
                tokens, n_docs, n_bytes = result[split]
                writers[(i, split)].write(tokens)
                s = stats[i][split]
                s["documents"] += n_docs
                s["bytes"] += n_bytes
                s["tokens"] += int(tokens.size)
                tokens_done += int(tokens.size)
            for path, n_invalid in result["invalid"]:
                stats[i]["invalid_utf8_bytes"] += n_invalid
                stats[i]["invalid_files"].append([path, n_invalid])
                warnings.warn(f"source {source.name!r}: {path} has {n_invalid} bytes that are not valid UTF-8; "
                              "replaced with U+FFFD", DataWarning, stacklevel=3)
            for path, reason in result["skipped"]:
                stats[i]["skipped_files"].append([path, reason])
                warnings.warn(f"source {source.name!r}: {path}: {reason}", DataWarning, stacklevel=3)
            bar.update(result["input_bytes"])
            bar.set_postfix_str(f"{tokens_done / 1e6:.2f}M tokens", refresh=False)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        _WORKER.clear()
        for (i, split), writer in writers.items():
            stats[i][split]["shards"] = writer.close()
    for i, (source, *_) in enumerate(plans):
        if stats[i]["train"]["tokens"] + stats[i]["val"]["tokens"] == 0:
            raise MinillamaError(f"source {source.name!r} has zero tokens: every document is empty "
                                 f"({', '.join(source.paths)})")
        if stats[i]["train"]["tokens"] == 0:
            raise MinillamaError(f"source {source.name!r} has zero training tokens (all held out for validation)")
    return stats


def _build_manifest(cfg: DataConfig, plans: list[Any], stats: list[dict[str, Any]], tokenizer: Any,
                    dtype: np.dtype, key: str, tokenizer_dir: str | None) -> dict[str, Any]:
    bos = getattr(tokenizer, "bos_id", None)
    sources = []
    for (source, source_files, _units, mode, _), s in zip(plans, stats):
        sources.append({
            "name": source.name, "paths": source.paths, "files": len(source_files), "text_field": source.text_field,
            "split": source.split, "max_mb": source.max_mb, "val_mode": mode,
            "invalid_utf8_bytes": s["invalid_utf8_bytes"], "invalid_files": s["invalid_files"],
            "skipped_files": s["skipped_files"], "train": s["train"], "val": s["val"],
        })
    totals = {split: {k: sum(e[split][k] for e in sources) for k in ("documents", "bytes", "tokens")}
              for split in SPLITS}
    return {
        "format": "minillama-data", "version": FORMAT_VERSION, "cache_key": key,
        "tokenizer": {"fingerprint": str(tokenizer.fingerprint), "vocab_size": int(tokenizer.vocab_size),
                      "bos_id": bos, "eos_id": tokenizer.eos_id, "dir": tokenizer_dir},
        "dtype": dtype.name,
        "document_format": ("BOS " if bos is not None else "") + "text EOS",
        "val_fraction": cfg.val_fraction, "seed": cfg.seed, "config": cfg.to_dict(),
        "sources": sources, "totals": totals,
        "bytes_per_token": {split: (totals[split]["bytes"] / totals[split]["tokens"] if totals[split]["tokens"]
                                    else None) for split in SPLITS},
    }


__all__ = ["prepare_data", "training_texts", "read_manifest", "mixture_weights", "apply_mixture", "token_dtype",
           "split_tail", "FORMAT_VERSION", "MANIFEST_NAME", "TOKENIZER_DIRNAME", "DEFAULT_SHARD_TOKENS"]
