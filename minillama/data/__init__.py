"""Data: a mixture of sources, tokenized once into shards, read deterministically.

    cfg = load_data_config("data.toml")                  # or data_config_from_paths(["input.txt"])
    manifest = prepare_data(cfg, tokenizer, "data/")     # cached: re-running with the same inputs reads nothing
    loader = MixtureLoader("data/", seq_len=256, batch_size=8, seed=0, tokenizer_fingerprint=tok.fingerprint)
    inputs, targets = loader.batch(step)                 # a pure function of (seed, step, rank, world_size)

`sources` (config and reading files), `prepare` (shards + manifest), `loader` (batches), `stdlib` (the embedded
default corpus from the running Python installation).
"""

from minillama.data.loader import IGNORE_INDEX, MixtureLoader, bits_per_byte, verify_shards
from minillama.data.prepare import prepare_data, read_manifest, split_tail, token_dtype, training_texts
from minillama.data.sources import (
    PYTHON_DOCS,
    PYTHON_SOURCE,
    DataConfig,
    DataWarning,
    SourceConfig,
    data_config_from_paths,
    data_config_from_table,
    load_data_config,
    source_texts,
)

__all__ = ["DataConfig", "SourceConfig", "DataWarning", "load_data_config", "data_config_from_table",
           "data_config_from_paths", "source_texts", "training_texts", "prepare_data", "read_manifest", "split_tail",
           "token_dtype", "MixtureLoader", "IGNORE_INDEX", "bits_per_byte", "verify_shards", "PYTHON_DOCS",
           "PYTHON_SOURCE"]
