"""What a data mixture is made of: the `[data]` config, and turning each source's paths into documents.

A source is a named set of files with a sampling weight. Paths are files, directories (every non-hidden file
below, recursively) or globs, resolved relative to the current directory; `python:docs` and `python:source` name
the running Python installation's own documentation and library (see `stdlib.py`). A `.jsonl` file holds one
document per line (the string under `text_field`); any other file is one document.

Tables (read with pyarrow in batches, see `tables.py`): a `.parquet` file, or an `.arrow` file (Arrow IPC), holds
one document per row, in the string column named by `text_field`; a null is an empty document. A directory that
holds any `.parquet` or `.arrow` file is read for those only (a Hub download's README.md is not data). A directory
written by the `datasets` library's `save_to_disk` is read as that dataset: a `Dataset` directory (`state.json`)
whole, a `DatasetDict` directory (`dataset_dict.json`) for one split, `split` (default "train"). Nothing is
downloaded: a path that looks like a Hub dataset name ("owner/name") and is not on disk is an error that says how
to download it. The `[[data.sources]]` keys:

    name        letters, digits, "_", ".", "-"; part of the shard file names
    path        a file, directory or glob, or a list of them
    weight      share of training tokens (relative)
    epochs      a cap on the epochs the weight implies, or with no weights anywhere the weights' source
    text_field  the JSONL field / table column with the text (default "text")
    split       the split of a DatasetDict directory to read (default "train"; only for DatasetDict paths)
    max_mb      cap on the input bytes read, in file order; the file where it falls is cut at a line end (text,
                JSONL) or after the Parquet row group / Arrow record batch where its text reaches the bytes left

Resolution happens in two steps so that preparing data can decide it is a cache hit before reading anything:
`resolve_source` lists the files (cheap: names, sizes and mtimes), and `document_units` splits them into the
units that worker processes turn into documents (one file, a line-aligned byte range of a `.jsonl`, a run of
Parquet row groups, a range of Arrow rows, one module's docstrings, one pydoc topic). The readers at the bottom
run inside the workers.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minillama.config import build_dataclass, read_toml
from minillama.errors import MinillamaError

PYTHON_DOCS = "python:docs"
PYTHON_SOURCE = "python:source"
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
TABLE_KINDS = {".parquet": "parquet", ".arrow": "arrow"}  # suffix -> SourceFile kind (read by tables.py)
UNIT_BYTES = 8 << 20  # input bytes per DocumentUnit: big enough to amortise a worker task, small enough to hold
# A Hub dataset id, "owner/name" (hf://datasets/ optional): what a user pastes from the Hub's page.
_HUB_NAME = re.compile(r"(hf://datasets/)?[A-Za-z0-9][\w.-]*/[\w.-]+")
_FILE_SUFFIXES = {".txt", ".md", ".rst", ".jsonl", ".json", ".parquet", ".arrow", ".csv", ".py", ".gz", ".zst"}


class DataWarning(UserWarning):
    """Input that was used but is not quite right (invalid UTF-8, a binary file skipped, an epoch cap exceeded)."""


@dataclass
class SourceConfig:
    """One source of a mixture.

    `weight` is the source's share of training tokens (weights are relative: they are normalised to sum to 1).
    `epochs` is a cap: with no weights anywhere, weights come from tokens x epochs (LLaMA Table 1 lists both;
    the epochs follow from the weights and the token budget); next to a weight it is only checked against the
    epochs the weight implies for `train_tokens`. `max_mb` caps the input bytes read, in file order.
    """

    name: str
    path: str | list[str]
    weight: float | None = None
    epochs: float | None = None
    text_field: str = "text"
    max_mb: float | None = None
    split: str | None = None

    def __post_init__(self) -> None:
        if not _NAME_PATTERN.fullmatch(self.name):
            # The name becomes part of shard file names, so it must be a plain file-name fragment.
            raise MinillamaError(f"source name {self.name!r} must be letters, digits, '_', '.' or '-'")
        if isinstance(self.path, str):
            self.path = [self.path]
        if not self.path or not all(isinstance(p, str) and p.strip() for p in self.path):
            raise MinillamaError(f"source {self.name!r}: path must be a non-empty string or list of strings")
        if self.split is not None and not _NAME_PATTERN.fullmatch(self.split):
            raise MinillamaError(f"source {self.name!r}: split {self.split!r} must be a split name like 'train'")
        for key in ("weight", "epochs", "max_mb"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise MinillamaError(f"source {self.name!r}: {key} must be > 0, got {value}")

    @property
    def paths(self) -> list[str]:
        return list(self.path)


@dataclass
class DataConfig:
    """The `[data]` table: sources, the validation hold-out, and the token budget the epochs are reported for.

    `val_fraction` is held out per source, by document: round(n_documents x val_fraction) documents chosen by a
    permutation seeded with `seed` and the source name. A source with too few documents for that (say one big
    text file) instead holds out the last `val_fraction` of each document, cut at a line start: tinyshakespeare's
    conventional last 10%.
    """

    sources: list[SourceConfig] = field(default_factory=list)
    val_fraction: float = 0.01
    seed: int = 0
    train_tokens: int | None = None

    def __post_init__(self) -> None:
        if not self.sources:
            raise MinillamaError("data.sources is empty: give at least one [[data.sources]] with a name and path")
        names = [s.name for s in self.sources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise MinillamaError(f"data.sources: duplicate source name(s) {', '.join(duplicates)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise MinillamaError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.train_tokens is not None and self.train_tokens <= 0:
            raise MinillamaError(f"data.train_tokens must be positive, got {self.train_tokens}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "sources": [dict(name=s.name, path=s.paths, weight=s.weight, epochs=s.epochs, text_field=s.text_field,
                             max_mb=s.max_mb, split=s.split) for s in self.sources],
            "val_fraction": self.val_fraction, "seed": self.seed, "train_tokens": self.train_tokens,
        }


def data_config_from_table(table: dict[str, Any], prefix: str = "data") -> DataConfig:
    """A `[data]` table (with `[[data.sources]]`) -> DataConfig; unknown keys and wrong types name the key."""
    if not isinstance(table, dict):
        raise MinillamaError(f"{prefix} must be a table, got {table!r}")
    return build_dataclass(DataConfig, table, prefix)


def load_data_config(path: str | Path) -> DataConfig:
    """Read the `[data]` table of a TOML file (a data-only file or a whole run config)."""
    table = read_toml(path)
    if "data" not in table:
        raise MinillamaError(f"{path}: no [data] table (expected [[data.sources]] entries)")
    return data_config_from_table(table["data"])


def data_config_from_paths(paths: list[str], val_fraction: float = 0.01, seed: int = 0,
                           train_tokens: int | None = None) -> DataConfig:
    """One unweighted source per path, named after the file: the `--input`/`--data PATH` shortcut."""
    sources, used = [], set()
    for path in paths:
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path.rstrip("/")).stem or "data").lstrip("._-") or "data"
        if path in (PYTHON_DOCS, PYTHON_SOURCE):
            stem = path.replace(":", "-")
        name, k = stem, 2
        while name in used:
            name, k = f"{stem}-{k}", k + 1
        used.add(name)
        sources.append(SourceConfig(name=name, path=path))
    return DataConfig(sources=sources, val_fraction=val_fraction, seed=seed, train_tokens=train_tokens)


# --------------------------------------------------------------------------------------------------------------
# Resolution: paths -> files (cheap) -> document units (what a worker reads)
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceFile:
    """One input of a source. kind: "text" (one document), "jsonl" (one per line), "parquet" / "arrow" (one per
    row), "docstrings" (one module's docstrings), "topic" (one pydoc topic; `path` is pydoc_data/topics.py and
    `key` the topic). `limit_bytes` is set on the file where the source's max_mb runs out."""

    kind: str
    path: str
    size_bytes: int
    mtime_ns: int
    key: str = ""
    limit_bytes: int | None = None

    def stat_key(self) -> list[Any]:
        return [self.kind, self.path, self.size_bytes, self.mtime_ns, self.key, self.limit_bytes]


@dataclass(frozen=True)
class DocumentUnit:
    """A piece of work for a tokenizer worker: documents [first_doc, first_doc + n_docs) of a source."""

    kind: str
    path: str
    first_doc: int
    n_docs: int
    start: int = 0  # byte range for jsonl, row groups for parquet, rows for arrow: [start, end)
    end: int = -1
    key: str = ""
    size_bytes: int = 0
    text_field: str = "text"


def _stat(path: Path, kind: str, key: str = "") -> SourceFile:
    st = path.stat()
    return SourceFile(kind=kind, path=str(path), size_bytes=st.st_size, mtime_ns=st.st_mtime_ns, key=key)


def _expand_path(spec: str, source: SourceConfig, dataset_dicts: list[Path]) -> list[Path]:
    """A file, a directory (recursive, hidden entries skipped; only its tables if it holds any; a `save_to_disk`
    directory's data files) or a glob -> sorted files. Errors name the path. DatasetDict directories read are
    appended to `dataset_dicts` (so a `split` that none of the paths uses can be reported)."""
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        return [path]
    if path.is_dir():
        if _is_saved_dataset(path):
            from minillama.data import tables

            files = tables.saved_dataset_files(path, source.split, source.name)
            if (path / "dataset_dict.json").is_file():
                dataset_dicts.append(path)
            return files
        files = []
        for directory, subdirs, names in os.walk(path):
            subdirs[:] = [d for d in subdirs if not d.startswith(".")]  # .git and friends are not text
            if "dataset_dict.json" in names:
                # Walking into it would read every split, validation and test included, as training text.
                raise MinillamaError(f"source {source.name!r}: {directory} is a DatasetDict saved with save_to_disk;"
                                     " give it as a path of its own (with split) instead of a directory above it")
            files.extend(Path(directory) / n for n in names if not n.startswith("."))
        files = sorted(f for f in files if f.is_file())
        if not files:
            raise MinillamaError(f"source {source.name!r}: directory {spec} holds no files")
        tables_found = [f for f in files if f.suffix in TABLE_KINDS]
        return tables_found or files
    if glob.has_magic(spec):
        matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(spec), recursive=True))
        files: list[Path] = []
        for match in matches:
            files.extend(_expand_path(str(match), source, dataset_dicts) if match.is_dir() else [match])
        if not files:
            raise MinillamaError(f"source {source.name!r}: no files match {spec}")
        return files
    if _looks_like_hub_name(spec):
        name = spec.removeprefix("hf://datasets/")
        raise MinillamaError(f"source {source.name!r}: {spec} is not a local path; minillama reads no network, so "
                             f"download the Hub dataset first (hf download --repo-type dataset {name} --local-dir "
                             f"DIR, or datasets.load_dataset({name!r}).save_to_disk(DIR)) and set path to DIR")
    raise MinillamaError(f"source {source.name!r}: data path not found: {spec}")


def _is_saved_dataset(path: Path) -> bool:
    """A directory written by datasets' save_to_disk: a DatasetDict, or a Dataset (state.json + dataset_info.json)."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def _looks_like_hub_name(spec: str) -> bool:
    """An "owner/name" with no file suffix whose "owner" is not a local directory (that is a mistyped path)."""
    if spec.startswith("hf://"):
        return True
    return (bool(_HUB_NAME.fullmatch(spec)) and Path(spec).suffix.lower() not in _FILE_SUFFIXES
            and not Path(spec.split("/")[0]).exists())


def _file_kind(path: Path) -> str:
    return "jsonl" if path.suffix == ".jsonl" else TABLE_KINDS.get(path.suffix, "text")


def resolve_source(source: SourceConfig) -> list[SourceFile]:
    """List a source's inputs in a deterministic order, applying its max_mb cap by input bytes."""
    from minillama.data import stdlib

    files: list[SourceFile] = []
    dataset_dicts: list[Path] = []
    for spec in source.paths:
        if spec == PYTHON_DOCS:
            files.extend(SourceFile(kind, path, size, mtime, key) for kind, path, size, mtime, key
                         in stdlib.python_docs_inputs())
        elif spec == PYTHON_SOURCE:
            # With max_mb set, _cap_files below applies it (cutting the last file at a line end).
            cap = None if source.max_mb is not None else stdlib.DEFAULT_SOURCE_MB
            files.extend(_stat(p, "text") for p in stdlib.python_source_files(max_mb=cap))
        elif spec.startswith("python:"):
            raise MinillamaError(f"source {source.name!r}: unknown path {spec!r}; known: {PYTHON_DOCS}, "
                                 f"{PYTHON_SOURCE}")
        else:
            files.extend(_stat(p, _file_kind(p)) for p in _expand_path(spec, source, dataset_dicts))
    if source.split is not None and not dataset_dicts:
        raise MinillamaError(f"source {source.name!r}: split = {source.split!r} is set, but none of its paths is a "
                             "DatasetDict directory (one with dataset_dict.json); remove split")
    if source.max_mb is not None:
        files = _cap_files(files, int(source.max_mb * 1e6))
    if sum(f.size_bytes for f in files) == 0:
        raise MinillamaError(f"source {source.name!r}: every file is empty ({', '.join(source.paths)})")
    return files


def _cap_files(files: list[SourceFile], cap_bytes: int) -> list[SourceFile]:
    """Files in order until `cap_bytes` of input; the file that crosses the cap is read only up to it."""
    kept, total = [], 0
    for f in files:
        if total >= cap_bytes:
            break
        if total + f.size_bytes > cap_bytes and f.kind in ("text", "jsonl", *TABLE_KINDS.values()):
            f = SourceFile(f.kind, f.path, f.size_bytes, f.mtime_ns, f.key, limit_bytes=cap_bytes - total)
        kept.append(f)
        total += f.size_bytes if f.limit_bytes is None else f.limit_bytes
    return kept


def document_units(files: list[SourceFile], text_field: str, chunk_bytes: int | None = None) -> list[DocumentUnit]:
    """Split files into units of about `chunk_bytes` (default UNIT_BYTES) with document indices. Counting
    `.jsonl` lines needs one pass over those files, and tables their metadata (and the column's type, checked
    here so a wrong text_field fails before any output is written), which is why this runs only after the cache
    check."""
    chunk_bytes = UNIT_BYTES if chunk_bytes is None else chunk_bytes
    units, n_docs = [], 0
    for f in files:
        if f.kind == "jsonl":
            for start, end, lines in _jsonl_ranges(Path(f.path), chunk_bytes, f.limit_bytes):
                units.append(DocumentUnit("jsonl", f.path, n_docs, lines, start, end, size_bytes=end - start,
                                          text_field=text_field))
                n_docs += lines
        elif f.kind in TABLE_KINDS.values():
            from minillama.data import tables

            for unit in tables.table_units(f, text_field, n_docs, chunk_bytes):
                units.append(unit)
                n_docs += unit.n_docs
        else:
            size = f.size_bytes if f.limit_bytes is None else f.limit_bytes
            units.append(DocumentUnit(f.kind, f.path, n_docs, 1, 0, size if f.kind == "text" else -1, key=f.key,
                                      size_bytes=size))
            n_docs += 1
    return units


def _jsonl_ranges(path: Path, chunk_bytes: int, limit: int | None) -> list[tuple[int, int, int]]:
    """Line-aligned byte ranges (start, end, number of lines) of about `chunk_bytes` each. A last line without
    a newline counts, unless max_mb cut the file inside it."""
    file_size = path.stat().st_size
    size = file_size if limit is None else min(limit, file_size)
    ranges, start, pos, lines, last_newline = [], 0, 0, 0, -1
    with open(path, "rb") as f:
        while pos < size:
            block = f.read(min(chunk_bytes, size - pos))
            if not block:
                break
            cut = block.rfind(b"\n")
            if cut >= 0:
                last_newline = pos + cut
            lines += block.count(b"\n")
            if pos + len(block) - start >= chunk_bytes and cut >= 0:
                ranges.append((start, pos + cut + 1, lines))
                start, lines = pos + cut + 1, 0
            pos += len(block)
    if start < pos:
        if size == file_size and last_newline < pos - 1:
            ranges.append((start, pos, lines + 1))
        elif last_newline >= start:
            ranges.append((start, last_newline + 1, lines))
    return ranges


# --------------------------------------------------------------------------------------------------------------
# Readers: a unit -> (document index, text) pairs. These run in the tokenizer workers.
# --------------------------------------------------------------------------------------------------------------
_SURROGATE_ESCAPES = re.compile("[\udc80-\udcff]")


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """Decode UTF-8, replacing each invalid byte with U+FFFD; return the text and the number of invalid bytes.

    `surrogateescape` maps each undecodable byte to one lone surrogate, so counting them counts bytes exactly
    (errors="replace" would merge some runs into one U+FFFD)."""
    text = raw.decode("utf-8", errors="surrogateescape")
    bad = len(_SURROGATE_ESCAPES.findall(text)) if not raw.isascii() else 0
    if bad:
        text = _SURROGATE_ESCAPES.sub("\ufffd", text)
    if text.startswith("\ufeff"):
        text = text[1:]  # a byte-order mark is encoding noise, not content
    return text, bad


def read_unit(unit: DocumentUnit) -> tuple[list[tuple[int, str]], int, str | None]:
    """The documents of a unit as (index, text), the number of invalid UTF-8 bytes, and a reason if skipped."""
    from minillama.data import stdlib

    if unit.kind == "text":
        with open(unit.path, "rb") as f:
            raw = f.read(unit.end) if unit.end >= 0 else f.read()
        if unit.end >= 0 and unit.end < os.path.getsize(unit.path):
            raw = raw[: raw.rfind(b"\n") + 1]  # max_mb ended inside this file: stop at a line end
        if b"\x00" in raw[:8192]:
            # Git's heuristic for binary files: a NUL byte near the start. Tokenizing an image is never wanted.
            return [], 0, "binary file (NUL byte), skipped"
        text, bad = decode_utf8(raw)
        return [(unit.first_doc, text)], bad, None
    if unit.kind == "jsonl":
        with open(unit.path, "rb") as f:
            f.seek(unit.start)
            raw = f.read(unit.end - unit.start)
        text, bad = decode_utf8(raw)
        lines = text.split("\n")  # not splitlines(): JSON strings may hold a raw U+2028
        if lines and lines[-1] == "" and text.endswith("\n"):
            lines.pop()
        docs = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            where = f"{unit.path}:{unit.first_doc + i + 1}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MinillamaError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict) or unit.text_field not in record:
                raise MinillamaError(f"{where}: no field {unit.text_field!r} (set text_field for this source)")
            value = record[unit.text_field]
            if not isinstance(value, str):
                raise MinillamaError(f"{where}: field {unit.text_field!r} is {type(value).__name__}, not a string")
            docs.append((unit.first_doc + i, value))
        return docs, bad, None
    if unit.kind in TABLE_KINDS.values():
        from minillama.data import tables

        return tables.read_table_unit(unit), 0, None
    if unit.kind == "docstrings":
        return [(unit.first_doc, stdlib.module_documentation(Path(unit.path)))], 0, None
    if unit.kind == "topic":
        return [(unit.first_doc, stdlib.pydoc_topic(unit.key))], 0, None
    raise ValueError(f"unknown unit kind {unit.kind}")


def first_chars(texts: Iterable[str], max_chars: int | None) -> Iterator[str]:
    """`texts` as they come, stopping after the one that brings the total to `max_chars` (None: all of them)."""
    total = 0
    for text in texts:
        yield text
        total += len(text)
        if max_chars is not None and total >= max_chars:
            return


def source_texts(sources: DataConfig | list[SourceConfig], max_chars: int | None = None) -> Iterator[str]:
    """Every document of the sources as text, in order, in this process, validation split included; stops once
    `max_chars` are given. To train a tokenizer use `prepare.training_texts`, which leaves the validation out."""
    if isinstance(sources, DataConfig):
        sources = sources.sources
    texts = (text for source in sources for unit in document_units(resolve_source(source), source.text_field)
             for _, text in read_unit(unit)[0] if text)
    return first_chars(texts, max_chars)


__all__ = ["SourceConfig", "source_texts", "first_chars", "DataConfig", "DataWarning", "data_config_from_table",
           "load_data_config", "data_config_from_paths", "resolve_source", "document_units", "read_unit", "decode_utf8",
           "PYTHON_DOCS", "PYTHON_SOURCE", "TABLE_KINDS"]
