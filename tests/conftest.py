"""Fixtures shared by the evaluation tests (test_tasks.py, test_lm_eval.py) and the command-line tests
(test_cli.py, test_readme.py)."""

from pathlib import Path

import pytest
import torch

from minillama import ModelConfig, Transformer, save
from minillama.tasks import TASK_DIR
from minillama.tokenizer import train_bpe_from_texts

EVAL_DATA = Path(__file__).resolve().parent / "data" / "lm_eval"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer model (context 1024) with a BPE tokenizer trained on the evaluation texts.
    Weights are drawn wider than for training (std 0.3) so that choices' log-likelihoods are far from ties."""
    texts = [path.read_text(encoding="utf-8") for path in [*EVAL_DATA.glob("*.jsonl"), *TASK_DIR.glob("*.jsonl")]]
    tokenizer = train_bpe_from_texts(texts, 400)
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=64, vocab_size=400,
                      max_seq_len=1024, tie_embeddings=True)
    model = Transformer(cfg)
    model.init_weights(std=0.3)
    return save(model, tokenizer, tmp_path_factory.mktemp("eval") / "checkpoint")


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """(model, tokenizer) of `tiny_checkpoint`, loaded once."""
    from minillama.checkpoint import load

    return load(tiny_checkpoint)


@pytest.fixture(scope="session")
def cli_inputs(tmp_path_factory) -> dict[str, Path]:
    """What command lines run on: `text` (20 kB of Shakespeare), a BPE `tokenizer` of 300 tokens trained on it,
    a random `checkpoint` with that tokenizer and a 64-token context, the text prepared as `data`, and the
    minillama `cache` they were made with."""
    from minillama.cli import main

    root = tmp_path_factory.mktemp("cli_inputs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINILLAMA_CACHE", str(root / "cache"))
        text = root / "text.txt"
        text.write_text((SHARED / "tinyshakespeare.txt").read_text()[:20_000], encoding="utf-8")
        tokenizer = train_bpe_from_texts([text.read_text()], 300, root / "tokenizer")
        torch.manual_seed(0)
        cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden_dim=64, vocab_size=300,
                          max_seq_len=64)
        save(Transformer(cfg), tokenizer, root / "checkpoint")
        assert main(["data", "prepare", "--input", str(text), "--tokenizer", str(root / "tokenizer"), "--out",
                     str(root / "data"), "--no-progress"]) == 0
    return dict(text=text, tokenizer=root / "tokenizer", checkpoint=root / "checkpoint", data=root / "data",
                cache=root / "cache")
