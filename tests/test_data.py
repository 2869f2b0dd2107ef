"""Data: prepare (shards, manifest, cache, validation split), the deterministic mixture loader, bad input, CLI."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from minillama.cli import main
from minillama.data import (
    IGNORE_INDEX,
    DataConfig,
    DataWarning,
    MixtureLoader,
    SourceConfig,
    data_config_from_table,
    load_data_config,
    prepare_data,
    read_manifest,
    source_texts,
    split_tail,
    stdlib,
)
from minillama.data.loader import MixtureSchedule, floor_sum, permute
from minillama.errors import MinillamaError


class ByteTokenizer:
    """A stand-in with the tokenizer interface: id = UTF-8 byte + 3; 1 = BOS, 2 = EOS. Exact byte counts make
    expected token counts trivial (tokens = bytes + 2 per document)."""

    bos_id, eos_id = 1, 2

    def __init__(self, vocab_size: int = 259, tag: str = "v1"):
        self.vocab_size = vocab_size
        self.fingerprint = f"bytes-{tag}-{vocab_size}"

    def encode(self, text, bos=False, eos=False):
        return [1] * bos + [b + 3 for b in text.encode("utf-8")] + [2] * eos

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")

    def save(self, directory):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "bytes.json").write_text(json.dumps({"fingerprint": self.fingerprint}))


TOKENIZER = ByteTokenizer()
WEIGHTS = {"essays": 0.5, "records": 0.3, "play": 0.2}


def make_corpus(root: Path) -> dict[str, object]:
    """Three sources of each kind: a directory of .txt files, a .jsonl, and one long file (tail validation)."""
    essays = root / "essays"
    essays.mkdir(parents=True)
    for i in range(40):
        (essays / f"essay{i:02d}.txt").write_text(f"Essay {i}.\n" + f"Sentence {i} of many, with words. " * (20 + i))
    records = root / "records.jsonl"
    lines = [json.dumps({"text": f"record {i}: " + "données " * (i % 7 + 3), "id": i}) for i in range(200)]
    records.write_text("\n".join(lines) + "\n")
    play = root / "play.md"
    play.write_text("".join(f"LINE {i}: To be, or not to be, that is the question.\n" for i in range(400)))
    return {"essays": essays, "records": records, "play": play}


def corpus_config(paths: dict[str, object], **kwargs) -> DataConfig:
    sources = [SourceConfig(name=n, path=str(paths[n]), weight=WEIGHTS[n]) for n in WEIGHTS]
    return DataConfig(sources=sources, val_fraction=kwargs.pop("val_fraction", 0.1), **kwargs)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return make_corpus(root)


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "data"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # clean input must not warn
        prepare_data(corpus_config(corpus, train_tokens=100_000), TOKENIZER, out, workers=2, progress=False)
    return out


def stream(data_dir: Path, source: str, split: str) -> np.ndarray:
    manifest = read_manifest(data_dir)
    entry = next(e for e in manifest["sources"] if e["name"] == source)
    parts = [np.fromfile(data_dir / s["file"], dtype=manifest["dtype"]) for s in entry[split]["shards"]]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def documents(tokens: np.ndarray) -> list[str]:
    """Split a BOS text EOS ... stream back into document texts."""
    docs, current = [], []
    for t in tokens.tolist():
        if t == 2:
            docs.append(TOKENIZER.decode(current))
            current = []
        elif t != 1:
            current.append(t)
    return docs


# --------------------------------------------------------------------------------------------------------------
# The arithmetic under the loader
# --------------------------------------------------------------------------------------------------------------
def test_floor_sum_matches_brute_force():
    rng = np.random.default_rng(0)
    for n, m, a, b in rng.integers(0, 60, size=(500, 4)).tolist():
        m += 1
        assert floor_sum(n, m, a, b) == sum((a * i + b) // m for i in range(n))


def test_schedule_counts_match_a_scan_and_stay_near_exact_shares():
    schedule = MixtureSchedule([0.5, 0.3, 0.2], seed=3)
    sources = [schedule.source_of(g) for g in range(5000)]
    counts = np.zeros(3)
    for g, j in enumerate(sources):
        if g % 997 == 0:
            assert schedule.counts_before(g) == counts.tolist()
        counts[j] += 1
        # low discrepancy: every prefix within a few sequences of its exact share
        assert np.abs(counts - (g + 1) * np.array([0.5, 0.3, 0.2])).max() < 4


@pytest.mark.parametrize("n", [1, 2, 3, 10, 257, 1000])
def test_permute_is_a_bijection(n):
    assert sorted(permute(i, n, key=42) for i in range(n)) == list(range(n))


# --------------------------------------------------------------------------------------------------------------
# prepare: shards and manifest
# --------------------------------------------------------------------------------------------------------------
def test_manifest_counts_and_sha256(prepared, corpus):
    manifest = read_manifest(prepared)
    assert manifest["dtype"] == "uint16" and manifest["document_format"] == "BOS text EOS"
    assert manifest["tokenizer"]["fingerprint"] == TOKENIZER.fingerprint
    assert (prepared / "tokenizer" / "bytes.json").is_file()
    entries = {e["name"]: e for e in manifest["sources"]}
    assert list(entries) == list(WEIGHTS)
    for name, entry in entries.items():
        for split in ("train", "val"):
            s = entry[split]
            # byte tokenizer: every byte one token, plus BOS and EOS per document
            assert s["tokens"] == s["bytes"] + 2 * s["documents"]
            for shard in s["shards"]:
                assert hashlib.sha256((prepared / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
        assert entry["weight"] == pytest.approx(WEIGHTS[name])
        assert entry["tokens_per_epoch"] == entry["train"]["tokens"]
        assert entry["epochs"] == pytest.approx(100_000 * WEIGHTS[name] / entry["train"]["tokens"])
    essays = entries["essays"]
    assert (essays["train"]["documents"], essays["val"]["documents"], essays["val_mode"]) == (36, 4, "documents")
    assert essays["train"]["bytes"] + essays["val"]["bytes"] == sum(
        p.stat().st_size for p in corpus["essays"].iterdir())
    assert entries["records"]["val"]["documents"] == 20
    assert entries["play"]["val_mode"] == "tail"
    totals = manifest["totals"]
    assert manifest["bytes_per_token"]["val"] == pytest.approx(totals["val"]["bytes"] / totals["val"]["tokens"])


def test_worker_count_does_not_change_the_shards(prepared, corpus, tmp_path):
    manifest = prepare_data(corpus_config(corpus), TOKENIZER, tmp_path / "one", workers=1, progress=False)
    again = read_manifest(prepared)
    for a, b in zip(manifest["sources"], again["sources"]):
        assert a["train"]["shards"] == b["train"]["shards"] and a["val"]["shards"] == b["val"]["shards"]


def test_small_shards_and_uint32(corpus, tmp_path):
    cfg = corpus_config(corpus)
    manifest = prepare_data(cfg, ByteTokenizer(vocab_size=70_000), tmp_path / "d", progress=False,
                            shard_tokens=1000, workers=1)
    assert manifest["dtype"] == "uint32"
    essays = manifest["sources"][0]["train"]
    assert len(essays["shards"]) > 3 and all(s["tokens"] == 1000 for s in essays["shards"][:-1])
    loader = MixtureLoader(tmp_path / "d", seq_len=300, batch_size=4)  # windows cross shard boundaries
    reference = np.concatenate([np.fromfile(tmp_path / "d" / s["file"], np.uint32) for s in essays["shards"]])
    for row, inputs in zip(loader.describe(3), loader.batch(3)[0]):
        if row["source"] == "essays":
            assert inputs.tolist() == reference[row["offset"]: row["offset"] + 300].tolist()


def test_cache_hit_skips_tokenizing_and_updates_the_mixture(corpus, tmp_path):
    out = tmp_path / "d"
    first = prepare_data(corpus_config(corpus), TOKENIZER, out, progress=False, workers=1)
    assert not first["cache_hit"]
    shard = out / first["sources"][0]["train"]["shards"][0]["file"]
    mtime = shard.stat().st_mtime_ns
    cfg = corpus_config(corpus)
    cfg.sources[0].weight = 2.0
    second = prepare_data(cfg, TOKENIZER, out, progress=False)
    assert second["cache_hit"] and shard.stat().st_mtime_ns == mtime
    assert read_manifest(out)["sources"][0]["weight"] == pytest.approx(2.0 / 2.5)
    os.utime(corpus["play"])  # a changed input (new mtime) is tokenized again
    third = prepare_data(corpus_config(corpus), TOKENIZER, out, progress=False, workers=1)
    assert not third["cache_hit"]
    fourth = prepare_data(corpus_config(corpus), ByteTokenizer(tag="v2"), out, progress=False, workers=1)
    assert not fourth["cache_hit"] and read_manifest(out)["tokenizer"]["fingerprint"] == "bytes-v2-259"


def test_weights_from_epochs_and_mixed_weights(corpus, tmp_path):
    sources = [SourceConfig(name="essays", path=str(corpus["essays"]), epochs=2.0),
               SourceConfig(name="play", path=str(corpus["play"]))]
    manifest = prepare_data(DataConfig(sources=sources, val_fraction=0.1), TOKENIZER, tmp_path / "d",
                            progress=False, workers=1)
    essays, play = (e["train"]["tokens"] for e in manifest["sources"])
    assert manifest["sources"][0]["weight"] == pytest.approx(2 * essays / (2 * essays + play))
    mixed = [SourceConfig(name="essays", path=str(corpus["essays"]), weight=1.0),
             SourceConfig(name="play", path=str(corpus["play"]), epochs=2.0)]
    with pytest.raises(MinillamaError, match="play have no weight"):
        prepare_data(DataConfig(sources=mixed), TOKENIZER, tmp_path / "e", progress=False, workers=1)
    cfg = DataConfig(sources=mixed, val_fraction=0.1, train_tokens=10 * play)
    manifest = prepare_data(cfg, TOKENIZER, tmp_path / "e", progress=False, workers=1)
    assert manifest["sources"][1]["weight"] == pytest.approx(0.2, rel=0.02)
    assert manifest["sources"][1]["epochs"] == pytest.approx(2.0, rel=0.02)


def test_source_texts_for_tokenizer_training(corpus):
    texts = list(source_texts(corpus_config(corpus)))
    assert len(texts) == 40 + 200 + 1 and texts[-1] == corpus["play"].read_text()
    assert sum(map(len, source_texts(corpus_config(corpus), max_chars=5000))) < 7000


def test_training_texts_are_exactly_the_prepared_training_split(corpus, prepared):
    """What a run's tokenizer trains on: the documents of the training shards, none of the validation split."""
    from minillama.data import training_texts

    cfg = corpus_config(corpus, train_tokens=100_000)
    for source in cfg.sources:
        ids = stream(prepared, source.name, "train")
        documents = [TOKENIZER.decode(doc) for doc in np.split(ids, np.flatnonzero(ids == 2) + 1) if doc.size]
        texts = list(training_texts(DataConfig(sources=[source], val_fraction=cfg.val_fraction, seed=cfg.seed)))
        assert sorted(texts) == sorted(documents), source.name
    play = corpus["play"].read_text()
    assert list(training_texts(DataConfig(sources=[cfg.sources[2]], val_fraction=0.1)))[-1] == split_tail(play, 0.1)[0]
    assert sum(map(len, training_texts(cfg, max_chars=5000))) < 7000


def test_invalid_utf8_is_counted_and_reported(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"good text\n" * 50 + b"\xff\xfe broken \xc3\n")
    cfg = DataConfig(sources=[SourceConfig(name="bad", path=str(tmp_path / "bad.txt"))], val_fraction=0)
    with pytest.warns(DataWarning, match=r"bad\.txt has 3 bytes that are not valid UTF-8"):
        manifest = prepare_data(cfg, TOKENIZER, tmp_path / "d", progress=False, workers=1)
    assert manifest["sources"][0]["invalid_utf8_bytes"] == 3
    assert "\ufffd broken \ufffd" in TOKENIZER.decode(stream(tmp_path / "d", "bad", "train"))


# --------------------------------------------------------------------------------------------------------------
# The validation split
# --------------------------------------------------------------------------------------------------------------
def test_validation_split_is_disjoint_and_deterministic(prepared, corpus, tmp_path):
    train = documents(stream(prepared, "essays", "train"))
    val = documents(stream(prepared, "essays", "val"))
    every = sorted(p.read_text() for p in corpus["essays"].iterdir())
    assert not set(train) & set(val) and sorted(train + val) == every
    # the same seed holds out the same documents; another seed others
    again = prepare_data(corpus_config(corpus), TOKENIZER, tmp_path / "same", progress=False, workers=1)
    other = prepare_data(corpus_config(corpus, seed=1), TOKENIZER, tmp_path / "other", progress=False, workers=1)
    assert documents(stream(tmp_path / "same", "essays", "val")) == val
    assert documents(stream(tmp_path / "other", "essays", "val")) != val
    assert again["sources"][0]["val"]["shards"] == read_manifest(prepared)["sources"][0]["val"]["shards"]
    assert other["sources"][0]["val"]["documents"] == 4
    # one long document: its last 10%, from a line start, is the validation text
    head, tail = split_tail(corpus["play"].read_text(), 0.1)
    assert documents(stream(prepared, "play", "train")) == [head]
    assert documents(stream(prepared, "play", "val")) == [tail]
    assert tail.startswith("LINE 36") and 0.09 < len(tail) / len(head + tail) < 0.1


def test_val_batches_cover_every_validation_token_once(prepared):
    loader = MixtureLoader(prepared, seq_len=32, batch_size=4)
    targets = [t for _, t in loader.val_batches()]
    assert all(t.shape == (4, 32) for t in targets)
    expected = sum(len(stream(prepared, n, "val")) - 1 for n in WEIGHTS)
    assert sum(int((t != IGNORE_INDEX).sum()) for t in targets) == expected
    assert loader.val_bytes() == read_manifest(prepared)["totals"]["val"]["bytes"]
    assert [t.tolist() for _, t in loader.val_batches()] == [t.tolist() for t in targets]  # deterministic
    ranks = [list(MixtureLoader(prepared, 32, 2, rank=r, world_size=2).val_batches()) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])  # same number of batches on every rank: no collective hangs
    assert sum(int((t != IGNORE_INDEX).sum()) for rank in ranks for _, t in rank) == expected
    first = next(loader.val_batches(source="play"))
    play = stream(prepared, "play", "val")
    assert first[0][0].tolist() == play[:32].tolist() and first[1][0].tolist() == play[1:33].tolist()


# --------------------------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------------------------
def test_mixture_shares_within_one_percent_over_1000_batches(prepared):
    loader = MixtureLoader(prepared, seq_len=16, batch_size=4, seed=5)
    tokens = dict.fromkeys(WEIGHTS, 0)
    for step in range(1000):
        for row in loader.describe(step):
            tokens[row["source"]] += loader.seq_len
    total = sum(tokens.values())
    for name, weight in WEIGHTS.items():
        assert abs(tokens[name] / total - weight) <= 0.01 * weight, (name, tokens[name] / total)


def test_batch_is_packed_windows_of_the_source_stream(prepared):
    loader = MixtureLoader(prepared, seq_len=24, batch_size=6, seed=1)
    streams = {n: stream(prepared, n, "train") for n in WEIGHTS}
    inputs, targets = loader.batch(17)
    assert inputs.dtype == targets.dtype == torch.int64 and inputs.shape == targets.shape == (6, 24)
    for row, x, y in zip(loader.describe(17), inputs.tolist(), targets.tolist()):
        source = streams[row["source"]]
        window = np.take(source, range(row["offset"], row["offset"] + 25), mode="wrap").tolist()
        assert x == window[:-1] and y == window[1:]
        shift = loader.epoch_shift(row["source"], row["epoch"])
        assert row["offset"] == (row["window"] * 24 + shift) % len(source)


def test_later_epochs_cut_the_stream_at_new_places(prepared):
    """Epoch 0 cuts at multiples of seq_len; each later epoch shifts every cut by one seeded amount, reading the
    stream as a cycle, so within an epoch every window is distinct and the targets never repeat."""
    loader = MixtureLoader(prepared, seq_len=64, batch_size=5, seed=4, weights={"play": 1.0})
    source = stream(prepared, "play", "train")
    n = loader.windows["play"]
    shifts = [loader.epoch_shift("play", e) for e in range(8)]
    assert shifts[0] == 0 and all(0 <= s < 64 for s in shifts) and len(set(shifts[1:])) > 1
    rows = [r for step in range(-(-4 * n // 5)) for r in loader.describe(step)]
    for epoch in range(4):
        mine = [r for r in rows if r["epoch"] == epoch]
        assert len(mine) == n
        assert {r["offset"] for r in mine} == {(w * 64 + shifts[epoch]) % len(source) for w in range(n)}
        targets = {(r["offset"] + i) % len(source) for r in mine for i in range(1, 65)}
        assert len(targets) == n * 64  # no target twice in one epoch
    # The last window of an epoch shifted past the stream's slack runs over the end into the beginning.
    slack = len(source) - 1 - n * 64
    epoch = next(e for e in range(1, 4) if shifts[e] > slack)
    index = next(i for i, r in enumerate(rows) if r["epoch"] == epoch and r["window"] == n - 1)
    row = rows[index]
    assert row["offset"] + 65 > len(source) and row["end"] == row["offset"] + 64 - len(source)
    x, y = loader.batch(index // 5)
    expected = np.take(source, range(row["offset"], row["offset"] + 65), mode="wrap").tolist()
    assert x[row["row"]].tolist() == expected[:-1] and y[row["row"]].tolist() == expected[1:]


def test_resume_needs_only_the_step(prepared):
    a = MixtureLoader(prepared, seq_len=16, batch_size=4, seed=9)
    expected = [a.batch(s) for s in range(6)]
    b = MixtureLoader(prepared, seq_len=16, batch_size=4, seed=9, verify=False)
    for step in (5, 2, 0, 3):  # any order, fresh object
        assert torch.equal(b.batch(step)[0], expected[step][0])
        assert torch.equal(b.batch(step)[1], expected[step][1])
    c = MixtureLoader(prepared, seq_len=16, batch_size=4, seed=10)
    assert not torch.equal(c.batch(0)[0], expected[0][0])


def test_batches_are_identical_in_another_process(prepared):
    code = textwrap.dedent(f"""
        import hashlib
        from minillama.data import MixtureLoader
        loader = MixtureLoader({str(prepared)!r}, seq_len=16, batch_size=4, seed=7, rank=1, world_size=2)
        for step in (0, 1, 250, 99999):
            x, y = loader.batch(step)
            print(hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"}).stdout.split()
    loader = MixtureLoader(prepared, seq_len=16, batch_size=4, seed=7, rank=1, world_size=2)
    here = []
    for step in (0, 1, 250, 99999):
        x, y = loader.batch(step)
        here.append(hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest())
    assert out == here


def test_world_sizes_split_the_same_global_batch_without_overlap(prepared):
    whole = MixtureLoader(prepared, seq_len=16, batch_size=8, seed=2)
    halves = [MixtureLoader(prepared, seq_len=16, batch_size=4, seed=2, rank=r, world_size=2) for r in range(2)]
    seen = set()
    for step in range(40):
        combined = torch.cat([h.batch(step)[0] for h in halves])
        assert torch.equal(combined, whole.batch(step)[0])
        for h in halves:
            for row in h.describe(step):
                key = (row["source"], row["epoch"], row["window"])
                assert key not in seen
                seen.add(key)


def test_epochs_visit_every_window_once_in_a_new_order(prepared):
    loader = MixtureLoader(prepared, seq_len=64, batch_size=5, seed=4, weights={"play": 1.0})
    n = loader.windows["play"]
    rows = [r for step in range(-(-2 * n // 5)) for r in loader.describe(step)]
    first, second = rows[:n], rows[n: 2 * n]
    assert sorted(r["window"] for r in first) == list(range(n)) and {r["epoch"] for r in first} == {0}
    assert sorted(r["window"] for r in second) == list(range(n)) and {r["epoch"] for r in second} == {1}
    assert [r["window"] for r in first] != [r["window"] for r in second]
    assert loader.epochs_at(-(-n // 5)) == {"play": pytest.approx(-(-n // 5) * 5 / n)}


# --------------------------------------------------------------------------------------------------------------
# Bad input: one MinillamaError naming the thing
# --------------------------------------------------------------------------------------------------------------
def prepare_one(path, tmp_path, **source):
    cfg = DataConfig(sources=[SourceConfig(name="s", path=str(path), **source)])
    return prepare_data(cfg, TOKENIZER, tmp_path / "out", progress=False, workers=1)


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(MinillamaError, match="data path not found: .*nowhere.txt"):
        prepare_one(tmp_path / "nowhere.txt", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MinillamaError, match="directory .*empty holds no files"):
        prepare_one(tmp_path / "empty", tmp_path)
    with pytest.raises(MinillamaError, match=r"no files match .*\*\.zzz"):
        prepare_one(tmp_path / "*.zzz", tmp_path)
    (tmp_path / "zero.txt").write_text("")
    with pytest.raises(MinillamaError, match="every file is empty"):
        prepare_one(tmp_path / "zero.txt", tmp_path)
    (tmp_path / "blank.jsonl").write_text("\n\n" + json.dumps({"text": ""}) + "\n")
    with pytest.raises(MinillamaError, match="source 's' has zero tokens"):
        prepare_one(tmp_path / "blank.jsonl", tmp_path)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_bad_jsonl(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "fine", "body": "y"}) + "\n" + json.dumps({"body": "x"}))
    with pytest.raises(MinillamaError, match=r"a\.jsonl:2: no field 'text'"):
        prepare_one(tmp_path / "a.jsonl", tmp_path)
    manifest = prepare_one(tmp_path / "a.jsonl", tmp_path, text_field="body", weight=1.0)
    assert manifest["sources"][0]["train"]["documents"] == 2  # a last line without a newline counts
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(MinillamaError, match=r"b\.jsonl:2: invalid JSON"):
        prepare_one(tmp_path / "b.jsonl", tmp_path)


def test_bad_config_values(tmp_path):
    for weight in (0, -1.5):
        with pytest.raises(MinillamaError, match=f"source 'wiki': weight must be > 0, got {weight}"):
            data_config_from_table({"sources": [{"name": "wiki", "path": "x", "weight": weight}]})
    with pytest.raises(MinillamaError, match="unknown key data.sources\\[0\\].wieght"):
        data_config_from_table({"sources": [{"name": "wiki", "path": "x", "wieght": 1}]})
    with pytest.raises(MinillamaError, match="data.sources\\[0\\].weight must be a number"):
        data_config_from_table({"sources": [{"name": "wiki", "path": "x", "weight": "big"}]})
    with pytest.raises(MinillamaError, match="duplicate source name"):
        data_config_from_table({"sources": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]})
    with pytest.raises(MinillamaError, match="data.sources is empty"):
        data_config_from_table({"sources": []})
    with pytest.raises(MinillamaError, match="val_fraction"):
        data_config_from_table({"sources": [{"name": "a", "path": "x"}], "val_fraction": 1.5})
    toml = tmp_path / "data.toml"
    toml.write_text('[[data.sources]]\nname = "wiki"\npath = ["a.txt", "b/*.md"]\nweight = 0.5\n')
    assert load_data_config(toml).sources[0].paths == ["a.txt", "b/*.md"]


def test_vocab_too_big_for_the_dtype(corpus, tmp_path):
    with pytest.raises(MinillamaError, match="too big for uint32"):
        prepare_data(corpus_config(corpus), ByteTokenizer(vocab_size=2**33), tmp_path / "d", progress=False)


def test_tokenizer_ids_outside_its_vocabulary(corpus, tmp_path):
    with pytest.raises(MinillamaError, match="outside its vocab_size 100"):
        prepare_data(corpus_config(corpus), ByteTokenizer(vocab_size=100), tmp_path / "d", progress=False,
                     workers=1)


def test_shard_checksum_mismatch(prepared, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    shard = copy / read_manifest(copy)["sources"][1]["train"]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(MinillamaError, match=f"shard .*{shard.name}: sha256 .* does not match"):
        MixtureLoader(copy, seq_len=16, batch_size=2)
    MixtureLoader(copy, seq_len=16, batch_size=2, verify=False)  # sizes still fine: opens
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(MinillamaError, match=f"shard .*{shard.name} has .* bytes"):
        MixtureLoader(copy, seq_len=16, batch_size=2, verify=False)


def test_tokenizer_fingerprint_mismatch(prepared):
    with pytest.raises(MinillamaError, match="prepared with tokenizer bytes-v1-259, this run uses other-tok"):
        MixtureLoader(prepared, seq_len=16, batch_size=2, tokenizer_fingerprint="other-tok")
    MixtureLoader(prepared, seq_len=16, batch_size=2, tokenizer_fingerprint=TOKENIZER.fingerprint)


def test_seq_len_longer_than_a_source(prepared):
    records = read_manifest(prepared)["sources"][1]["train"]["tokens"]
    with pytest.raises(MinillamaError, match=f"source 'records' has {records} train tokens, fewer than seq_len"):
        MixtureLoader(prepared, seq_len=records, batch_size=2)
    MixtureLoader(prepared, seq_len=records - 1, batch_size=2)


def test_loader_arguments(prepared):
    with pytest.raises(MinillamaError, match="rank must be in"):
        MixtureLoader(prepared, seq_len=16, batch_size=2, rank=2, world_size=2)
    with pytest.raises(MinillamaError, match="unknown source"):
        MixtureLoader(prepared, seq_len=16, batch_size=2, weights={"nope": 1.0})
    with pytest.raises(MinillamaError, match="not a prepared data directory"):
        MixtureLoader(prepared.parent / "missing", seq_len=16, batch_size=2)


def test_refuses_to_overwrite_a_foreign_directory(corpus, tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(MinillamaError, match="refusing to overwrite"):
        prepare_data(corpus_config(corpus), TOKENIZER, tmp_path / "precious", progress=False)


# --------------------------------------------------------------------------------------------------------------
# The embedded default corpus
# --------------------------------------------------------------------------------------------------------------
def test_stdlib_sources_give_text():
    topics = stdlib.pydoc_topics()
    assert len(topics) > 50 and "with" in topics
    assert "compound statement" in stdlib.pydoc_topic("if") or "if" in stdlib.pydoc_topic("if")
    files = stdlib.stdlib_files()
    names = {p.relative_to(stdlib.stdlib_dir()).as_posix() for p in files}
    assert "json/__init__.py" in names and "os.py" in names
    assert not any(part in ("test", "tests", "site-packages", "idlelib") for n in names for part in n.split("/"))
    assert "encodings/cp1252.py" not in names  # generated tables
    doc = stdlib.module_documentation(stdlib.stdlib_dir() / "json" / "__init__.py")
    assert doc.startswith("Module json\n") and "def json.dumps(" in doc
    capped = stdlib.python_source_files(max_mb=0.5)
    assert 0 < sum(p.stat().st_size for p in capped) <= 500_000 and capped == files[: len(capped)]


def test_stdlib_sources_prepare_from_toml(tmp_path):
    toml = tmp_path / "data.toml"
    toml.write_text(textwrap.dedent("""
        [data]
        val_fraction = 0.05
        [[data.sources]]
        name = "docs"
        path = "python:docs"
        max_mb = 0.3
        weight = 0.4
        [[data.sources]]
        name = "code"
        path = "python:source"
        max_mb = 0.3
        weight = 0.6
    """))
    manifest = prepare_data(load_data_config(toml), TOKENIZER, tmp_path / "d", progress=False)
    docs, code = manifest["sources"]
    assert docs["train"]["documents"] > 10 and docs["val"]["documents"] >= 1 and code["train"]["tokens"] > 250_000
    text = TOKENIZER.decode(stream(tmp_path / "d", "code", "train")[:2000])
    assert "import" in text or "def " in text


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------
def test_cli_prepare_and_inspect(corpus, tmp_path, capsys):
    from minillama.tokenizer import train_bpe_from_texts

    texts = [p.read_text() for p in sorted(corpus["essays"].iterdir())] + [corpus["play"].read_text()]
    train_bpe_from_texts(texts, vocab_size=300, out_dir=tmp_path / "tok")
    out = tmp_path / "data"
    args = ["data", "prepare", "--input", str(corpus["essays"]), str(corpus["play"]), "--tokenizer",
            str(tmp_path / "tok"), "--out", str(out), "--val-fraction", "0.1", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "prepared" in printed and "essays" in printed and "play" in printed
    assert main(args) == 0 and "cached" in capsys.readouterr().out
    assert main(["data", "inspect", str(out), "--step", "3", "--seq-len", "32", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("batch 3 of")
    lines = printed.splitlines()[1:]
    assert len(lines) == 8 and all(("essays" in line or "play" in line) and "epoch 0" in line for line in lines[::2])
    assert any("Sentence" in line or "LINE" in line or "question" in line for line in lines[1::2])
    assert main(["data", "inspect", str(out), "--step", "3", "--seq-len", "32", "--batch-size", "4",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["row"] for r in rows] == [0, 1, 2, 3] and all("start_text" in r for r in rows)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["data", "prepare", "--input", str(tmp_path / "none.txt"), "--tokenizer", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "none.txt" in err
    assert main(["data", "inspect", str(tmp_path), "--step", "0"]) == 2
    assert "not a prepared data directory" in capsys.readouterr().err


def test_loader_settings_from_a_run_record_or_defaults(tmp_path):
    from minillama.data.inspect import RUN_RECORD, loader_settings, read_run_record, run_record
    from minillama.files import atomic_write_json

    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text("{}")  # a prepared directory: no run.json is looked for
    assert read_run_record(data) is None
    assert loader_settings(data) == dict(data_dir=data, seq_len=256, batch_size=8, seed=0)
    run = tmp_path / "run"
    run.mkdir()
    atomic_write_json(run / RUN_RECORD, run_record({"train": {}}, data, seq_len=64, seed=7, per_rank_batch_size=3,
                                                   world_size=2))
    assert read_run_record(run)["world_size"] == 2
    assert loader_settings(run) == dict(data_dir=str(data), seq_len=64, batch_size=3, seed=7)
    assert loader_settings(run, seq_len=32, seed=0) == dict(data_dir=str(data), seq_len=32, batch_size=3, seed=0)
    (run / RUN_RECORD).write_text("{broken")
    with pytest.raises(MinillamaError, match=r"run\.json: invalid JSON"):
        loader_settings(run)
