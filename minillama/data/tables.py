"""Tables as sources: Parquet files, Arrow IPC files, and `datasets` directories written by `save_to_disk`.

Every row is one document: the string in the source's `text_field` column (a null is an empty document, which
adds no tokens). Only pyarrow is needed, not the `datasets` library: `Dataset.save_to_disk` writes Arrow IPC
*streams* named `data-0000K-of-0000N.arrow`, listed in order under `_data_files` in `state.json` next to
`dataset_info.json`; a `DatasetDict` writes `dataset_dict.json` (`{"splits": [...]}`) and one such directory per
split (datasets' `arrow_dataset.py` and `dataset_dict.py`, `save_to_disk`).

Memory stays bounded whatever a file's size. A unit of work is a run of whole Parquet row groups, or a range of
Arrow rows (a record batch bigger than a unit is cut into row ranges), of about `sources.UNIT_BYTES` of text; a
worker reads its unit `BATCH_ROWS` rows at a time: Parquet through `ParquetFile.iter_batches` with column chunks
streamed through a small buffer, Arrow from a memory map, where the batches before the unit are skipped without
their text being read (zero-copy). A Parquet row group is the smallest unit: one bigger than UNIT_BYTES is held
whole by the worker that tokenizes it.

The column is checked (present, a string type) when units are listed, before any output is written, so a wrong
`text_field` costs one footer read, not a tokenizing run.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from minillama.data.sources import DocumentUnit, SourceFile
from minillama.errors import MinillamaError

BATCH_ROWS = 1024  # rows turned into Python strings at a time
_READ_BUFFER_BYTES = 1 << 20  # Parquet column chunks are streamed through this, not read whole (buffer_size)
_ARROW_FILE_MAGIC = b"ARROW1"  # the IPC file format starts with it; a stream (what save_to_disk writes) does not


# --------------------------------------------------------------------------------------------------------------
# save_to_disk directories -> their data files
# --------------------------------------------------------------------------------------------------------------
def saved_dataset_files(directory: Path, split: str | None, source: str) -> list[Path]:
    """The `.arrow` files of a `save_to_disk` directory, in order: a Dataset's, or those of split `split`
    (default "train") of a DatasetDict. A `split` given for a single Dataset is an error, not ignored."""
    if (directory / "dataset_dict.json").is_file():
        splits = _read_json(directory / "dataset_dict.json").get("splits")
        if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
            raise MinillamaError(f"{directory / 'dataset_dict.json'}: expected {{\"splits\": [names]}}")
        chosen = split or "train"
        if chosen not in splits:
            raise MinillamaError(f"source {source!r}: {directory} (a DatasetDict) has no split {chosen!r}; its splits: "
                                 f"{', '.join(splits) or 'none'} (set split to one of them)")
        directory = directory / chosen
    elif split is not None:
        raise MinillamaError(f"source {source!r}: {directory} is a single Dataset saved with save_to_disk, not a "
                             f"DatasetDict; remove split = {split!r}")
    state_path = directory / "state.json"
    state = _read_json(state_path)
    entries = state.get("_data_files")
    names = [e.get("filename") for e in entries] if isinstance(entries, list) and all(
        isinstance(e, dict) for e in entries) else []
    if not names or not all(isinstance(n, str) and n for n in names):
        raise MinillamaError(f"{state_path}: lists no data files under _data_files (expected a directory written by "
                             "datasets' save_to_disk)")
    files = [directory / name for name in names]
    for path in files:
        if not path.is_file():
            raise MinillamaError(f"{path} not found (listed in {state_path})")
    return files


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MinillamaError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MinillamaError(f"{path}: not readable JSON ({_first_line(exc)})") from None
    if not isinstance(value, dict):
        raise MinillamaError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------------------------------------------
# Listing: a table file -> units (main process, after the cache check)
# --------------------------------------------------------------------------------------------------------------
def table_units(f: SourceFile, text_field: str, first_doc: int, chunk_bytes: int) -> list[DocumentUnit]:
    """Units of about `chunk_bytes` of text, made of whole blocks (Parquet row groups; Arrow record batches, cut
    into row ranges when bigger than `chunk_bytes`). Where the source's max_mb ends inside this file
    (`limit_bytes`), blocks are kept up to the one in which the text reaches the limit."""
    if f.kind == "parquet":
        blocks = _parquet_blocks(f.path, text_field)
    else:
        blocks = _arrow_blocks(f.path, text_field, chunk_bytes)
    if f.limit_bytes is not None:
        kept, total = [], 0
        for block in blocks:
            if total >= f.limit_bytes:
                break
            kept.append(block)
            total += block[3]
        blocks = kept
    units: list[DocumentUnit] = []
    group: list[tuple[int, int, int, int]] = []
    for i, block in enumerate(blocks):
        group.append(block)
        size = sum(b[3] for b in group)
        if size >= chunk_bytes or i == len(blocks) - 1:
            rows = sum(b[2] for b in group)
            units.append(DocumentUnit(f.kind, f.path, first_doc, rows, group[0][0], group[-1][1], size_bytes=size,
                                      text_field=text_field))
            first_doc += rows
            group = []
    return units


def _parquet_blocks(path: str, field: str) -> list[tuple[int, int, int, int]]:
    """(row group, row group + 1, rows, the column's uncompressed bytes) per row group, from the footer alone."""
    parquet = _open_parquet(path)
    _text_column(path, parquet.schema_arrow, field)
    meta = parquet.metadata
    # A top-level string column is one leaf whose path is its name; the row group's size is the fallback.
    leaf = next((j for j in range(meta.num_columns) if meta.schema.column(j).path == field), None)
    blocks = []
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        size = group.total_byte_size if leaf is None else group.column(leaf).total_uncompressed_size
        blocks.append((i, i + 1, group.num_rows, size))
    return blocks


def _arrow_blocks(path: str, field: str, chunk_bytes: int) -> list[tuple[int, int, int, int]]:
    """(first row, end row, rows, bytes) per record batch, or per equal-row piece of one bigger than a unit.
    Only the batches' metadata and offsets are touched (the file is memory-mapped)."""
    blocks, row = [], 0
    for column in _arrow_columns(path, field):
        n, size = len(column), column.nbytes
        if n:
            pieces = max(1, min(n, -(-size // chunk_bytes)))
            bounds = [row + n * k // pieces for k in range(pieces + 1)]
            blocks.extend((a, b, b - a, size * (b - a) // n) for a, b in zip(bounds, bounds[1:]))
        row += n
    return blocks


def _open_parquet(path: str) -> pq.ParquetFile:
    try:
        # pre_buffer off and a read buffer: column chunks are streamed, not read whole (local files gain nothing
        # from pre-buffering, which coalesces reads for high-latency object stores).
        return pq.ParquetFile(path, buffer_size=_READ_BUFFER_BYTES, pre_buffer=False)
    except (pa.ArrowException, OSError) as exc:
        raise MinillamaError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None


def _arrow_columns(path: str, field: str) -> Iterator[pa.Array]:
    """The text column of an Arrow IPC file (stream or file format), one record batch at a time."""
    try:
        with pa.memory_map(path) as source:
            is_file_format = source.read(len(_ARROW_FILE_MAGIC)) == _ARROW_FILE_MAGIC
            source.seek(0)
            reader = pa.ipc.open_file(source) if is_file_format else pa.ipc.open_stream(source)
            index = _text_column(path, reader.schema, field)
            if is_file_format:
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = iter(reader)
            for batch in batches:
                yield batch.column(index)
    except (pa.ArrowException, OSError) as exc:
        raise MinillamaError(f"{path}: not a readable Arrow IPC file ({_first_line(exc)})") from None


def _text_column(path: str, schema: pa.Schema, field: str) -> int:
    """The index of the string column `field`; a missing or non-string column names the file and what it has."""
    if schema.names.count(field) > 1:
        raise MinillamaError(f"{path}: {schema.names.count(field)} columns are named {field!r}")
    index = schema.get_field_index(field)
    if index < 0:
        raise MinillamaError(f"{path}: no column {field!r}; its columns: {', '.join(schema.names) or 'none'} "
                             "(set text_field for this source)")
    kind = schema.field(index).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise MinillamaError(f"{path}: column {field!r} is {kind}, not a string (set text_field to a string column)")
    return index


# --------------------------------------------------------------------------------------------------------------
# Reading: a unit -> (document index, text) pairs, in a tokenizer worker
# --------------------------------------------------------------------------------------------------------------
def read_table_unit(unit: DocumentUnit) -> list[tuple[int, str]]:
    """The unit's rows as (index, text), nulls as ""; a file changed since it was listed is an error (the
    document indices, and so the validation split, would no longer line up)."""
    texts = _parquet_texts(unit) if unit.kind == "parquet" else _arrow_texts(unit)
    docs = [(unit.first_doc + i, text or "") for i, text in enumerate(texts)]
    if len(docs) != unit.n_docs:
        raise MinillamaError(f"{unit.path}: gave {len(docs)} rows where {unit.n_docs} were listed; did it change "
                             "during preparation?")
    return docs


def _parquet_texts(unit: DocumentUnit) -> Iterator[str | None]:
    parquet = _open_parquet(unit.path)
    try:
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=list(range(unit.start, unit.end)),
                                          columns=[unit.text_field], use_threads=False):
            yield from batch.column(0).to_pylist()
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        raise MinillamaError(f"{unit.path}: row groups {unit.start}-{unit.end - 1} are not readable "
                             f"({_first_line(exc)})") from None
    finally:
        parquet.close()


def _arrow_texts(unit: DocumentUnit) -> Iterator[str | None]:
    row = 0
    with contextlib.closing(_arrow_columns(unit.path, unit.text_field)) as columns:
        for column in columns:
            n = len(column)
            low, high = max(unit.start - row, 0), min(unit.end - row, n)
            for start in range(low, high, BATCH_ROWS):
                try:
                    yield from column.slice(start, min(BATCH_ROWS, high - start)).to_pylist()
                except UnicodeDecodeError as exc:
                    raise MinillamaError(f"{unit.path}: invalid UTF-8 in column {unit.text_field!r} near row "
                                         f"{row + start} ({exc.reason})") from None
            row += n
            if row >= unit.end:
                break


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = ["saved_dataset_files", "table_units", "read_table_unit", "BATCH_ROWS"]
