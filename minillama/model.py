"""The LLaMA architecture, one file, top to bottom.

    tokens -> embedding -> n_layers x Block -> RMSNorm -> output projection -> logits
    Block:  x = x + Attention(RMSNorm(x))        grouped-query attention with rotary position embeddings
            x = x + FeedForward(RMSNorm(x))      SwiGLU

The math follows Meta's reference model.py (LLaMA 1/2/3) and the papers: pre-norm with RMSNorm (Zhang & Sennrich
2019), SwiGLU (Shazeer 2020), RoPE (Su et al. 2021) with Llama 3.1's frequency scaling, grouped-query attention
(Ainslie et al. 2023). Rotary embeddings use the "rotate half" layout of Hugging Face checkpoints, so our weights
are theirs without permutation. Shapes in comments: B batch, T new tokens, S positions attended to (cache + new),
H query heads, K key/value heads, D head dim, C model dim, V vocabulary.

Nothing here knows about parallelism, compilation or quantization: those wrap the model from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minillama.config import ModelConfig, RopeScaling


class RMSNorm(nn.Module):
    """x / rms(x) * weight. No mean subtraction and no bias: cheaper than LayerNorm and as good (LLaMA §2.2)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even under bf16 autocast: the mean of squares loses precision in 8 mantissa bits.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return normed * self.weight


# --------------------------------------------------------------------------------------------------------------
# Rotary position embeddings
# --------------------------------------------------------------------------------------------------------------
def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """The D/2 rotation frequencies theta^(-2i/D), with Llama 3.1's scaling of the low frequencies if given."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))  # (D/2,)
    if scaling is None:
        return inv_freq.float()
    # Llama 3.1 (Meta's apply_scaling): leave short wavelengths alone, divide long ones by `factor`, and blend
    # linearly (in 1/wavelength) between original_max/high_freq_factor and original_max/low_freq_factor.
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    in_between = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_between, blended, scaled).float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency for the given positions, each (T, D), computed in fp32."""
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D): "rotate half" pairs dim i with dim i + D/2
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+D/2}) pair of x (B, heads, T, D) by its position's angle."""
    first, second = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-second, first], dim=-1)
    return (x * cos + rotated_half * sin).to(x.dtype)


# --------------------------------------------------------------------------------------------------------------
# Attention with grouped-query heads and an optional KV cache
# --------------------------------------------------------------------------------------------------------------
@dataclass
class KVCache:
    """Keys and values of past positions for every layer, filled in place during decoding.

    k, v: (n_layers, B, K, max_len, D). The model reads and writes slices; it is an argument to forward, not
    state inside the model, so one model serves any number of caches (batching, speculative decoding).
    """

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, cfg: ModelConfig, batch_size: int, max_len: int, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> KVCache:
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None, start_pos: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache is None:
            # Training and full-sequence scoring: plain causal attention, flash kernels where available.
            mask, causal = None, True
        else:
            cache_k, cache_v = cache  # (B, K, max_len, D) views into the KVCache
            cache_k[:B, :, start_pos:start_pos + T] = k.to(cache_k.dtype)
            cache_v[:B, :, start_pos:start_pos + T] = v.to(cache_v.dtype)
            k = cache_k[:B, :, :start_pos + T].to(q.dtype)  # (B, K, S, D), S = start_pos + T
            v = cache_v[:B, :, :start_pos + T].to(q.dtype)
            if T == 1:
                mask, causal = None, False  # one new token sees every cached position
            elif start_pos == 0:
                mask, causal = None, True  # prefill of an empty cache is ordinary causal attention
            else:
                # T new tokens after start_pos cached ones: token t sees positions <= start_pos + t.
                mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
                causal = False

        # Grouped-query attention: each of the K key/value heads serves H/K query heads.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             enable_gqa=self.n_kv_heads != self.n_heads)  # (B, H, T, D)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # (B, T, C)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). The gate w1 and the value w3 both project C -> hidden."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (B, T, hidden) -> (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None, start_pos: int = 0) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, start_pos)  # (B, T, C)
        return x + self.feed_forward(self.ffn_norm(x))  # (B, T, C)


class Transformer(nn.Module):
    """A LLaMA-family decoder. forward(tokens (B, T)) -> logits (B, T, V).

    Built under `torch.device("meta")` it allocates nothing (count a 405B model on a laptop); `to_empty(device=...)`
    then `init_weights()` materialises it. Built anywhere else it is initialised at once.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Rotary frequencies are derived from the config, not learned: a buffer kept out of checkpoints.
        self.register_buffer("rope_inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)
        if self.tok_embeddings.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, 0.02) weights; the projections that write into the residual stream (wo, w2) scaled by
        1/sqrt(2 * n_layers) so the stream's variance does not grow with depth (GPT-2 §2.3)."""
        if self.cfg.tie_embeddings:  # `to_empty` gives every module its own new tensor: tie them again
            self.output.weight = self.tok_embeddings.weight
        self.reset_buffers()
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual_out = name.endswith(("attention.wo", "feed_forward.w2"))
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual_out else std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def reset_buffers(self) -> None:
        """Recompute the buffers derived from the config (RoPE frequencies) on the weights' device. Checkpoints
        never store them, so loading a model built on the meta device calls this after assigning the weights."""
        inv_freq = rope_inverse_frequencies(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
        self.rope_inv_freq = inv_freq.to(self.tok_embeddings.weight.device)

    def forward(self, tokens: torch.Tensor, kv_cache: KVCache | None = None, start_pos: int = 0) -> torch.Tensor:
        B, T = tokens.shape
        if start_pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} positions exceeds max_seq_len={self.cfg.max_seq_len}")
        positions = torch.arange(start_pos, start_pos + T, device=tokens.device)
        cos, sin = rope_cos_sin(self.rope_inv_freq, positions)  # (T, D) each
        h = self.tok_embeddings(tokens)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            cache = None if kv_cache is None else (kv_cache.k[i], kv_cache.v[i])
            h = layer(h, cos, sin, cache, start_pos)  # (B, T, C)
        return self.output(self.norm(h))  # (B, T, V)

    def num_params(self, embeddings: bool = True) -> int:
        """Parameters, counted once each (a tied embedding is one matrix). embeddings=False leaves out the
        input embedding and, if untied, the output projection: the N of scaling-law papers."""
        total = sum(p.numel() for p in self.parameters())
        if not embeddings:
            total -= self.tok_embeddings.weight.numel()
            if not self.cfg.tie_embeddings:
                total -= self.output.weight.numel()
        return total


def count_parameters(cfg: ModelConfig, embeddings: bool = True) -> int:
    """Exact parameter count of the model `cfg` describes, from the model itself built on the meta device."""
    with torch.device("meta"):
        return Transformer(cfg).num_params(embeddings=embeddings)
