import pytest
import torch

from minillama import KVCache, MinillamaError, ModelConfig, Transformer, count_parameters
from minillama.config import PRESETS

# Published parameter counts (Meta's model cards and papers); they must come out of the model itself.
EXACT_COUNTS = {
    "llama1-7b": 6_738_415_616,
    "llama1-13b": 13_015_864_320,
    "llama1-33b": 32_528_943_616,
    "llama1-65b": 65_285_660_672,
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "llama3.1-8b": 8_030_261_248,
    "llama3.1-70b": 70_553_706_496,
    "llama3.1-405b": 405_853_388_800,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
}

# Our ladder, counted by hand from its shapes: C dim, L layers, H heads, K key/value heads, D = C/H head dim,
# F SwiGLU width, V vocabulary. Embedding V*C (tied: counted once); per layer the two norms 2C, wq C*H*D, wk and
# wv 2*C*K*D, wo H*D*C, SwiGLU w1, w2, w3 3*C*F; the final norm C; an untied output V*C.
LADDER_COUNTS = {
    # C=128 L=4 H=4 K=2 D=32 F=384 V=2048, tied: 262,144 + 4 x (256 + 16,384 + 16,384 + 16,384 + 147,456) + 128
    "tiny": 1_049_728,
    # C=384 L=8 H=6 K=2 D=64 F=1024 V=8192, tied: 3,145,728 + 8 x (768 + 147,456 + 98,304 + 147,456 + 1,179,648)
    # + 384
    "15m": 15_735_168,
    # C=512 L=10 H=8 K=4 D=64 F=1536 V=32000, tied: 16,384,000 + 10 x (1,024 + 262,144 + 262,144 + 262,144
    # + 2,359,296) + 512
    "50m": 47_852_032,
    # C=768 L=16 H=12 K=4 D=64 F=2048 V=32000, tied: 24,576,000 + 16 x (1,536 + 589,824 + 393,216 + 589,824
    # + 4,718,592) + 768
    "125m": 125_264_640,
    # C=1024 L=24 H=16 K=8 D=64 F=3072 V=32000, tied: 32,768,000 + 24 x (2,048 + 1,048,576 + 1,048,576
    # + 1,048,576 + 9,437,184) + 1,024
    "350m": 334_808_064,
    # C=2048 L=22 H=32 K=4 D=64 F=5632 V=32000, untied: 65,536,000 + 22 x (4,096 + 4,194,304 + 1,048,576
    # + 4,194,304 + 34,603,008) + 2,048 + 65,536,000; TinyLlama-1.1B's published 1,100,048,384
    "1b": 1_100_048_384,
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_on_meta_device(name):
    cfg = ModelConfig.from_preset(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert all(p.device.type == "meta" for p in model.parameters())
    count = model.num_params()
    assert count == count_parameters(cfg)
    assert count == {**EXACT_COUNTS, **LADDER_COUNTS}[name]


def test_every_preset_has_a_golden_count_and_ladder_names_match_sizes():
    assert set(EXACT_COUNTS) | set(LADDER_COUNTS) == set(PRESETS)  # a new preset comes with its count
    named = {"tiny": 1e6, "15m": 15e6, "50m": 50e6, "125m": 125e6, "350m": 350e6, "1b": 1.1e9}
    assert set(named) == set(LADDER_COUNTS)
    for name, target in named.items():
        assert 0.8 * target <= LADDER_COUNTS[name] <= 1.2 * target, name


def test_meta_model_materialises_with_init_weights():
    cfg = ModelConfig.from_preset("tiny")
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    logits = model(torch.randint(0, cfg.vocab_size, (1, 8)))
    assert torch.isfinite(logits).all()
    assert model.output.weight is model.tok_embeddings.weight  # still tied after to_empty
    assert model.num_params() == count_parameters(cfg)
    assert model.rope_inv_freq[0].item() == 1.0


def test_forward_shapes_and_tied_embeddings():
    cfg = ModelConfig.from_preset("tiny")
    model = Transformer(cfg)
    logits = model(torch.randint(0, cfg.vocab_size, (3, 11)))
    assert logits.shape == (3, 11, cfg.vocab_size)
    assert model.output.weight is model.tok_embeddings.weight
    untied = Transformer(ModelConfig.from_preset("tiny", tie_embeddings=False))
    assert untied.num_params() == model.num_params() + cfg.vocab_size * cfg.dim


def _cache_model(n_kv_heads: int = 2) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=97, ffn_hidden_dim=96,
                      max_seq_len=64, rope_scaling=dict(factor=8.0, original_max_position_embeddings=16))
    return Transformer(cfg).eval()


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_kv_cache_logits_equal_full_sequence_logits(n_kv_heads):
    model = _cache_model(n_kv_heads)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache.empty(model.cfg, batch_size=2, max_len=32, dtype=torch.float32)
        chunks = [model(tokens[:, :9], cache=cache), model(tokens[:, 9:15], cache=cache)]  # prefill, then a chunk
        chunks += [model(tokens[:, t:t + 1], cache=cache) for t in range(15, 24)]  # one token at a time
    assert cache.lengths.tolist() == [24, 24]
    assert torch.allclose(torch.cat(chunks, dim=1), full, atol=1e-5)


def _greedy_alone(model: Transformer, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and their logits for one prompt decoded by itself in a cache of its own."""
    cache = KVCache.empty(model.cfg, batch_size=1, max_len=64, dtype=torch.float32)
    logits = model(torch.tensor([prompt]), cache=cache, logits_index=-1)[:, -1]
    tokens, all_logits = [], []
    for _ in range(steps):
        all_logits.append(logits[0])
        tokens.append(int(logits.argmax()))
        logits = model(torch.tensor([[tokens[-1]]]), cache=cache)[:, -1]
    return tokens, torch.stack(all_logits)


@pytest.mark.parametrize("static", [False, True], ids=["span", "static"])
def test_rows_at_different_positions_with_resets_decode_as_each_row_alone(static):
    """Three rows share one cache: prompts of different lengths prefilled row by row, decoded together, and row 1
    reset mid-way and reused for a new prompt while the others go on. Every row's greedy tokens equal that
    prompt decoded alone, and its logits agree to fp32 rounding."""
    model = _cache_model()
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=generator).tolist() for n in (5, 11, 2, 7)]
    steps = 12
    expected = [_greedy_alone(model, p, steps) for p in prompts]

    cache = KVCache.empty(model.cfg, batch_size=3, max_len=64, dtype=torch.float32, static=static)
    got_tokens: list[list[int]] = [[], [], [], []]
    got_logits: list[list[torch.Tensor]] = [[], [], [], []]
    row_prompt = [0, 1, 2]  # which prompt each cache row is decoding
    last = torch.zeros(3, model.cfg.vocab_size)
    with torch.no_grad():
        for row, prompt in enumerate(prompts[:3]):  # each row prefilled alone, in its own view of the cache
            last[row] = model(torch.tensor([prompt]), cache=cache.rows(row, row + 1), logits_index=-1)[0, -1]
        for step in range(steps + 6):
            if step == 6:  # row 1 stops after 6 tokens; the same row takes prompt 3 from position 0
                cache.reset(1)
                row_prompt[1] = 3
                last[1] = model(torch.tensor([prompts[3]]), cache=cache.rows(1, 2), logits_index=-1)[0, -1]
            next_ids = []
            for row in range(3):
                p = row_prompt[row]
                if len(got_tokens[p]) < steps:
                    got_logits[p].append(last[row].clone())
                    got_tokens[p].append(int(last[row].argmax()))
                next_ids.append(got_tokens[p][-1])
            last = model(torch.tensor(next_ids)[:, None], cache=cache)[:, -1]  # all three rows, one step each
    assert cache.lengths.tolist()[0] == len(prompts[0]) + steps + 6
    for p, (tokens, logits) in enumerate(expected):
        if p == 1:  # prompt 1 ran only 6 steps before its row was reset
            tokens, logits = tokens[:6], logits[:6]
        assert got_tokens[p][:len(tokens)] == tokens, p
        torch.testing.assert_close(torch.stack(got_logits[p][:len(tokens)]), logits, rtol=1e-5, atol=1e-5)


def test_cache_positions_beyond_the_context_are_refused():
    model = _cache_model()
    cache = KVCache.empty(model.cfg, batch_size=1, max_len=8, dtype=torch.float32)
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="beyond the context"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_causality_future_tokens_do_not_change_past_logits():
    cfg = ModelConfig.from_preset("tiny")
    model = Transformer(cfg).eval()
    a = torch.randint(0, cfg.vocab_size, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % cfg.vocab_size
    with torch.no_grad():
        assert torch.allclose(model(a)[:, :10], model(b)[:, :10], atol=1e-6)


def test_llama31_rope_scaling_changes_only_low_frequencies():
    from minillama.model import rope_inverse_frequencies

    plain = rope_inverse_frequencies(128, 500000.0, None)
    scaled = rope_inverse_frequencies(128, 500000.0, ModelConfig.from_preset("llama3.1-8b").rope_scaling)
    assert torch.equal(plain[:10], scaled[:10])  # short wavelengths untouched
    assert torch.allclose(scaled[-1], plain[-1] / 8)  # the longest divided by the factor


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(dim=100, n_heads=3), "not divisible by model.n_heads"),
        (dict(dim=64, n_heads=4, n_kv_heads=3), "not a multiple of model.n_kv_heads"),
        (dict(dim=64, n_heads=4, vocab_size=0), "model.vocab_size must be positive"),
    ],
)
def test_contradictory_config_fields_are_named(fields, message):
    with pytest.raises(MinillamaError, match=message):
        ModelConfig(**fields)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(MinillamaError, match="unknown preset 'llama9-1t'.*llama3-8b"):
        ModelConfig.from_preset("llama9-1t")


def test_presets_command_table_and_json(capsys):
    import json

    from minillama.cli import main

    assert main(["presets", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {row["name"]: row for row in rows}
    assert set(by_name) == set(PRESETS)
    assert all(by_name[name]["params"] == count for name, count in {**EXACT_COUNTS, **LADDER_COUNTS}.items())
    assert main(["presets"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["name", "params", "layers", "dim", "heads", "kv_heads", "ffn", "vocab", "context"]
    assert any(line.split()[:2] == ["llama3.1-405b", "405,853,388,800"] for line in table)
