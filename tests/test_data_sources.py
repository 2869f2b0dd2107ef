"""Table sources for `data prepare`: Parquet files, Arrow IPC files and `datasets` save_to_disk directories."""

import hashlib
import json
import os
import textwrap
import warnings

import datasets  # test extra only: it writes fixtures; the product reads these files with pyarrow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data import TOKENIZER, documents, stream

from minillama.cli import main
from minillama.data import (
    DataConfig,
    DataWarning,
    MixtureLoader,
    SourceConfig,
    load_data_config,
    prepare_data,
    source_texts,
    sources,
    tables,
)
from minillama.data import prepare as prepare_module
from minillama.errors import MinillamaError

datasets.disable_progress_bars()


def texts_for(prefix: str, n: int) -> list[str]:
    """Documents of varied length (and some non-ASCII) so byte counts differ row to row."""
    return [f"{prefix} {i}: " + "naïve words and more words " * (i % 9 + 1) for i in range(n)]


def write_parquet(path, texts, row_group_size=None, **columns) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts, **columns}), path, row_group_size=row_group_size)


def token_stream(texts) -> list[int]:
    """What a training split holds for these documents with val_fraction 0: BOS bytes EOS each, empty ones left out."""
    out = []
    for text in texts:
        if text:
            out += [TOKENIZER.bos_id, *TOKENIZER.encode(text), TOKENIZER.eos_id]
    return out


def prepare(tmp_path, *source_list, out="out", **kwargs):
    cfg = DataConfig(sources=list(source_list), val_fraction=kwargs.pop("val_fraction", 0.0),
                     seed=kwargs.pop("seed", 0))
    return prepare_data(cfg, TOKENIZER, tmp_path / out, progress=False, workers=kwargs.pop("workers", 1), **kwargs)


def shard_hashes(manifest) -> list:
    return [(e["name"], split, [s["sha256"] for s in e[split]["shards"]]) for e in manifest["sources"]
            for split in ("train", "val")]


# --------------------------------------------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------------------------------------------
def test_parquet_file_directory_and_glob(tmp_path):
    root = tmp_path / "hub-download"
    parts = {f"data/train-{k:05d}-of-00003.parquet": texts_for(f"part{k}", 30 + k) for k in range(3)}
    for name, texts in parts.items():
        write_parquet(root / name, texts, row_group_size=8, id=list(range(len(texts))))
    (root / "README.md").write_text("# dataset card: not a document\n")  # what a Hub download holds next to data
    (root / ".gitattributes").write_text("*.parquet filter=lfs\n")
    every = [t for name in sorted(parts) for t in parts[name]]

    name = "data/train-00001-of-00003.parquet"
    one = prepare(tmp_path, SourceConfig(name="file", path=str(root / name)), out="one")
    assert stream(tmp_path / "one", "file", "train").tolist() == token_stream(parts[name])
    assert one["sources"][0]["train"]["documents"] == 31
    prepare(tmp_path, SourceConfig(name="dir", path=str(root)), out="dir")  # README.md and .gitattributes left out
    assert stream(tmp_path / "dir", "dir", "train").tolist() == token_stream(every)
    prepare(tmp_path, SourceConfig(name="glob", path=str(root / "data" / "*.parquet")), out="glob")
    assert stream(tmp_path / "glob", "glob", "train").tolist() == token_stream(every)
    assert list(source_texts([SourceConfig(name="dir", path=str(root))])) == every  # what a tokenizer trains on


def test_parquet_is_read_in_small_batches_and_equals_a_one_shot_read(tmp_path, monkeypatch):
    """A multi-row-group file, cut into several units, read 7 rows at a time: the shards are exactly what reading
    the whole column at once gives, and no batch the reader handed over held more than 7 rows."""
    path = tmp_path / "big.parquet"
    texts = texts_for("row", 400)
    texts[13] = texts[201] = None  # nulls are empty documents
    write_parquet(path, texts, row_group_size=40)
    assert pq.ParquetFile(path).metadata.num_row_groups == 10

    seen = []
    original = pq.ParquetFile.iter_batches

    def spy(self, batch_size=65536, **kwargs):
        for batch in original(self, batch_size=batch_size, **kwargs):
            seen.append((batch_size, batch.num_rows))
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(tables, "BATCH_ROWS", 7)
    monkeypatch.setattr(sources, "UNIT_BYTES", 8 << 10)  # several units of a few row groups each
    units = sources.document_units(sources.resolve_source(SourceConfig(name="t", path=str(path))), "text")
    assert len(units) > 2 and all(u.end - u.start < 10 for u in units)
    assert [u.first_doc for u in units] == [0, *np.cumsum([u.n_docs for u in units])[:-1].tolist()]

    manifest = prepare(tmp_path, SourceConfig(name="t", path=str(path)))
    assert seen and {size for size, _ in seen} == {7} and max(rows for _, rows in seen) <= 7
    assert sum(rows for _, rows in seen) == 400
    one_shot = pq.read_table(path).column("text").to_pylist()
    assert stream(tmp_path / "out", "t", "train").tolist() == token_stream(one_shot)
    assert manifest["sources"][0]["train"]["documents"] == 398


def test_max_mb_stops_after_the_row_group_where_the_cap_falls(tmp_path):
    path = tmp_path / "capped.parquet"
    write_parquet(path, ["x" * 1000] * 100, row_group_size=10)
    group_bytes = pq.ParquetFile(path).metadata.row_group(0).column(0).total_uncompressed_size
    manifest = prepare(tmp_path, SourceConfig(name="c", path=str(path), max_mb=2.5 * group_bytes / 1e6))
    assert manifest["sources"][0]["train"]["documents"] == 30  # row groups 0, 1 and the one the cap falls in


# --------------------------------------------------------------------------------------------------------------
# datasets' save_to_disk directories (Arrow IPC streams)
# --------------------------------------------------------------------------------------------------------------
def test_save_to_disk_dataset_with_big_batches_cut_into_units(tmp_path, monkeypatch):
    texts = texts_for("arrow", 300)
    texts[5] = None
    datasets.Dataset.from_dict({"text": texts, "label": list(range(300))}).save_to_disk(
        str(tmp_path / "ds"), num_shards=3)
    first = next((tmp_path / "ds").glob("*.arrow"))
    with pytest.raises(pa.ArrowInvalid):  # the format save_to_disk writes: an IPC stream, not an IPC file
        pa.ipc.open_file(str(first))
    monkeypatch.setattr(sources, "UNIT_BYTES", 2 << 10)  # smaller than one record batch: batches cut into rows
    monkeypatch.setattr(tables, "BATCH_ROWS", 5)
    files = sources.resolve_source(SourceConfig(name="d", path=str(tmp_path / "ds")))
    assert [os.path.basename(f.path) for f in files] == [f"data-0000{k}-of-00003.arrow" for k in range(3)]
    assert {f.kind for f in files} == {"arrow"}
    units = sources.document_units(files, "text")
    assert len(units) > 3 * 2 and sum(u.n_docs for u in units) == 300
    prepare(tmp_path, SourceConfig(name="d", path=str(tmp_path / "ds")))
    assert stream(tmp_path / "out", "d", "train").tolist() == token_stream(texts)


def test_arrow_ipc_file_format_is_read_too(tmp_path):
    texts = texts_for("ipc", 50)
    with pa.ipc.new_file(str(tmp_path / "t.arrow"), pa.schema([("text", pa.large_string())])) as writer:
        for k in range(0, 50, 20):
            writer.write_batch(pa.record_batch([pa.array(texts[k: k + 20], pa.large_string())], names=["text"]))
    prepare(tmp_path, SourceConfig(name="f", path=str(tmp_path / "t.arrow")))
    assert stream(tmp_path / "out", "f", "train").tolist() == token_stream(texts)


def test_save_to_disk_dataset_dict_reads_one_split(tmp_path):
    train, validation = texts_for("train", 40), texts_for("validation", 12)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train}),
                          "validation": datasets.Dataset.from_dict({"text": validation})}
                         ).save_to_disk(str(tmp_path / "dd"))
    toml = tmp_path / "data.toml"
    toml.write_text(textwrap.dedent(f"""
        [data]
        val_fraction = 0.0
        [[data.sources]]
        name = "default"
        path = "{tmp_path / 'dd'}"
        [[data.sources]]
        name = "held"
        path = "{tmp_path / 'dd'}"
        split = "validation"
    """))
    cfg = load_data_config(toml)
    manifest = prepare_data(cfg, TOKENIZER, tmp_path / "out", progress=False, workers=1)
    assert stream(tmp_path / "out", "default", "train").tolist() == token_stream(train)  # default split: train
    assert stream(tmp_path / "out", "held", "train").tolist() == token_stream(validation)
    assert [e["split"] for e in manifest["sources"]] == [None, "validation"]


# --------------------------------------------------------------------------------------------------------------
# Mixtures: weights, validation split, workers, cache
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture
def mixture(tmp_path):
    """A Parquet directory and a text file, big enough (> 128 KB) for prepare to use two workers."""
    rows = {k: texts_for(f"shard{k}", 700) for k in range(2)}
    for k, texts in rows.items():
        write_parquet(tmp_path / "web" / f"part-{k}.parquet", texts, row_group_size=64)
    (tmp_path / "book.txt").write_text("".join(f"Line {i} of the book, with a little text.\n" for i in range(1500)))
    parquet_texts = rows[0] + rows[1]
    return [SourceConfig(name="web", path=str(tmp_path / "web"), weight=0.7),
            SourceConfig(name="book", path=str(tmp_path / "book.txt"), weight=0.3)], parquet_texts


def test_parquet_mixed_with_text_is_the_same_whatever_the_worker_count(tmp_path, mixture, monkeypatch):
    source_list, parquet_texts = mixture
    monkeypatch.setattr(sources, "UNIT_BYTES", 16 << 10)
    counts = []
    real_count = prepare_module._worker_count
    monkeypatch.setattr(prepare_module, "_worker_count", lambda w, n: counts.append(real_count(w, n)) or counts[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        one = prepare(tmp_path, *source_list, out="one", workers=1, val_fraction=0.1, seed=3, train_tokens=10**6)
        two = prepare(tmp_path, *source_list, out="two", workers=2, val_fraction=0.1, seed=3, train_tokens=10**6)
    assert counts[-1] == 2  # the second run really went through a pool of two
    assert shard_hashes(one) == shard_hashes(two)
    web = {e["name"]: e for e in two["sources"]}["web"]
    assert web["weight"] == pytest.approx(0.7) and web["val_mode"] == "documents"
    assert (web["train"]["documents"], web["val"]["documents"]) == (1260, 140)
    train = documents(stream(tmp_path / "two", "web", "train"))
    val = documents(stream(tmp_path / "two", "web", "val"))
    assert not set(train) & set(val) and sorted(train + val) == sorted(parquet_texts)
    loader = MixtureLoader(tmp_path / "two", seq_len=32, batch_size=8, seed=1)
    assert {row["source"] for step in range(20) for row in loader.describe(step)} == {"web", "book"}


def test_a_changed_parquet_file_is_tokenized_again(tmp_path, mixture):
    source_list, _ = mixture
    first = prepare(tmp_path, *source_list)
    assert not first["cache_hit"] and prepare(tmp_path, *source_list)["cache_hit"]
    write_parquet(tmp_path / "web" / "part-1.parquet", texts_for("changed", 10))
    third = prepare(tmp_path, *source_list)
    assert not third["cache_hit"] and third["sources"][0]["train"]["documents"] == 710


# --------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2, no output left behind
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from minillama.tokenizer import train_bpe_from_texts

    path = tmp_path_factory.mktemp("tok") / "bpe"
    train_bpe_from_texts(texts_for("words", 200), vocab_size=300, out_dir=path)
    return path


def run_prepare(tmp_path, tokenizer_dir, capsys, *inputs, config=None, out="out"):
    args = ["data", "prepare", "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / out), "--no-progress",
            "--workers", "1"]
    args += ["--config", str(config)] if config else ["--input", *map(str, inputs)]
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err.strip()


def corrupt_pages(path):
    """A Parquet file whose footer is fine but whose first page header is garbage: found only while reading."""
    write_parquet(path, texts_for("page", 300), row_group_size=100)
    data = bytearray(path.read_bytes())
    data[4:64] = b"\xff" * 60
    path.write_bytes(bytes(data))


def bad_inputs(tmp_path):
    """(inputs or a TOML config, what the one error line must say) per kind of bad input."""
    pq.write_table(pa.table({"body": ["a document"], "id": [1]}), tmp_path / "body.parquet")
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not really parquet")
    corrupt_pages(tmp_path / "pages.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["t"]}),
                          "validation": datasets.Dataset.from_dict({"text": ["v"]})}).save_to_disk(str(tmp_path / "dd"))
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": ["v"]})}).save_to_disk(
        str(tmp_path / "dd-no-train"))
    config = tmp_path / "split.toml"
    config.write_text(f'[[data.sources]]\nname = "d"\npath = "{tmp_path / "dd"}"\nsplit = "test"\n')
    return {
        "missing column": ([tmp_path / "body.parquet"], ["body.parquet", "no column 'text'", "its columns: body, id"]),
        "non-string column": ([tmp_path / "ints.parquet"], ["ints.parquet", "column 'text' is int64, not a string"]),
        "corrupt footer": ([tmp_path / "broken.parquet"], ["broken.parquet", "not a readable Parquet file"]),
        "corrupt pages": ([tmp_path / "pages.parquet"], ["pages.parquet", "row groups 0-2 are not readable"]),
        "unknown split": (config, ["has no split 'test'", "its splits: train, validation"]),
        "no train split": ([tmp_path / "dd-no-train"], ["has no split 'train'", "its splits: validation"]),
        "empty glob": ([tmp_path / "nothing-*.parquet"], ["no files match", "nothing-*.parquet"]),
        "hub name": (["HuggingFaceFW/fineweb"], ["HuggingFaceFW/fineweb is not a local path", "hf download",
                                                 "save_to_disk(DIR)"]),
    }


def test_bad_table_input_through_the_cli(tmp_path, tokenizer_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "HuggingFaceFW" must not exist as a directory here
    cases = bad_inputs(tmp_path)
    for case, (inputs, expected) in cases.items():
        config = inputs if not isinstance(inputs, list) else None
        code, err = run_prepare(tmp_path, tokenizer_dir, capsys, *(inputs if config is None else []), config=config)
        assert code == 2, case
        assert len(err.splitlines()) == 1 and err.startswith("minillama: error: "), (case, err)
        for part in expected:
            assert part in err, (case, err)
        assert not (tmp_path / "out").exists(), case
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], case  # no temporary left


def test_a_failed_prepare_leaves_the_previous_output_intact(tmp_path, tokenizer_dir, capsys):
    write_parquet(tmp_path / "good.parquet", texts_for("good", 50))
    corrupt_pages(tmp_path / "pages.parquet")
    toml = tmp_path / "data.toml"
    toml.write_text(f'[[data.sources]]\nname = "s"\npath = "{tmp_path / "good.parquet"}"\n')
    assert run_prepare(tmp_path, tokenizer_dir, capsys, config=toml)[0] == 0
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    toml.write_text(f'[[data.sources]]\nname = "s"\npath = "{tmp_path / "pages.parquet"}"\n')
    code, err = run_prepare(tmp_path, tokenizer_dir, capsys, config=toml)
    assert code == 2 and "pages.parquet: row groups 0-2 are not readable" in err
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert after == before


def test_cli_prepares_parquet_and_inspects_it(tmp_path, tokenizer_dir, capsys):
    write_parquet(tmp_path / "web" / "a.parquet", texts_for("inspect me", 80), row_group_size=16)
    code, err = run_prepare(tmp_path, tokenizer_dir, capsys, tmp_path / "web")
    assert code == 0, err
    assert main(["data", "inspect", str(tmp_path / "out"), "--step", "0", "--seq-len", "16", "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("batch 0 of") and "web" in printed and "words" in printed


def test_paths_and_split_that_cannot_be_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(MinillamaError, match="data path not found: data/train"):  # a typo, not a Hub name
        prepare(tmp_path, SourceConfig(name="s", path="data/train"))
    with pytest.raises(MinillamaError, match="data path not found: owner/notes.txt"):  # a file name, not a Hub name
        prepare(tmp_path, SourceConfig(name="s", path="owner/notes.txt"))
    with pytest.raises(MinillamaError, match="hf://datasets/org/set is not a local path.*--repo-type dataset org/set"):
        prepare(tmp_path, SourceConfig(name="s", path="hf://datasets/org/set"))
    write_parquet(tmp_path / "a.parquet", ["text"])
    with pytest.raises(MinillamaError, match="split = 'train' is set, but none of its paths is a DatasetDict"):
        prepare(tmp_path, SourceConfig(name="s", path=str(tmp_path / "a.parquet"), split="train"))
    datasets.Dataset.from_dict({"text": ["a"]}).save_to_disk(str(tmp_path / "single"))
    with pytest.raises(MinillamaError, match="single Dataset saved with save_to_disk, not a DatasetDict"):
        prepare(tmp_path, SourceConfig(name="s", path=str(tmp_path / "single"), split="train"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]}),
                          "test": datasets.Dataset.from_dict({"text": ["b"]})}).save_to_disk(
        str(tmp_path / "above" / "dd"))
    with pytest.raises(MinillamaError, match="dd is a DatasetDict saved with save_to_disk; give it as a path"):
        prepare(tmp_path, SourceConfig(name="s", path=str(tmp_path / "above")))
    (tmp_path / "single" / "state.json").write_text(json.dumps({"_data_files": []}))
    with pytest.raises(MinillamaError, match="state.json: lists no data files"):
        prepare(tmp_path, SourceConfig(name="s", path=str(tmp_path / "single")))
