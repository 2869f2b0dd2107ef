"""One model path, many ways to run it: the attention kernels, compilation, activation checkpointing and
dropout all compute what model.py's plain forward computes. Speed lives in benchmarks/train_throughput.py; these
guard numbers."""

import pytest
import torch
import torch.nn.functional as F

from minillama.config import ModelConfig
from minillama.kernels import _products_attention, cached_attention_matmul, causal_attention_blocked
from minillama.model import IGNORE_INDEX, Transformer
from minillama.runtime import retain_freed_memory
from minillama.train.config import OptimConfig
from minillama.train.optim import build_optimizer
from minillama.train.parallelize import DistributedContext, parallelize
from minillama.train.trainer import TrainStep

# Grouped-query attention (4 query heads over 2 key/value heads) and a length that is not a multiple of the
# blocked kernel's query block (64), so the last block is ragged.
CFG = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=160, vocab_size=256, max_seq_len=128)
SEQ_LEN = 100


def _model(tie_embeddings: bool = True, **options) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**CFG, tie_embeddings=tie_embeddings), **options)


def _batch(batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, CFG["vocab_size"], (batch, SEQ_LEN + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def _loss_and_grads(model: Transformer, loss_fn) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _assert_close(got: tuple, expected: tuple, rtol: float) -> None:
    (loss, grads), (ref_loss, ref_grads) = got, expected
    assert loss == pytest.approx(ref_loss, rel=rtol)
    for name, ref in ref_grads.items():
        error = (grads[name] - ref).abs().max().item()
        assert error <= rtol * ref.abs().max().item(), (name, error)


def _reference_loss(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss written out from the logits: what forward(tokens, targets) must equal."""
    return F.cross_entropy(model(inputs).float().flatten(0, 1), targets.flatten())


def test_forward_with_targets_is_the_cross_entropy_of_the_logits():
    model = _model(attention="sdpa")
    inputs, targets = _batch()
    targets = targets.clone()
    targets[0, -7:] = IGNORE_INDEX  # padding positions are not scored
    with torch.no_grad():
        logits = model(inputs)
        expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        assert model(inputs, targets).item() == pytest.approx(expected.item(), rel=1e-6)
        assert model(inputs, targets).dtype == torch.float32


@pytest.mark.parametrize("kernel", ["blocked", "sdpa"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_attention_kernels_give_the_same_loss_and_gradients_in_fp32(kernel, tied):
    reference = _model(tie_embeddings=tied, attention="sdpa")
    inputs, targets = _batch()
    expected = _loss_and_grads(reference, lambda: _reference_loss(reference, inputs, targets))
    model = _model(tie_embeddings=tied, attention=kernel)
    _assert_close(_loss_and_grads(model, lambda: model(inputs, targets)), expected, rtol=1e-5)


def test_auto_kernel_is_blocked_on_cpu_and_equal_to_sdpa():
    from minillama.kernels import use_blocked_attention

    assert use_blocked_attention("auto", torch.device("cpu"), 256)
    assert not use_blocked_attention("auto", torch.device("cpu"), 4096)
    assert not use_blocked_attention("auto", torch.device("cuda"), 256)
    inputs, targets = _batch()
    with torch.no_grad():
        assert _model(attention="auto")(inputs, targets).item() == pytest.approx(
            _model(attention="sdpa")(inputs, targets).item(), rel=1e-6)


def test_bf16_autocast_stays_close_to_fp32():
    model = _model(attention="blocked")
    inputs, targets = _batch()
    expected = _loss_and_grads(model, lambda: model(inputs, targets))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _loss_and_grads(model, lambda: model(inputs, targets))
    assert all(g.dtype == torch.float32 for g in got[1].values())
    _assert_close(got, expected, rtol=5e-2)  # bf16 rounds everywhere; the loss agrees far closer
    assert got[0] == pytest.approx(expected[0], rel=1e-3)


@pytest.mark.parametrize("query_block", [1, 16, 64, 70, 128])
def test_blocked_attention_equals_sdpa(query_block):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 70, 16, generator=generator, requires_grad=True)
    k = torch.randn(2, 2, 70, 16, generator=generator, requires_grad=True)
    v = torch.randn(2, 2, 70, 16, generator=generator, requires_grad=True)
    grad_out = torch.randn(2, 6, 70, 16, generator=generator)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    out = causal_attention_blocked(q, k, v, query_block=query_block)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for grad, expected_grad in zip(torch.autograd.grad(out, (q, k, v), grad_out), expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [1, 3])
def test_cached_attention_matmul_equals_sdpa(T):
    """Decoding's kernel: rows at different positions over a padded span of 40 cached keys, through the mask."""
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(3, 6, T, 16, generator=generator)
    k, v = torch.randn(2, 3, 2, 40, 16, generator=generator)
    positions = torch.tensor([39, 4, 17])[:, None] - T + 1 + torch.arange(T)  # (B, T): each row's own
    mask = torch.arange(40) <= positions[:, None, :, None]  # (B, 1, T, S)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(cached_attention_matmul(q, k, v, mask), expected, rtol=1e-5, atol=1e-6)
    # The form a compiled cache forward takes (as traced: products and sums), row by row and batched
    for row in range(3):
        got = _products_attention(q[row:row + 1], k[row:row + 1], v[row:row + 1], mask[row:row + 1])
        torch.testing.assert_close(got, expected[row:row + 1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_products_attention(q, k, v, mask), expected, rtol=1e-5, atol=1e-6)


def _trajectory(model: Transformer, steps: int = 3, **parallel) -> list[tuple[float, float]]:
    """`steps` TrainStep updates (two micro-batches each, clip, AdamW) through parallelize, in fp32."""
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2))
    train_model = parallelize(model, DistributedContext(), **parallel)
    step = TrainStep(train_model, model, optimizer, micro_batch_size=2, grad_clip=1.0, dtype="fp32")
    return [step(*_batch(batch=4, seed=10 + i))[:2] for i in range(steps)]


@pytest.mark.parametrize("variant", [dict(attention="blocked"), dict(attention="blocked", checkpointing="full"),
                                     dict(attention="blocked", checkpointing="selective"),
                                     dict(attention="auto", compile=True, checkpointing="full")],
                         ids=["blocked", "blocked+checkpointing", "blocked+selective", "compiled+checkpointing"])
def test_train_steps_follow_the_plain_trajectory(variant):
    """Three optimizer steps through the kernels and wrappers the trainer applies, against model.py's plain
    sdpa forward: the same losses, gradient norms and weights, in fp32. The compiled variant is what the
    default recipe and Shakespeare run (train.compile = true): each block and the loss head compiled."""
    plain_model = _model(attention="sdpa")
    model = _model(attention=variant["attention"])
    plain = _trajectory(plain_model)
    got = _trajectory(model, compile=variant.get("compile", False),
                      activation_checkpointing=variant.get("checkpointing", "none"))
    for (loss, norm), (plain_loss, plain_norm) in zip(got, plain):
        assert loss == pytest.approx(plain_loss, rel=1e-5)
        assert norm == pytest.approx(plain_norm, rel=1e-4)
    # Adam divides by the gradient's running rms, so where a gradient is ~1e-8 rounding-level differences move a
    # weight by a fraction of the 1e-2 step (1e-5 seen); anything wrong moves them by whole steps.
    for (name, expected), actual in zip(plain_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=2e-4, msg=name)


def test_wrappers_keep_parameter_names_and_block_hooks_fire():
    """Compile and checkpointing wrap each block from outside: state_dict names stay those of the plain model
    (checkpoints unchanged) and hooks registered on a block run in training (FSDP2 shards through them)."""
    model = _model()
    names = list(model.state_dict())
    calls = []
    model.layers[1].register_forward_pre_hook(lambda module, args: calls.append("pre"))
    train_model = parallelize(model, DistributedContext(), compile=True, activation_checkpointing="full")
    assert list(model.state_dict()) == names
    train_model(*_batch()).backward()
    assert calls  # once in the forward, again when checkpointing recomputes


def test_logits_for_the_positions_asked_for():
    model = _model()
    inputs, _ = _batch()
    with torch.no_grad():
        full = model(inputs)
        torch.testing.assert_close(model(inputs, logits_index=-1), full[:, -1:])
        index = torch.tensor([[3, 50], [99, 0]])
        torch.testing.assert_close(model(inputs, logits_index=index),
                                   torch.stack([full[0, [3, 50]], full[1, [99, 0]]]))


def test_retain_freed_memory_can_be_called_again():
    first = retain_freed_memory()
    assert retain_freed_memory() == first
    assert torch.ones(2**23).sum().item() == 2**23  # a 32 MB block still allocates and frees


@pytest.mark.parametrize("kernel", ["blocked", "sdpa"])
def test_dropout_is_reproducible_and_off_in_eval_mode(kernel):
    inputs, targets = _batch()
    with torch.no_grad():
        plain = _model(attention=kernel)(inputs, targets).item()
    model = _model(attention=kernel, dropout=0.3)
    losses = []
    for _ in range(2):
        torch.manual_seed(5)
        losses.append(model(inputs, targets).item())
    assert losses[0] == losses[1] and abs(losses[0] - plain) > 1e-4  # at initialisation the effect is small
    model.eval()
    assert model(inputs, targets).item() == pytest.approx(plain, rel=1e-6)


@pytest.mark.parametrize("settings, key", [(dict(dropout=1.0), "train.dropout"),
                                           (dict(attention="flash"), "train.attention"),
                                           (dict(parallel="zero3"), "train.parallel"),
                                           (dict(activation_checkpointing="some"), "train.activation_checkpointing")])
def test_bad_train_settings_name_the_key(settings, key):
    from minillama.errors import MinillamaError
    from minillama.train.config import TrainConfig

    with pytest.raises(MinillamaError, match=key):
        TrainConfig(**settings)


def test_gpu_mfu_benchmark_runs_in_its_cpu_form(tmp_path):
    """benchmarks/gpu_mfu.py in the tiny form CI keeps working: a row per checkpointing mode with tokens/s, an MFU
    against the measured CPU peak, a peak of tensor memory that the planner gives within 5%, and the same first
    loss whatever is recomputed (same initialisation, same batch)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_mfu.py"
    spec = importlib.util.spec_from_file_location("gpu_mfu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gpu_mfu.json"
    assert bench.main(["--device", "cpu", "--preset", "tiny", "--seq-len", "128", "--micro-batch", "4",
                       "--warmup", "1", "--steps", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["activation_checkpointing"] for row in rows] == ["none", "selective", "full"]
    for row in rows:
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1 and row["micro_batch"] == 4
        assert row["memory_ratio"] == pytest.approx(1.0, abs=0.05), row
    assert rows[0]["losses"][0] == rows[1]["losses"][0] == rows[2]["losses"][0]
    assert rows[0]["measured_memory_bytes"] > rows[1]["measured_memory_bytes"] > rows[2]["measured_memory_bytes"]
