"""The training fast path (minillama/train/fast.py) computes what model.py computes: the same loss, the same
gradients, the same training trajectory. Its speed lives in benchmarks/train_throughput.py; these guard numbers."""

import copy

import pytest
import torch

from minillama.config import ModelConfig
from minillama.model import Transformer
from minillama.train.config import OptimConfig
from minillama.train.fast import TrainingLoss, causal_attention_blocked, retain_freed_memory
from minillama.train.optim import build_optimizer
from minillama.train.parallelize import DistributedContext, parallelize
from minillama.train.trainer import TrainStep, cross_entropy_loss

# Grouped-query attention (4 query heads over 2 key/value heads) and a length that is not a multiple of the
# attention query block (64), so the last block is ragged.
CFG = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=160, vocab_size=256, max_seq_len=128)
SEQ_LEN = 100


def _model(tie_embeddings: bool = True) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**CFG, tie_embeddings=tie_embeddings))


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


@pytest.mark.parametrize("options", [dict(blocked_attention=True), dict(blocked_attention=False),
                                     dict(blocked_attention=True, activation_checkpointing=True)],
                         ids=["blocked", "sdpa", "blocked+checkpointing"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_fast_loss_and_gradients_equal_the_model_in_fp32(options, tied):
    model = _model(tie_embeddings=tied)
    inputs, targets = _batch()
    expected = _loss_and_grads(model, lambda: cross_entropy_loss(model(inputs), targets))
    fast = TrainingLoss(model, **options)
    _assert_close(_loss_and_grads(model, lambda: fast(inputs, targets)), expected, rtol=1e-5)


def test_fast_path_under_bf16_autocast_stays_close():
    model = _model()
    inputs, targets = _batch()
    fast = TrainingLoss(model, blocked_attention=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _loss_and_grads(model, lambda: cross_entropy_loss(model(inputs), targets))
        got = _loss_and_grads(model, lambda: fast(inputs, targets))
    assert all(g.dtype == torch.float32 for g in got[1].values())
    _assert_close(got, expected, rtol=5e-2)  # bf16 rounds in different places; the loss agrees far closer
    assert got[0] == pytest.approx(expected[0], rel=1e-3)


@pytest.mark.parametrize("query_block", [1, 16, 64, 70, 128])
def test_blocked_attention_equals_sdpa(query_block):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 70, 16, generator=generator, requires_grad=True)
    k = torch.randn(2, 2, 70, 16, generator=generator, requires_grad=True)
    v = torch.randn(2, 2, 70, 16, generator=generator, requires_grad=True)
    grad_out = torch.randn(2, 6, 70, 16, generator=generator)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    out = causal_attention_blocked(q, k, v, query_block=query_block)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for grad, expected_grad in zip(torch.autograd.grad(out, (q, k, v), grad_out), expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)


def test_train_step_through_the_fast_path_follows_the_plain_trajectory():
    """Three optimizer steps of TrainStep (two micro-batches each, clip, AdamW) through parallelize with and
    without the fast path: the same losses, gradient norms and weights, in fp32."""
    plain_model = _model()
    fast_model = copy.deepcopy(plain_model)
    steps = {}
    for name, model, fast_path in (("plain", plain_model, False), ("fast", fast_model, True)):
        optimizer = build_optimizer(model, OptimConfig(lr=1e-2))
        train_model = parallelize(model, DistributedContext(), fast_path=fast_path)
        steps[name] = TrainStep(train_model, model, optimizer, micro_batch_size=2, grad_clip=1.0, dtype="fp32")
    assert steps["fast"].computes_loss and not steps["plain"].computes_loss
    for i in range(3):
        inputs, targets = _batch(batch=4, seed=10 + i)
        plain_loss, plain_norm, _ = steps["plain"](inputs, targets)
        fast_loss, fast_norm, _ = steps["fast"](inputs, targets)
        assert fast_loss == pytest.approx(plain_loss, rel=1e-5)
        assert fast_norm == pytest.approx(plain_norm, rel=1e-4)
    # Adam divides by the gradient's running rms, so where a gradient is ~1e-8 rounding-level differences move a
    # weight by a fraction of the 1e-2 step (1e-5 seen); anything wrong in the fast path moves them by whole steps.
    for (name, plain), fast in zip(plain_model.named_parameters(), fast_model.parameters()):
        torch.testing.assert_close(fast, plain, rtol=0, atol=2e-4, msg=name)


def test_fast_module_without_targets_returns_the_model_logits():
    model = _model()
    inputs, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(TrainingLoss(model)(inputs), model(inputs))


def test_retain_freed_memory_can_be_called_again():
    first = retain_freed_memory()
    assert retain_freed_memory() == first
    assert torch.ones(2**23).sum().item() == 2**23  # a 32 MB block still allocates and frees


def test_dropout_is_reproducible_and_off_in_eval_mode():
    model = _model()
    inputs, targets = _batch()
    plain = cross_entropy_loss(model(inputs), targets).item()
    fast = TrainingLoss(model, blocked_attention=True, dropout=0.3)
    losses = []
    for _ in range(2):
        torch.manual_seed(5)
        losses.append(fast(inputs, targets).item())
    assert losses[0] == losses[1] and abs(losses[0] - plain) > 1e-4  # at initialisation the effect is small
    fast.eval()
    assert fast(inputs, targets).item() == pytest.approx(plain, rel=1e-5)


@pytest.mark.parametrize("settings, key", [(dict(dropout=1.0), "train.dropout"),
                                           (dict(dropout=0.1, fast_path=False), "train.fast_path")])
def test_bad_dropout_settings_name_the_key(settings, key):
    from minillama.errors import MinillamaError
    from minillama.train.config import TrainConfig

    with pytest.raises(MinillamaError, match=key):
        TrainConfig(**settings)
