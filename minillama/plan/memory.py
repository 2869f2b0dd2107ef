"""Memory of a training step and of serving, per GPU, counted from what our model and trainer actually keep.

Model states (ZeRO, Rajbhandari et al. 2020, §3 and Fig. 1), bytes per parameter by precision policy:
    bf16       (our trainer)  fp32 weights 4, fp32 gradients 4, AdamW m and v 8; bf16 copies of the matmul
                              weights (2) made by autocast and held until the step's backward ends
    fp32                      4 + 4 + 8
    mixed      (ZeRO paper)   16-bit weights 2, 16-bit gradients 2, fp32 master weights + m + v 12 ("K = 12")
    pure-bf16                 2 + 2 + bf16 m and v 4
ZeRO stage 1 shards the optimizer states over the data-parallel ranks, stage 2 the gradients too, stage 3 (= FSDP)
the weights too; tensor (tp) and pipeline (pp) parallelism divide all three.

Activations are what autograd saves for backward, per token and per layer, read off `minillama.model` (and
checked against a census of saved tensors in tests/test_plan.py). With C model dim, Hq = heads x head_dim,
Kv = kv_heads x head_dim, H heads, F SwiGLU width, a activation bytes (2 in bf16 autocast, 4 in fp32):
    RMSNorm (x2)     its fp32 input, the fp32 normalised x, and 1/rms (4 bytes/token); fp32 additionally keeps the
                     weighted output; 16-bit models keep an fp32 upcast, 1/rms and two 16-bit tensors
    matmul inputs    autocast casts the norm output to bf16 once per consuming matmul: 3 for wq/wk/wv, 2 for
                     w1/w3 (5aC in all); in fp32 the three (two) matmuls share one saved input
    attention        q, k, v after RoPE and the output (a·(2Hq + 2Kv)), the log-sum-exp (4H). Fused (flash /
                     memory-efficient) attention keeps no T x T matrix; with GQA k and v are not repeated.
                     The blocked kernel (kernels.py, CPU training) keeps no log-sum-exp but its softmax
                     probabilities: H x (keys each query block sees) per token, a bytes each, about
                     a·H·(T + 64)/2 per token for query blocks of 64
    SwiGLU           w1 x, w3 x, silu(w1 x) and their product (4aF)
For bf16 autocast this is 26C + 4Hq + 4Kv + 4H + 8F + 8 bytes per token per layer; compare Korthikanti et al.
2022 (eq. 1), 34·C + 5·H·T for GPT with 16-bit norms and an unfused attention. The head keeps the final norm, its
bf16 input and the fp32 log-softmax (4V), and the loss's backward briefly holds two more fp32 (T, V) tensors.

Activation checkpointing of each block (torch.utils.checkpoint, non-reentrant) keeps only the block input (4C in
fp32 residual) and recomputes one block at a time in backward; "selective" keeps the outputs of matmuls and of
attention and recomputes norms, RoPE and SwiGLU's pointwise ops (torchtitan's op-level selective AC, the policy in
train/parallelize.py): with C, Hq, Kv, F, H as above, residual·C + a·(2Hq + 2Kv + 2C + 2F) plus sdpa's 4H
log-sum-exp, or with the blocked kernel its score matrices (the size of its probabilities: its matmul outputs).
Both are checked against a census of what stays alive after the forward (tests/test_plan.py). The bf16
weight copies are counted as held through backward, as they are on CPU. On CUDA, backward runs on autograd's
device thread, and the first recompute leaves its autocast region there (autocast's nesting count is per thread,
its cast cache process-wide), which empties the cache: from then on only the recomputed block's copies exist, so
the later phases sit below this estimate, never above it (for the 125m and 1b benchmark rows the peak stays at the
loss's backward either way).

The peak is the largest of a few moments of the step: the loss's backward (all activations live), the output
head's backward, the first recomputed block, the first block's backward (every other gradient made), and the end
of backward (all gradients live). A block's backward holds, besides what was kept for it, the gradients of its
SwiGLU activations and, with checkpointing, what the recomputation rebuilds (`block_backward_bytes`). Gradients persist
through the forward pass only with gradient accumulation or data parallelism; otherwise `zero_grad(set_to_none)`
frees them between steps. AdamW is the fused kernel (no full-size temporaries).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from minillama.config import ModelConfig
from minillama.errors import MinillamaError
from minillama.kernels import QUERY_BLOCK
from minillama.plan.flops import layer_matmul_params

PRECISIONS = ("bf16", "fp32", "mixed", "pure-bf16")
CHECKPOINTING = ("none", "selective", "full")


@dataclass(frozen=True)
class Policy:
    """Bytes per parameter of each model state, and of activations, under one precision policy."""

    weight: float
    grad: float
    optimizer: float
    working_copy: float  # bf16 copies autocast makes of matmul weights (0 when weights are already 16-bit)
    activation: int  # bytes of a matmul activation
    residual: int  # bytes of the residual stream between blocks
    autocast: bool


POLICIES = {
    "bf16": Policy(4, 4, 8, 2, 2, 4, True),
    "fp32": Policy(4, 4, 8, 0, 4, 4, False),
    "mixed": Policy(2, 2, 12, 0, 2, 2, False),
    "pure-bf16": Policy(2, 2, 4, 0, 2, 2, False),
}


def get_policy(precision: str) -> Policy:
    if precision not in POLICIES:
        raise MinillamaError(f"unknown precision {precision!r}; known: {', '.join(POLICIES)}")
    return POLICIES[precision]


def _norm_bytes(cfg: ModelConfig, policy: Policy) -> int:
    """Saved by one RMSNorm per token. bf16 autocast: the fp32 input, the fp32 normalised x (for the weight's
    gradient) and 1/rms (4 bytes). fp32: those and the weighted output (the one input its matmuls share). A 16-bit
    model: the fp32 upcast of its input, 1/rms, the 16-bit normalised x and the 16-bit weighted output."""
    C = cfg.dim
    if policy.autocast:
        return 8 * C + 4
    if policy.activation == 4:
        return 12 * C + 4
    return 4 * C + 4 + 2 * C + 2 * C


def blocked_attention_keys_per_token(seq_len: int, query_block: int = QUERY_BLOCK) -> float:
    """Mean number of keys whose probabilities the blocked kernel keeps per query position: the block [start,
    end) keeps n x end of them."""
    kept = sum((min(seq_len, start + query_block) - start) * min(seq_len, start + query_block)
               for start in range(0, seq_len, query_block))
    return kept / seq_len


def layer_activation_bytes(cfg: ModelConfig, precision: str = "bf16", activation_checkpointing: str = "none",
                           attention: str = "sdpa", seq_len: int | None = None) -> int | float:
    """Bytes autograd keeps per token for one transformer block until that block's backward. `attention` is the
    kernel that runs ("sdpa" or "blocked", resolved: see kernels.use_blocked_attention); "blocked" needs
    `seq_len`, since its probabilities grow with it."""
    policy = get_policy(precision)
    if activation_checkpointing not in CHECKPOINTING:
        raise MinillamaError(f"unknown activation checkpointing {activation_checkpointing!r}; "
                             f"known: {', '.join(CHECKPOINTING)}")
    C, F, H = cfg.dim, cfg.ffn_hidden_dim, cfg.n_heads
    q_width, kv_width = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    a = policy.activation
    if attention == "blocked":
        if seq_len is None:
            raise MinillamaError("the blocked attention kernel's activations depend on the sequence length")
        # its softmax probabilities (or, under selective checkpointing, the scores of the same shape)
        attention_matrix = a * H * blocked_attention_keys_per_token(seq_len)
    elif attention == "sdpa":
        attention_matrix = 4 * H  # no T x T matrix: the fp32 log-sum-exp
    else:
        raise MinillamaError(f"unknown attention kernel {attention!r}; expected 'sdpa' or 'blocked'")
    if activation_checkpointing == "full":
        return policy.residual * C  # the block input; cos/sin are shared by all blocks
    if activation_checkpointing == "selective":
        # What train/parallelize.py's policy keeps: the block input, the outputs of wq, wk, wv, wo, w1, w3, w2,
        # and attention's output with its log-sum-exp (sdpa) or its score and value batched matmuls (blocked).
        return (policy.residual * C + a * (q_width + 2 * kv_width) + a * q_width + attention_matrix + 2 * a * C
                + 2 * a * F)
    matmul_inputs = 5 * a * C if policy.autocast else 0  # fp32/16-bit models: the norm's saved output is the input
    attention_bytes = a * (2 * q_width + 2 * kv_width) + attention_matrix
    return 2 * _norm_bytes(cfg, policy) + matmul_inputs + attention_bytes + 4 * a * F


def head_activation_bytes(cfg: ModelConfig, precision: str = "bf16") -> int:
    """Bytes kept per token after the blocks: the final norm, the head's bf16 input (autocast), the fp32 log-softmax
    of the logits, and the int64 input ids and targets."""
    policy = get_policy(precision)
    cast = 2 * cfg.dim if policy.autocast else 0
    return _norm_bytes(cfg, policy) + cast + 4 * cfg.vocab_size + 16


def loss_backward_transient_bytes(cfg: ModelConfig) -> int:
    """Extra bytes per token while the loss's backward runs: the gradient of the log-softmax's output and of its
    input, both fp32 (T, V), on top of the saved log-softmax."""
    return 8 * cfg.vocab_size


def block_backward_bytes(cfg: ModelConfig, precision: str = "bf16", activation_checkpointing: str = "none",
                         attention: str = "sdpa", seq_len: int | None = None) -> int | float:
    """Bytes per token one block's backward adds to the activations kept for it: with checkpointing, what its
    recomputation makes beyond what was kept (the whole block's saved tensors less the kept outputs other than
    the block input, which the recomputation reuses); always, the gradients of the SwiGLU's two hidden
    activations, alive together while its backward runs (2aF: measured, tests/test_plan.py)."""
    a = get_policy(precision).activation
    transient = 2 * a * cfg.ffn_hidden_dim
    if activation_checkpointing == "none":
        return transient
    whole = layer_activation_bytes(cfg, precision, "none", attention, seq_len)
    kept = layer_activation_bytes(cfg, precision, activation_checkpointing, attention, seq_len)
    block_input = get_policy(precision).residual * cfg.dim
    return whole - (kept - block_input) + transient


def activation_bytes_per_sequence(cfg: ModelConfig, seq_len: int, dtype: str = "bf16",
                                  activation_checkpointing: str = "none", attention: str = "sdpa") -> int:
    """Peak activation bytes one sequence of `seq_len` tokens adds to a training step on one device: every
    block's saved tensors, the head's, the loss's backward transients, and (with checkpointing) one recomputed
    block. `dtype` is the trainer's ("bf16" autocast or "fp32") or any precision policy above; `attention` the
    kernel that runs."""
    per_token = (cfg.n_layers * layer_activation_bytes(cfg, dtype, activation_checkpointing, attention, seq_len)
                 + head_activation_bytes(cfg, dtype) + loss_backward_transient_bytes(cfg))
    if activation_checkpointing != "none":
        per_token += block_backward_bytes(cfg, dtype, activation_checkpointing, attention, seq_len)
    return round(per_token * seq_len)


def _ceil_div(a: float, b: float) -> int:
    return int(math.ceil(a / b - 1e-12))


def training_memory(cfg: ModelConfig | None, params: int, *, micro_batch: int = 1, seq_len: int = 2048,
                    precision: str = "bf16", dp: int = 1, tp: int = 1, pp: int = 1, zero: int = 0,
                    activation_checkpointing: str = "none", grad_accum: int = 1, attention: str = "sdpa") -> dict:
    """Peak training memory per GPU in bytes, as parts that sum to `total` at the peak moment:
    weights, gradients, optimizer, activations, working_weights; plus `peak_phase` naming the moment.

    `cfg` None (a bare parameter count) gives the model states only (activations unknown)."""
    policy = get_policy(precision)
    if zero not in (0, 1, 2, 3):
        raise MinillamaError(f"ZeRO stage must be 0, 1, 2 or 3 (3 = FSDP), got {zero}")
    model_split = tp * pp
    weights = params * policy.weight / model_split / (dp if zero >= 3 else 1)
    grads = params * policy.grad / model_split / (dp if zero >= 2 else 1)
    optimizer = params * policy.optimizer / model_split / (dp if zero >= 1 else 1)
    persistent_grads = grad_accum > 1 or dp > 1  # accumulation, or DDP buckets / sharded-gradient buffers
    if cfg is None:
        return dict(total=weights + grads + optimizer, weights=weights, gradients=grads, optimizer=optimizer,
                    activations=None, working_weights=0.0, peak_phase="model states only (no architecture)")

    layer_params = sum(layer_matmul_params(cfg).values())
    head_params = cfg.dim * cfg.vocab_size
    layers_per_stage = cfg.n_layers / pp
    compute_bytes = policy.activation if policy.activation == 2 else 4
    if zero >= 3:
        # FSDP gathers one unit (a block, or the embedding + head) at a time and prefetches the next.
        units = sorted([layer_params, head_params, layer_params], reverse=True)
        working = compute_bytes * (units[0] + units[1]) / tp
    else:
        working = policy.working_copy * (layers_per_stage * layer_params + head_params / pp) / tp
    tokens = micro_batch * seq_len
    # Our trainer under FSDP gathers its weights in bf16 (MixedPrecisionPolicy, train/parallelize.py): the
    # activations are a 16-bit model's (no autocast casts, a bf16 residual stream), the states stay as above.
    act_precision = "pure-bf16" if precision == "bf16" and zero >= 3 else precision
    layer_act = layer_activation_bytes(cfg, act_precision, activation_checkpointing, attention, seq_len) * tokens / tp
    backward_extra = block_backward_bytes(cfg, act_precision, activation_checkpointing, attention,
                                          seq_len) * tokens / tp
    layer_grad = policy.grad * layer_params / tp / (dp if zero >= 2 else 1)
    head_act = head_activation_bytes(cfg, act_precision) * tokens / tp
    logits_transient = loss_backward_transient_bytes(cfg) * tokens / tp
    head_grad = policy.grad * head_params / tp / (dp if zero >= 2 else 1)
    head_grad_cast = 2 * head_params / tp if policy.autocast else 0.0  # bf16 grad of the weight copy, then fp32
    in_flight = min(pp, grad_accum)  # 1F1B: the first stage holds pp micro-batches' activations
    static = weights + optimizer + working
    held_grads = grads if persistent_grads else 0.0

    phases: dict[str, tuple[float, float]] = {}  # phase -> (gradients present, activations present)
    stages = [("", layers_per_stage * in_flight, True)] if pp == 1 else [
        (" (first pipeline stage)", layers_per_stage * in_flight, False),
        (" (last pipeline stage)", layers_per_stage, True)]
    for label, layers_held, has_head in stages:
        act = layers_held * layer_act
        if has_head:
            phases["loss backward" + label] = (held_grads, act + head_act + logits_transient)
            phases["output head backward" + label] = (
                held_grads + (0.0 if persistent_grads else head_grad) + head_grad_cast,
                act + head_act - 4 * cfg.vocab_size * tokens / tp + 2 * cfg.vocab_size * tokens / tp)
        if activation_checkpointing != "none":
            phases["first recomputed block" + label] = (
                held_grads + (0.0 if persistent_grads or not has_head else head_grad), act + backward_extra)
        # the stage's first block: every other block's gradients made, only its own activations (and those of
        # micro-batches still in flight) left
        phases["backward of the first block" + label] = (
            grads if persistent_grads else grads - layer_grad,
            act - (layers_per_stage - 1) * layer_act + backward_extra)
        # end of backward: every gradient, the tied embedding's dense gradient about to be added in
        embedding_grad = head_grad if cfg.tie_embeddings else 0.0
        phases["end of backward" + label] = (grads + embedding_grad, 0.0)
    peak_phase, (grad_part, act_part) = max(phases.items(), key=lambda item: sum(item[1]))
    return dict(total=static + grad_part + act_part, weights=weights, gradients=grad_part, optimizer=optimizer,
                activations=act_part, working_weights=working, peak_phase=peak_phase)


def min_gpus_to_train(cfg: ModelConfig | None, params: int, memory_bytes: float, *, micro_batch: int,
                      seq_len: int, precision: str, tp: int, pp: int, activation_checkpointing: str,
                      grad_accum: int) -> int | None:
    """The fewest GPUs (tp x pp x dp, fully sharded with ZeRO-3/FSDP over dp) whose per-GPU peak fits in
    `memory_bytes`; None when the activations of one micro-batch alone do not fit."""

    def fits(dp: int) -> bool:
        return training_memory(cfg, params, micro_batch=micro_batch, seq_len=seq_len, precision=precision, dp=dp,
                               tp=tp, pp=pp, zero=3, activation_checkpointing=activation_checkpointing,
                               grad_accum=grad_accum)["total"] <= memory_bytes

    if fits(1):
        return tp * pp
    high = 2
    while not fits(high):
        high *= 2
        if high > 2**24:
            return None
    low = high // 2  # fits(low) is False, fits(high) is True
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high * tp * pp


# --------------------------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------------------------
# Bytes per weight. int8/int4 leave out their scales (per channel for int8; for int4 one 16-bit scale per group of
# 128 weights adds 3%).
WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}


def weight_bytes(params: int, dtype: str) -> float:
    if dtype not in WEIGHT_BYTES:
        raise MinillamaError(f"unknown dtype {dtype!r}; known: {', '.join(WEIGHT_BYTES)}")
    return params * WEIGHT_BYTES[dtype]


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: str = "bf16") -> int:
    """2 (k and v) x layers x kv_heads x head_dim x bytes: the cache in fp32 for fp32 weights, else 16-bit
    (quantized weights keep a 16-bit cache)."""
    element = 4 if dtype == "fp32" else 2
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * element


__all__ = ["PRECISIONS", "CHECKPOINTING", "POLICIES", "Policy", "get_policy", "layer_activation_bytes",
           "blocked_attention_keys_per_token",
           "head_activation_bytes", "loss_backward_transient_bytes", "activation_bytes_per_sequence",
           "training_memory", "min_gpus_to_train", "WEIGHT_BYTES", "weight_bytes", "kv_cache_bytes_per_token"]
