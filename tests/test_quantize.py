"""Weight-only int8 / int4 quantization (minillama/quantize.py): the arithmetic's error bounds, the modules
against x @ dequantized(W).T, save/load round trips, the quality gate on a model trained here, and the CLI."""

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from minillama import ModelConfig, Transformer
from minillama.checkpoint import load, save
from minillama.cli import main
from minillama.errors import MinillamaError
from minillama.eval import evaluate_text
from minillama.interop.hf import ties_output
from minillama.quantize import (
    Int4Linear,
    Int8Linear,
    QuantizationSpec,
    default_scale_dtype,
    dequantize_int4,
    dequantize_int8,
    pack_nibbles,
    quantize,
    quantize_int4,
    quantize_int8,
    unpack_nibbles,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a shared 2-core machine, two threads' barriers made the training fixture 50x slower
    (minutes instead of seconds). These tests check values, not speed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
SMALL = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=384, vocab_size=512, max_seq_len=64)
TRAINED = dict(SMALL, dim=64, ffn_hidden_dim=192)  # 0.13M parameters: trains in seconds


def weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Gaussian rows at scales spanning 1e-3..1, a few outliers, an all-zero row and a row offset from zero (the
    asymmetric int4 case): what trained projections look like, and the edge cases of the scale arithmetic."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 0, n)[:, None]
    w[1, 5] = 40 * w[1].abs().max()
    w[2] = 0
    w[3] = w[3].abs() + 0.5
    return w


# --------------------------------------------------------------------------------------------------------------
# The arithmetic
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_int8_error_is_at_most_half_a_scale(scale_dtype):
    w = weights(64, 256)
    q, scale = quantize_int8(w, scale_dtype)
    assert q.dtype == torch.int8 and scale.dtype == scale_dtype and int(q.abs().max()) <= 127
    error = (w - dequantize_int8(q, scale)).abs()
    bound = scale.float()[:, None] / 2
    assert bool((error <= bound * (1 + 1e-6)).all()), float((error / bound).max())
    assert int(q.abs().amax(dim=1)[0]) == 127  # each row's largest weight uses the full range
    assert float(error[2].max()) == 0.0  # the zero row


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_int4_error_is_at_most_half_a_scale(group_size, scale_dtype):
    w = weights(32, 256)
    q, scale, zero = quantize_int4(w, group_size, scale_dtype)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scale.shape == (32, 256 // group_size)
    error = (w - dequantize_int4(q, scale, zero)).abs().view(32, -1, group_size)
    bound = scale.float()[..., None] / 2 * (1 + 1e-5)
    assert bool((error <= bound).all()), float((error / bound).max())
    # The stored scale is the ideal (max - min) / 15 up to rounding, plus what covers the rounding of the zero
    # point (which matters only for a group far from 0, such as row 3's).
    w_groups = w.view(32, -1, group_size)
    ideal = (w_groups.amax(-1) - w_groups.amin(-1)) / 15
    eps = torch.finfo(scale_dtype).eps
    assert bool((scale.float() <= ideal * (1 + 4 * eps) + eps * zero.float().abs() + 1e-30).all())
    q_groups = q.view(32, -1, group_size)
    spans_the_range = (q_groups.amax(-1) >= 14) & (q_groups.amin(-1) <= 1)  # (32, K/G)
    assert bool(spans_the_range[[0, 1, *range(4, 32)]].all())  # not the zero row, nor row 3 (its scale grew)


def test_nibble_packing_round_trip():
    q = torch.randint(0, 16, (16, 64), dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert packed.shape == (16, 32) and torch.equal(packed[0, 0], q[0, 0] * 16 + q[0, 1])
    assert torch.equal(unpack_nibbles(packed), q)


# --------------------------------------------------------------------------------------------------------------
# The modules
# --------------------------------------------------------------------------------------------------------------
def linear(n: int, k: int, dtype: torch.dtype) -> nn.Linear:
    module = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        module.weight.copy_(weights(n, k) * 0.05)
    return module.to(dtype)


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("method, group_size", [("int8", None), ("int4", 32), ("int4", 128)])
def test_quantized_linear_equals_x_times_dequantized_weight(method, group_size, dtype, rtol):
    source = linear(48, 256, dtype)
    module = Int8Linear.from_linear(source) if method == "int8" else Int4Linear.from_linear(source, group_size)
    x = torch.randn(3, 5, 256).to(dtype)
    expected = x.double() @ module.dequantized().double().T  # (3, 5, 48)
    got = module(x)
    assert got.shape == (3, 5, 48) and got.dtype == dtype
    assert float((got.double() - expected).norm() / expected.norm()) < rtol


def test_int8_shapes_and_views_the_kernel_cannot_take_still_compute_the_same():
    """aten's int8 kernel crashes on K % 16 != 0 and on misaligned inputs: those take the dequantizing path or a
    copy, and give x @ dequantized(W).T all the same."""
    odd = Int8Linear.from_linear(linear(32, 40, torch.bfloat16))  # K = 40: the dequantizing path
    x = torch.randn(6, 40).to(torch.bfloat16)
    assert torch.allclose(odd(x).float(), x.float() @ odd.dequantized().T, rtol=1e-2, atol=1e-2)
    module = Int8Linear.from_linear(linear(48, 256, torch.bfloat16))
    buffer = torch.randn(3 * 256 + 3).to(torch.bfloat16)
    view = buffer[3:].view(3, 256)  # 6 bytes past an aligned start
    assert torch.equal(module(view), module(view.clone()))


def test_int4_module_reads_back_its_values_and_survives_a_state_dict_round_trip():
    source = linear(32, 128, torch.bfloat16)
    module = Int4Linear.from_linear(source, 64)
    q, scale, zero = quantize_int4(source.weight, 64, torch.bfloat16)
    assert torch.equal(module.unpacked(), q)
    state = module.state_dict()
    assert set(state) == {"weight_packed", "weight_scale", "weight_zero"}
    assert torch.equal(state["weight_packed"], pack_nibbles(q)) and torch.equal(state["weight_scale"], scale)
    fresh = Int4Linear(128, 32, 64)
    fresh.load_state_dict(state)
    x = torch.randn(4, 128).to(torch.bfloat16)
    assert torch.equal(fresh(x), module(x))
    moved = copy.deepcopy(module).to("cpu").to(torch.float32)  # a cast reaches the scales; x follows them
    assert moved.scale_and_zero.dtype == torch.float32 and torch.equal(moved.unpacked(), q)


def small_model(tie: bool = True, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**SMALL, tie_embeddings=tie)).eval()


def test_quantize_replaces_every_projection_and_can_keep_the_head():
    model = quantize(small_model(), "int8")
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, (nn.Linear, Int8Linear))}
    assert len(kinds) == 2 * 7 + 1 and set(kinds.values()) == {"Int8Linear"}
    assert isinstance(model.tok_embeddings.weight, nn.Parameter)  # the embedding stays floating point

    kept = quantize(small_model(), "int4", 32, quantize_output=False)
    assert type(kept.output) is nn.Linear and kept.output.weight is kept.tok_embeddings.weight
    assert isinstance(kept.layers[1].feed_forward.w2, Int4Linear)


@pytest.mark.parametrize("capability", ["AVX512", "AVX2"])
@pytest.mark.parametrize("method, group_size", [("int8", None), ("int4", 32)])
def test_an_fp32_model_on_an_avx2_or_avx512_cpu_runs_its_quantized_matmuls_in_bf16(method, group_size, capability,
                                                                                    monkeypatch):
    """PyTorch's CPU int8/int4 kernels are vectorized for bf16 activations only: fp32 ones took a scalar path
    (AVX-512, 15m: matmuls 4.5-9.5x, decoding 2.7x slower; AVX2, 350m: decoding 3.4-8.7x slower; RESULTS.md).
    So an fp32 model quantized on such a CPU gets bf16 scales, and its layers still take and give fp32,
    computing x @ dequantized(W).T to bf16's precision."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    model = quantize(small_model(), method, group_size)
    layer = model.layers[0].feed_forward.w1
    scales = layer.weight_scale if method == "int8" else layer.scale_and_zero
    assert scales.dtype == torch.bfloat16
    x = torch.randn(3, layer.in_features)
    got = layer(x)
    expected = x.double() @ layer.dequantized().double().T
    assert got.dtype == torch.float32 and float((got.double() - expected).norm() / expected.norm()) < 1e-2

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")  # no AVX2: not measured
    other = quantize(small_model(), method, group_size).layers[0].feed_forward.w1
    assert (other.weight_scale if method == "int8" else other.scale_and_zero).dtype == torch.float32
    assert default_scale_dtype(torch.bfloat16, torch.device("cpu")) == torch.bfloat16
    assert default_scale_dtype(torch.float32, torch.device("cuda")) == torch.float32
    explicit = quantize(small_model(), method, group_size, scale_dtype=torch.float32).layers[0].feed_forward.w1
    assert (explicit.weight_scale if method == "int8" else explicit.scale_and_zero).dtype == torch.float32


@pytest.mark.parametrize("method, group_size", [("int8", None), ("int4", 32)])
def test_a_quantized_checkpoint_loaded_in_fp32_on_an_avx2_cpu_keeps_bf16_scales(method, group_size, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    source = quantize(small_model(), method, group_size)
    save(source, None, tmp_path / "q")
    model, _ = load(tmp_path / "q", dtype=torch.float32)
    layer = model.layers[1].attention.wo
    assert model.norm.weight.dtype == torch.float32
    assert (layer.weight_scale if method == "int8" else layer.scale_and_zero).dtype == torch.bfloat16
    x = torch.randn(2, 3, layer.in_features)
    assert torch.equal(layer(x), source.layers[1].attention.wo(x))  # the same values, the same kernel

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    model, _ = load(tmp_path / "q", dtype=torch.float32)
    layer = model.layers[1].attention.wo
    assert (layer.weight_scale if method == "int8" else layer.scale_and_zero).dtype == torch.float32


@pytest.mark.parametrize("method, group_size, message", [
    ("int3", None, "unknown quantization 'int3'"),
    ("int4", 48, "group size must be one of 32, 64, 128, 256"),
    ("int4", 256, "group size 256 does not divide its input dimension 128"),
    ("int8", 64, "group size applies to int4 only"),
])
def test_bad_quantization_requests_leave_the_model_untouched(method, group_size, message):
    model = small_model()
    with pytest.raises(MinillamaError, match=message):
        quantize(model, method, group_size)
    assert all(type(m) is nn.Linear for m in [model.output, model.layers[0].attention.wq])
    quantize(model, "int8")
    with pytest.raises(MinillamaError, match="already quantized"):
        quantize(model, "int8")


# --------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("method, group_size, quantize_output", [("int8", None, True), ("int4", 32, True),
                                                                 ("int4", 64, False)])
def test_saved_and_loaded_quantized_model_gives_identical_logits(tmp_path, tie, method, group_size,
                                                                 quantize_output):
    model = quantize(small_model(tie).to(torch.bfloat16), method, group_size, quantize_output=quantize_output)
    model.reset_buffers()  # .to(bfloat16) cast the RoPE frequencies; loading derives them in fp32
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 24))
    save(model, None, tmp_path / "q", max_shard_bytes=100_000)  # sharded, to cover the index too
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"] == QuantizationSpec(method, group_size, quantize_output).to_hf()
    assert not (tmp_path / "q" / "model.safetensors").exists()
    loaded, _ = load(tmp_path / "q")
    assert torch.equal(loaded(tokens), model(tokens))
    assert type(loaded.layers[0].attention.wk) is type(model.layers[0].attention.wk)
    assert ties_output(loaded) == (tie and not quantize_output)


def test_quantizing_at_load_time_equals_quantizing_after_loading(tmp_path):
    save(small_model(), None, tmp_path / "bf16", dtype=torch.bfloat16)
    tokens = torch.randint(0, SMALL["vocab_size"], (1, 16))
    for method, group_size in [("int8", None), ("int4", 64)]:
        model, _ = load(tmp_path / "bf16", quantize=method, group_size=group_size)
        reference = quantize(load(tmp_path / "bf16")[0], method, group_size)
        assert torch.equal(model(tokens), reference(tokens))
    save(quantize(small_model(), "int8"), None, tmp_path / "int8")
    with pytest.raises(MinillamaError, match="already quantized"):
        load(tmp_path / "int8", quantize="int4")
    with pytest.raises(MinillamaError, match="group size 32 given without quantize="):
        load(tmp_path / "bf16", group_size=32)


def test_quantized_checkpoint_with_wrong_tensors_or_config_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    save(quantize(small_model(), "int8"), None, tmp_path / "q")
    weights_file = tmp_path / "q" / "minillama-quantized.safetensors"
    tensors = load_file(weights_file)
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name].to(torch.bfloat16)  # int8 values stored as floats would load as garbage
    save_file(tensors, weights_file, metadata={"format": "pt"})
    with pytest.raises(MinillamaError, match=rf"tensor {name} has dtype torch.bfloat16 but config.json implies "
                                             r"torch.int8"):
        load(tmp_path / "q")
    config_file = tmp_path / "q" / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    config_file.write_text(json.dumps(config))
    with pytest.raises(MinillamaError, match="quant_method='gptq'; minillama reads only its own 'minillama'"):
        load(tmp_path / "q")


def test_transformers_refuses_a_quantized_checkpoint_instead_of_loading_garbage(tmp_path):
    transformers = pytest.importorskip("transformers")
    save(quantize(small_model(), "int8"), None, tmp_path / "q")
    for cls in (transformers.AutoModelForCausalLM, transformers.LlamaForCausalLM):
        with pytest.raises(OSError, match="no file named model.safetensors"):
            cls.from_pretrained(tmp_path / "q")


# --------------------------------------------------------------------------------------------------------------
# The quality gate on a model trained here, and the command line
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str]:
    """A 0.13M-parameter model trained for 400 steps (~10 s) on 270 kB of tinyshakespeare with its own 512-token
    BPE; returns its checkpoint (fp32, as the trainer saves) and the next 20 kB as held-out text. It reaches a
    held-out perplexity of ~37 (a uniform guess: 512), where int8 costs ~0.0% and int4 (group 32) ~0.8%."""
    from minillama.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("trained")
    text = (SHARED / "tinyshakespeare.txt").read_text()
    train_text, held_out = text[:270_000], text[270_000:290_000]
    (root / "train.txt").write_text(train_text)
    tokenizer = train_bpe(root / "train.txt", TRAINED["vocab_size"])
    ids = torch.tensor(tokenizer.encode(train_text))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TRAINED, tie_embeddings=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    seq_len, batch = 64, 8
    for step in range(400):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,))
        window = torch.stack([ids[s:s + seq_len + 1] for s in starts.tolist()])
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 30)
        loss = model(window[:, :-1], window[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    save(model, tokenizer, root / "model")
    return root / "model", held_out


def held_out_perplexity(checkpoint: Path, text: str, **load_args) -> float:
    model, tokenizer = load(checkpoint, dtype=torch.bfloat16, **load_args)
    return evaluate_text(model, tokenizer, text, seq_len=64, batch_size=16).perplexity


def test_quantized_perplexity_is_within_the_gates(trained):
    checkpoint, held_out = trained
    bf16 = held_out_perplexity(checkpoint, held_out)
    assert bf16 < 45  # it learned something (a uniform guess over 512 tokens is 512)
    int8 = held_out_perplexity(checkpoint, held_out, quantize="int8")
    int4 = held_out_perplexity(checkpoint, held_out, quantize="int4")  # the default group size, 32
    assert int8 <= bf16 * 1.01, (bf16, int8)
    assert int4 <= bf16 * 1.05, (bf16, int4)
    assert int8 != bf16 and int4 != int8  # the weights really changed


def test_cli_quantize_then_eval_and_generate(trained, tmp_path, capsys):
    checkpoint, held_out = trained
    (tmp_path / "held_out.txt").write_text(held_out)
    out = tmp_path / "int4"
    assert main(["quantize", str(checkpoint), "--to", "int4", "--group-size", "64", "--out", str(out)]) == 0
    assert "int4 weight-only, group size 64" in capsys.readouterr().out
    assert (out / "tokenizer.json").exists()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 64

    assert main(["eval", "--checkpoint", str(out), "--data", str(tmp_path / "held_out.txt"), "--seq-len", "64",
                 "--json"]) == 0
    saved = json.loads(capsys.readouterr().out)
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "held_out.txt"), "--seq-len",
                 "64", "--json", "--quantize", "int4", "--group-size", "64"]) == 0
    at_load = json.loads(capsys.readouterr().out)
    # The same int4 values; the saved copy went through bf16 storage of the embedding and norms.
    assert abs(saved["perplexity"] / at_load["perplexity"] - 1) < 0.01

    assert main(["generate", "--checkpoint", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "8",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "ROMEO:", "--max-new-tokens", "8",
                 "--quantize", "int8"]) == 0


@pytest.mark.parametrize("args, message", [
    (["--to", "int3"], "unknown quantization 'int3'; expected one of int8, int4"),
    (["--to", "int4", "--group-size", "128"], "group size 128 does not divide its input dimension 64"),
    (["--to", "int8", "--group-size", "32"], "group size applies to int4 only"),
])
def test_cli_bad_requests_are_one_line_and_write_nothing(trained, tmp_path, capsys, args, message):
    checkpoint, _ = trained
    assert main(["quantize", str(checkpoint), *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_cli_refuses_to_quantize_twice(trained, tmp_path, capsys):
    checkpoint, _ = trained
    assert main(["quantize", str(checkpoint), "--to", "int8", "--out", str(tmp_path / "int8")]) == 0
    capsys.readouterr()
    assert main(["quantize", str(tmp_path / "int8"), "--to", "int4", "--out", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert "is already quantized (int8)" in err and err.count("\n") == 1
    assert main(["eval", "--checkpoint", str(tmp_path / "int8"), "--data", str(checkpoint / "tokenizer.json"),
                 "--quantize", "int8"]) == 2
    assert "already quantized" in capsys.readouterr().err
