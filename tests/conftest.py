"""Fixtures shared by the evaluation tests (test_tasks.py, test_lm_eval.py)."""

from pathlib import Path

import pytest
import torch

from minillama import ModelConfig, Transformer, save
from minillama.tasks import TASK_DIR
from minillama.tokenizer import train_bpe_from_texts

EVAL_DATA = Path(__file__).resolve().parent / "data" / "lm_eval"


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
