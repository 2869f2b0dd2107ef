"""Loss, perplexity and bits per byte checked against numbers computed by hand.

The model is a real `Transformer` whose weights are set so that it is a bigram table with known probabilities:
every residual branch writes zero (wo = w2 = 0), so the last hidden state is the token's embedding, a one-hot
vector; the final RMSNorm scales it by r = 1/sqrt(1/C + eps); and column i of the output projection is
log P[i, :] / r. The logits at a position holding token i are then log P[i, :], so the model's probability of
the next token b after token a is exactly P[a, b], whatever the context before a. The expected numbers are sums
of table entries over the text's consecutive token pairs, written out here with plain float64 arithmetic.
"""

import json
import math

import pytest
import torch

from minillama import ModelConfig, Transformer, save
from minillama.cli import main
from minillama.eval import evaluate_text
from minillama.tokenizer import train_bpe_from_texts

# Multi-byte UTF-8 on purpose (2-, 3- and 4-byte characters), so bytes != characters.
TEXT = ("naïve café — “quoted” 日本語のテキスト 🦙 and plain ASCII, 1234.\n"
        "Ünïcödé again: ½ ± ∞ → ✓ 🦙🦙\n") * 3
VOCAB, DIM = 272, 288  # DIM >= VOCAB: every token gets a one-hot embedding of its own


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_from_texts([TEXT], VOCAB)


def bigram_model(log_p: torch.Tensor) -> Transformer:
    """A Transformer whose next-token distribution after token i is exp(log_p[i]) (module docstring)."""
    cfg = ModelConfig(dim=DIM, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=32, vocab_size=VOCAB,
                      max_seq_len=64, tie_embeddings=False)
    model = Transformer(cfg)  # random weights everywhere; then the ones that matter are set
    r = 1.0 / math.sqrt(1.0 / DIM + cfg.norm_eps)  # RMSNorm of a one-hot vector: e_i / sqrt(mean(e_i^2) + eps)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        model.tok_embeddings.weight.copy_(torch.eye(VOCAB, DIM))
        model.norm.weight.fill_(1.0)
        model.output.weight.zero_()
        model.output.weight[:, :VOCAB] = (log_p.T / r).float()  # logits[j] = W[j, i] * r = log_p[i, j]
    return model.eval()


def random_table(seed: int) -> torch.Tensor:
    """log P of a bigram table with rows far from uniform (float64)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.log_softmax(2.0 * torch.randn(VOCAB, VOCAB, generator=generator, dtype=torch.float64), dim=1)


def by_hand(log_p: torch.Tensor, ids: list[int], text: str) -> dict[str, float]:
    """Every consecutive pair (a, b) of the encoded text is scored once: -log P[a, b] nats."""
    nats = sum(-float(log_p[a, b]) for a, b in zip(ids, ids[1:]))
    tokens = len(ids) - 1
    n_bytes = len(text.encode("utf-8"))
    return dict(loss=nats / tokens, perplexity=math.exp(nats / tokens), bits_per_byte=nats / (math.log(2) * n_bytes),
                nats_per_byte=nats / n_bytes, tokens=tokens, bytes=n_bytes)


def check(result: dict, expected: dict, rel: float) -> None:
    assert result["tokens"] == expected["tokens"] and result["bytes"] == expected["bytes"]
    for key in ("loss", "perplexity", "bits_per_byte", "nats_per_byte"):
        assert result[key] == pytest.approx(expected[key], rel=rel), key


def test_the_text_has_more_bytes_than_characters():
    assert len(TEXT.encode("utf-8")) - len(TEXT) >= 100


def test_a_uniform_model_scores_ln_vocab_per_token(tokenizer):
    """All logits zero: every token costs ln V nats, so loss = ln V, perplexity = V and bits per byte =
    tokens x log2(V) / bytes."""
    model = bigram_model(torch.zeros(VOCAB, VOCAB, dtype=torch.float64))
    result = evaluate_text(model, tokenizer, TEXT, dtype="fp32").to_dict()
    tokens = len(tokenizer.encode(TEXT)) + 1  # bos + text + eos, less one: the first token is never a target
    assert result["tokens"] == tokens
    assert result["loss"] == pytest.approx(math.log(VOCAB), rel=1e-6)
    assert result["perplexity"] == pytest.approx(VOCAB, rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(tokens * math.log2(VOCAB) / len(TEXT.encode("utf-8")), rel=1e-6)


@pytest.mark.parametrize("seq_len, batch_size", [(None, 8), (7, 3), (1, 5)])
def test_bigram_model_loss_perplexity_and_bits_per_byte(tokenizer, seq_len, batch_size):
    """Whatever the window length and batching, each pair is scored exactly once, bos first and eos last."""
    log_p = random_table(seed=0)
    ids = tokenizer.encode(TEXT, bos=True, eos=True)
    assert len(ids) > 64  # more than one window of the model's context, so windows are cut
    result = evaluate_text(bigram_model(log_p), tokenizer, TEXT, seq_len=seq_len, batch_size=batch_size,
                           dtype="fp32").to_dict()
    check(result, by_hand(log_p, ids, TEXT), rel=1e-5)


def test_eval_command_on_a_text_file(tokenizer, tmp_path, capsys):
    log_p = random_table(seed=1)
    checkpoint = save(bigram_model(log_p), tokenizer, tmp_path / "checkpoint")
    data = tmp_path / "text.txt"
    data.write_text(TEXT, encoding="utf-8")
    expected = by_hand(log_p, tokenizer.encode(TEXT, bos=True, eos=True), TEXT)

    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--dtype", "fp32", "--json"]) == 0
    check(json.loads(capsys.readouterr().out), expected, rel=1e-5)
    # The default bf16 autocast rounds the logits to 8 significant bits: the same loss to about 1%.
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--seq-len", "16", "--json"]) == 0
    bf16 = json.loads(capsys.readouterr().out)
    assert bf16["loss"] == pytest.approx(expected["loss"], rel=1e-2)
    assert bf16["bits_per_byte"] == pytest.approx(expected["bits_per_byte"], rel=1e-2)
    assert bf16["perplexity"] == pytest.approx(math.exp(bf16["loss"]), rel=1e-9)
    # The text report prints the same three numbers.
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--dtype", "fp32"]) == 0
    line = capsys.readouterr().out
    assert f"loss {expected['loss']:.4f} nats/token" in line
    assert f"{expected['bits_per_byte']:.4f} bits/byte" in line
