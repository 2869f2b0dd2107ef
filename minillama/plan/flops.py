"""Training and inference FLOPs: the 6ND rule, and a count of every matmul in our model with causal attention.

6ND (Kaplan et al. 2020 §2.1; Hoffmann et al. 2022 "Chinchilla" §3): a forward pass costs 2 FLOPs per parameter
per token (one multiply, one add) and the backward pass twice that, so training on D tokens costs 6·N·D. It
ignores attention's score computation and counts embedding parameters as if they were matmuls.

The counted figure multiplies out each matmul of `minillama.model` per token:
    per layer  2·(C·H·Dh + 2·C·K·Dh + H·Dh·C + 3·C·F)     wq, wk, wv, wo, and SwiGLU's w1, w3, w2
             + 2·H·Dh·(T+1)                              q·k scores and attention·v, causal (see below)
    head       2·C·V                                     output projection (the embedding lookup is free)
and training is 3x the forward pass (backward = 2x forward; Kaplan §2.1, PaLM appendix B). The attention term is
PaLM appendix B's 12·L·H·Q·T (Chowdhery et al. 2022) halved: with a causal mask token t scores t+1 positions,
T(T+1)/2 scores per sequence instead of T², and flash-attention kernels skip the masked blocks. Norms, RoPE, SiLU,
softmax and the residual adds are left out (O(C) per token, under 1% of the matmuls; Chinchilla appendix F counts
them and finds the same). Activation recomputation is not counted: these are model FLOPs, the numerator of MFU.
"""

from __future__ import annotations

from minillama.config import ModelConfig


def layer_matmul_params(cfg: ModelConfig) -> dict[str, int]:
    """Weights of each matmul in one transformer block, by name (as in model.py)."""
    C, F = cfg.dim, cfg.ffn_hidden_dim
    q_width, kv_width = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return dict(wq=C * q_width, wk=C * kv_width, wv=C * kv_width, wo=q_width * C, w1=C * F, w3=C * F, w2=F * C)


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: every block's projections plus the output head."""
    return cfg.n_layers * sum(layer_matmul_params(cfg).values()) + cfg.dim * cfg.vocab_size


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the causal score and value products over all layers: 2·L·H·Dh·(T+1).

    Token t (0-based) computes q·k with t+1 keys and sums t+1 values, 2·Dh FLOPs each per head, 4·H·Dh·(t+1);
    averaged over t = 0..T-1 that is 2·H·Dh·(T+1)."""
    return 2.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * (seq_len + 1)


def flops_breakdown(cfg: ModelConfig, seq_len: int, training: bool = True) -> dict[str, float]:
    """FLOPs per token by part (attention projections, attention scores, feed-forward, output head), summed over
    layers. training=True multiplies the forward count by 3 (forward + backward)."""
    passes = 3 if training else 1
    per_layer = layer_matmul_params(cfg)
    L = cfg.n_layers
    return dict(
        attention_projections=passes * 2.0 * L * (per_layer["wq"] + per_layer["wk"] + per_layer["wv"]
                                                  + per_layer["wo"]),
        attention_scores=passes * attention_flops_per_token(cfg, seq_len),
        feed_forward=passes * 2.0 * L * (per_layer["w1"] + per_layer["w3"] + per_layer["w2"]),
        output_head=passes * 2.0 * cfg.dim * cfg.vocab_size,
    )


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token of training (forward + backward, training=True) or of a forward pass, for sequences
    of `seq_len` tokens: 6·M + 6·L·H·Dh·(T+1) when training, 2·M + 2·L·H·Dh·(T+1) otherwise, where M is
    `matmul_params(cfg)` (the parameters less the embedding lookup and norm weights).

    MFU = tokens/s x flops_per_token(cfg, seq_len) / peak FLOP/s (PaLM appendix B, with causal attention)."""
    return sum(flops_breakdown(cfg, seq_len, training).values())


def flops_6nd(params: float, tokens: float) -> float:
    """The 6ND rule: training FLOPs for N parameters on D tokens (Kaplan et al. 2020 §2.1)."""
    return 6.0 * params * tokens


__all__ = ["layer_matmul_params", "matmul_params", "attention_flops_per_token", "flops_breakdown",
           "flops_per_token", "flops_6nd"]
