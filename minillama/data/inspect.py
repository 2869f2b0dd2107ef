"""What the model is fed, in words: a batch's sequences with their source, epoch, window and decoded start, and
a summary of a prepared directory. The CLI's `data prepare` and `data inspect` print these.

A training run leaves OUT/run.json (`RUN_RECORD`, written by the trainer through `run_record`), which names its
data and its loader settings, so that `loader_settings(OUT)` gives the batches the run was fed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minillama.data.loader import MixtureLoader
from minillama.data.prepare import MANIFEST_NAME, TOKENIZER_DIRNAME
from minillama.errors import MinillamaError
from minillama.files import read_json
from minillama.tables import format_columns

RUN_RECORD = "run.json"
# What `data inspect` assumes for a prepared directory that no run.json describes.
DEFAULT_SEQ_LEN, DEFAULT_BATCH_SIZE, DEFAULT_SEED = 256, 8, 0


def run_record(config: dict[str, Any], data_dir: str | Path, seq_len: int, seed: int, per_rank_batch_size: int,
               world_size: int) -> dict[str, Any]:
    """The contents of a run's OUT/run.json: its resolved config, where its prepared data lives, and what its
    loader was given, under the keys `read_run_record` and `loader_settings` read."""
    return dict(config=config, data_dir=str(data_dir), seq_len=seq_len, seed=seed,
                per_rank_batch_size=per_rank_batch_size, world_size=world_size)


def read_run_record(directory: str | Path) -> dict[str, Any] | None:
    """A training run's run.json (see `run_record`); None when `directory` has none or is a prepared data
    directory itself."""
    path = Path(directory) / RUN_RECORD
    if not path.is_file() or (Path(directory) / MANIFEST_NAME).exists():
        return None
    return read_json(path)


def loader_settings(directory: str | Path, seq_len: int | None = None, batch_size: int | None = None,
                    seed: int | None = None) -> dict[str, Any]:
    """`data_dir`, `seq_len`, `batch_size` and `seed` for a MixtureLoader over `directory`: a prepared data
    directory, or a training run's output directory, whose run.json names its data and the run's per-rank batch
    size, sequence length and seed. Arguments given override; the rest default to the run's, else 256, 8 and 0."""
    run = read_run_record(directory)
    if run is None:
        defaults = dict(data_dir=directory, seq_len=DEFAULT_SEQ_LEN, batch_size=DEFAULT_BATCH_SIZE, seed=DEFAULT_SEED)
    else:
        defaults = dict(data_dir=run["data_dir"], seq_len=run["seq_len"], batch_size=run["per_rank_batch_size"],
                        seed=run["seed"])
    given = dict(seq_len=seq_len, batch_size=batch_size, seed=seed)
    return {**defaults, **{key: value for key, value in given.items() if value is not None}}


def load_data_tokenizer(data_dir: str | Path, path: str | Path | None = None) -> Any | None:
    """The tokenizer given by `path`, else the copy stored with the data; None if neither can be loaded."""
    from minillama.tokenizer import load_tokenizer

    if path is not None:
        return load_tokenizer(path)
    stored = Path(data_dir) / TOKENIZER_DIRNAME
    if not stored.is_dir():
        return None
    try:
        return load_tokenizer(stored)
    except MinillamaError:
        return None


def inspect_batch(loader: MixtureLoader, step: int, tokenizer: Any | None = None,
                  start_tokens: int = 32) -> list[dict[str, Any]]:
    """`loader.describe(step)` plus each sequence's first `start_tokens` ids and, with a tokenizer, their text.
    A tokenizer whose fingerprint differs from the data's is refused: its text would be a confident lie."""
    if tokenizer is not None and str(tokenizer.fingerprint) != loader.tokenizer_fingerprint:
        raise MinillamaError(f"tokenizer mismatch: the data was prepared with tokenizer {loader.tokenizer_fingerprint},"
                             f" the one given is {tokenizer.fingerprint}")
    inputs, _ = loader.batch(step)
    rows = loader.describe(step)
    for row, ids in zip(rows, inputs[:, :start_tokens].tolist()):
        row["start_ids"] = ids
        if tokenizer is not None:
            row["start_text"] = _decode_marked(tokenizer, ids, loader.bos_id, loader.eos_id)
    return rows


def _decode_marked(tokenizer: Any, ids: list[int], bos: int | None, eos: int) -> str:
    """Decode runs of ordinary tokens together (one byte-level token alone may be half a character) and show
    BOS/EOS as <bos>/<eos>, since decode() drops special tokens and document boundaries are the point here."""
    parts, run = [], []
    for i in ids + [None]:
        if i is None or i in (bos, eos):
            if run:
                parts.append(tokenizer.decode(run))
                run = []
            if i is not None:
                parts.append("<bos>" if i == bos else "<eos>")
        else:
            run.append(i)
    return "".join(parts)


def format_inspection(loader: MixtureLoader, step: int, rows: list[dict[str, Any]], width: int = 72) -> str:
    lines = [f"batch {step} of {loader.data_dir}: seq_len {loader.seq_len}, batch_size {loader.batch_size}, "
             f"seed {loader.seed}, rank {loader.rank} of {loader.world_size}"]
    name_width = max(len(r["source"]) for r in rows)
    for r in rows:
        where = (f"{r['row']:>3}  {r['source']:<{name_width}}  epoch {r['epoch']}  window {r['window']:,} of "
                 f"{loader.windows[r['source']]:,}  tokens {r['offset']:,}..{r['end']:,}"
                 + ("  (past the end, from the start)" if r["end"] < r["offset"] else ""))
        lines.append(where)
        if "start_text" in r:
            start = repr(r["start_text"])
            lines.append("       " + (start if len(start) <= width else start[: width - 3] + "..."))
        else:
            lines.append("       ids " + " ".join(str(i) for i in r["start_ids"][:16]) + " ...")
    return "\n".join(lines)


def format_manifest(manifest: dict[str, Any]) -> str:
    """A table per source: documents and tokens per split, weight, and epochs for the planned train tokens."""
    columns = ["source", "docs", "val docs", "tokens", "val tokens", "bytes/token", "weight", "epochs"]
    rows = []
    for e in manifest["sources"]:
        train, val = e["train"], e["val"]
        epochs = "-" if e.get("epochs") is None else f"{e['epochs']:.2f}"
        rows.append([e["name"], f"{train['documents']:,}", f"{val['documents']:,}", f"{train['tokens']:,}",
                     f"{val['tokens']:,}", f"{train['bytes'] / train['tokens']:.2f}", f"{e['weight']:.4f}", epochs])
    out = format_columns(columns, rows)
    totals = manifest["totals"]
    out.append(f"{totals['train']['tokens']:,} training and {totals['val']['tokens']:,} validation tokens "
               f"({manifest['dtype']}, documents as {manifest['document_format']}); tokenizer "
               f"{manifest['tokenizer']['fingerprint'][:12]}")
    if manifest.get("train_tokens"):
        out.append(f"epochs are for train_tokens = {manifest['train_tokens']:,}; one epoch of each source takes "
                   + ", ".join(f"{e['name']} {e['train_tokens_per_epoch']:,.0f}" for e in manifest["sources"])
                   + " training tokens")
    return "\n".join(out)


__all__ = ["RUN_RECORD", "run_record", "read_run_record", "loader_settings", "load_data_tokenizer", "inspect_batch",
           "format_inspection", "format_manifest"]
