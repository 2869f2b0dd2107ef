"""Meta-format import: rotary layouts against Meta's complex-number RoPE, sharded round trips for a Llama-2-like
and a Llama-3-like checkpoint, and bad input."""

import json
import math

import pytest
import torch
from interop_helpers import llama2_tokenizer, random_model, small_bpe, tiktoken_from_bpe

from minillama import ModelConfig
from minillama.checkpoint import load
from minillama.cli import main
from minillama.interop.meta import convert_meta, hf_to_meta_rotary, meta_to_hf_rotary
from minillama.model import apply_rope, rope_cos_sin, rope_inverse_frequencies


# --------------------------------------------------------------------------------------------------------------
# Rotary layouts
# --------------------------------------------------------------------------------------------------------------
def meta_rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Meta's llama/model.py apply_rotary_emb, for x (T, heads, D): consecutive pairs as complex numbers."""
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2))  # (T, heads, D/2)
    rotation = torch.polar(torch.ones(len(positions), len(inv_freq), dtype=torch.float64),
                           positions.double()[:, None] * inv_freq.double()[None, :])  # (T, D/2)
    return torch.view_as_real(pairs * rotation[:, None, :]).reshape(x.shape)


@pytest.mark.parametrize("n_heads, head_dim", [(4, 16), (2, 8), (1, 64)])
def test_rotary_layouts_match_meta_reference(n_heads, head_dim):
    torch.manual_seed(0)
    dim, T = 32, 7
    w_hf = torch.randn(n_heads * head_dim, dim, dtype=torch.float64)
    x = torch.randn(T, dim, dtype=torch.float64)
    positions = torch.arange(T) * 37  # large enough that every frequency turns
    inv_freq = rope_inverse_frequencies(head_dim, 10000.0, None)

    w_meta = hf_to_meta_rotary(w_hf, n_heads)
    assert torch.equal(meta_to_hf_rotary(w_meta, n_heads), w_hf)
    # Per head, Meta's row 2i is HF's row i and row 2i + 1 is HF's row i + D/2.
    for h in range(n_heads):
        for i in range(head_dim // 2):
            assert torch.equal(w_meta[h * head_dim + 2 * i], w_hf[h * head_dim + i])
            assert torch.equal(w_meta[h * head_dim + 2 * i + 1], w_hf[h * head_dim + i + head_dim // 2])

    # Rotating with each model's own RoPE gives the same vectors, up to that same reordering of coordinates.
    cos, sin = rope_cos_sin(inv_freq, positions[None])  # (1, T, 1, D/2)
    ours = apply_rope((x @ w_hf.T).view(1, T, n_heads, head_dim), cos.double(), sin.double())[0]  # (T, H, D)
    meta = meta_rotate((x @ w_meta.T).view(T, n_heads, head_dim), positions, inv_freq)
    meta_in_hf_order = meta_to_hf_rotary(meta.reshape(T * n_heads, head_dim).T, 1).T.reshape(T, n_heads, head_dim)
    # rope_cos_sin forms its angles in fp32 (errors ~1e-5 at these positions); a wrong layout errs by O(1).
    torch.testing.assert_close(ours, meta_in_hf_order, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# Meta checkpoints written from our models
# --------------------------------------------------------------------------------------------------------------
# How Meta's model.py splits each weight over model-parallel ranks: ColumnParallelLinear on the output dim (0),
# RowParallelLinear on the input dim (1), norms replicated; the embedding depends on the generation.
COLUMN = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
          "feed_forward.w3.weight", "output.weight")
ROW = ("attention.wo.weight", "feed_forward.w2.weight")


def write_meta(model, tokenizer, directory, params: dict, n_shards: int, embedding_dim: int) -> None:
    """Save `model` as Meta would: interleaved q/k rows, split over `n_shards` consolidated.NN.pth files."""
    cfg = model.cfg
    directory.mkdir(parents=True)
    shards = [{} for _ in range(n_shards)]
    for name, tensor in model.state_dict().items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue  # Llama 3.2's tied checkpoints: one matrix
        tensor = tensor.detach().clone()
        if name.endswith("attention.wq.weight"):
            tensor = hf_to_meta_rotary(tensor, cfg.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = hf_to_meta_rotary(tensor, cfg.n_kv_heads)
        if name.endswith(COLUMN):
            parts = tensor.chunk(n_shards, dim=0)
        elif name.endswith(ROW):
            parts = tensor.chunk(n_shards, dim=1)
        elif name == "tok_embeddings.weight":
            parts = tensor.chunk(n_shards, dim=embedding_dim)
        else:
            parts = [tensor] * n_shards
        for shard, part in zip(shards, parts):
            shard[name] = part.clone().to(torch.bfloat16)  # Meta ships bf16
    shards[0]["rope.freqs"] = torch.zeros(cfg.head_dim // 2)  # LLaMA 1/2 saved this buffer; it must be skipped
    for rank, shard in enumerate(shards):
        torch.save(shard, directory / f"consolidated.{rank:02d}.pth")
    (directory / "params.json").write_text(json.dumps(params))
    tokenizer.save(directory)


LLAMA2_PARAMS = dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, norm_eps=1e-5, vocab_size=32000)
LLAMA3_PARAMS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, ffn_dim_multiplier=1.3,
                     norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True, rope_scaling_factor=32.0)


def config_for(params: dict, vocab_size: int, tie: bool, max_seq_len: int) -> ModelConfig:
    """The ModelConfig the params describe, written independently of minillama.interop.meta."""
    scaling = None
    if params.get("use_scaled_rope"):
        scaling = dict(factor=params.get("rope_scaling_factor", 8.0), low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192)
    hidden = int(2 * 4 * params["dim"] / 3)
    hidden = int(params.get("ffn_dim_multiplier", 1.0) * hidden)
    hidden = params["multiple_of"] * math.ceil(hidden / params["multiple_of"])
    return ModelConfig(dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
                       n_kv_heads=params.get("n_kv_heads"), vocab_size=vocab_size, ffn_hidden_dim=hidden,
                       norm_eps=params["norm_eps"], rope_theta=params.get("rope_theta", 10000.0),
                       rope_scaling=scaling, tie_embeddings=tie, max_seq_len=max_seq_len)


def padded(vocab_size: int) -> int:
    """The embedding rows for a vocabulary, rounded up to a multiple of 8 so that shards split it evenly."""
    return -(-vocab_size // 8) * 8


@pytest.fixture(scope="module")
def tiktoken_tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiktoken")
    return tiktoken_from_bpe(small_bpe(directory), directory / "tokenizer.model")


@pytest.mark.parametrize("case", ["llama2", "llama3"])
def test_sharded_round_trip(case, tiktoken_tokenizer, tmp_path):
    if case == "llama2":  # SentencePiece, multi-head attention, untied output, embedding split on dim 1
        tokenizer, params, tie, embedding_dim, max_seq_len = llama2_tokenizer(), LLAMA2_PARAMS, False, 1, 4096
    else:  # tiktoken, GQA, tied embeddings (Llama 3.2), scaled RoPE, embedding split on dim 0
        tokenizer, params, tie, embedding_dim, max_seq_len = tiktoken_tokenizer, LLAMA3_PARAMS, True, 0, 131072
        params = dict(params, vocab_size=padded(tokenizer.vocab_size))
    cfg = config_for(params, params["vocab_size"], tie, max_seq_len)
    model = random_model(cfg).to(torch.bfloat16)
    model.reset_buffers()  # .to() rounded the RoPE frequencies to bf16; a loaded model derives them in fp32
    write_meta(model, tokenizer, tmp_path / "meta", params, n_shards=2, embedding_dim=embedding_dim)

    out = convert_meta(tmp_path / "meta", tmp_path / "hf")
    converted, converted_tokenizer = load(out)
    assert converted.cfg == ModelConfig(**{**cfg.to_dict(), "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id})
    assert converted_tokenizer.fingerprint == tokenizer.fingerprint
    original = model.state_dict()
    for name, tensor in converted.state_dict().items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, original[name]), name
    tokens = torch.tensor([tokenizer.encode("ROMEO: But, soft! what light through yonder window breaks?", bos=True)])
    with torch.no_grad():
        assert torch.equal(converted.float()(tokens), model.float()(tokens))


def test_llama1_vocab_from_tokenizer_and_one_shard(tmp_path):
    tokenizer = llama2_tokenizer()
    params = dict(LLAMA2_PARAMS, vocab_size=-1, norm_eps=1e-6)  # LLaMA 1's params.json
    model = random_model(config_for(params, tokenizer.vocab_size, False, 2048))
    write_meta(model, tokenizer, tmp_path / "meta", params, n_shards=1, embedding_dim=1)
    assert main(["convert", "meta", str(tmp_path / "meta"), "--out", str(tmp_path / "hf")]) == 0
    converted, _ = load(tmp_path / "hf")
    assert converted.cfg.vocab_size == 32000 and converted.cfg.max_seq_len == 2048 and converted.cfg.norm_eps == 1e-6
    for name, tensor in converted.state_dict().items():
        assert torch.equal(tensor.float(), model.state_dict()[name].to(torch.bfloat16).float()), name


# --------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the problem, exit code 2, nothing left at --out
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture()
def meta_dir(tiktoken_tokenizer, tmp_path):
    params = dict(LLAMA3_PARAMS, vocab_size=padded(tiktoken_tokenizer.vocab_size))
    cfg = config_for(params, params["vocab_size"], True, 131072)
    write_meta(random_model(cfg), tiktoken_tokenizer, tmp_path / "meta", params, n_shards=2, embedding_dim=0)
    return tmp_path / "meta"


def edit_params(directory, **changes):
    params = json.loads((directory / "params.json").read_text())
    params.update(changes)
    (directory / "params.json").write_text(json.dumps(params))


def test_bad_input(meta_dir, tmp_path, capsys):
    out = tmp_path / "out"
    good_params = (meta_dir / "params.json").read_text()

    def fails(message: str) -> None:
        assert main(["convert", "meta", str(meta_dir), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert not out.exists() and not list(tmp_path.glob(".out*"))

    (meta_dir / "params.json").rename(meta_dir / "params.bak")
    fails("no params.json")
    (meta_dir / "params.bak").rename(meta_dir / "params.json")

    for changes, message in [
        (dict(n_heads="four"), "params.n_heads must be an integer, got 'four'"),
        (dict(colour="red"), "unknown key params.colour"),
        (dict(vocab_size=0), "vocab_size=0"),
        (dict(n_heads=5), "not divisible"),  # 64 / 5
        (dict(n_kv_heads=3), "not a multiple"),
        (dict(dim=96), "tok_embeddings.weight has shape"),  # the shards hold dim 64
        (dict(multiple_of=64), "feed_forward.w1.weight merged from 2 shard(s) has shape"),
    ]:
        edit_params(meta_dir, **changes)
        fails(message)
        (meta_dir / "params.json").write_text(good_params)
    params = json.loads(good_params)
    del params["dim"]
    (meta_dir / "params.json").write_text(json.dumps(params))
    fails("missing required key 'dim'")
    (meta_dir / "params.json").write_text("[1, 2]")
    fails("expected a JSON object")
    (meta_dir / "params.json").write_text(good_params)

    shard = torch.load(meta_dir / "consolidated.01.pth", weights_only=True)
    shard["layers.1.feed_forward.w2.weight"] = shard["layers.1.feed_forward.w2.weight"][:, :-1].clone()
    torch.save(shard, meta_dir / "consolidated.01.pth")
    fails("shards disagree: layers.1.feed_forward.w2.weight")
    shard = torch.load(meta_dir / "consolidated.00.pth", weights_only=True)
    torch.save(shard, meta_dir / "consolidated.01.pth")
    shard["layers.0.ffn_norm.weight"] = shard["layers.0.ffn_norm.weight"] + 1
    torch.save(shard, meta_dir / "consolidated.01.pth")
    fails("layers.0.ffn_norm.weight should be replicated")

    (meta_dir / "consolidated.01.pth").rename(meta_dir / "consolidated.02.pth")
    fails("found consolidated.00.pth, consolidated.02.pth")
    (meta_dir / "consolidated.02.pth").write_bytes(b"not a pickle")
    (meta_dir / "consolidated.02.pth").rename(meta_dir / "consolidated.01.pth")
    fails("consolidated.01.pth: not a readable PyTorch weights file")
    (meta_dir / "tokenizer.model").unlink()
    fails("no tokenizer.model")
