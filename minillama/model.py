"""The LLaMA architecture, one file, top to bottom.

    tokens -> embedding -> n_layers x Block -> RMSNorm -> output projection -> logits, or the loss
    Block:  x = x + Attention(RMSNorm(x))        grouped-query attention with rotary position embeddings
            x = x + FeedForward(RMSNorm(x))      SwiGLU

The math follows Meta's reference model.py (LLaMA 1/2/3) and the papers: pre-norm with RMSNorm (Zhang & Sennrich
2019), SwiGLU (Shazeer 2020), RoPE (Su et al. 2021) with Llama 3.1's frequency scaling, grouped-query attention
(Ainslie et al. 2023). Rotary embeddings use the "rotate half" layout of Hugging Face checkpoints, so our weights
are theirs without permutation. Shapes in comments: B batch, T new tokens, S positions attended to, H query
heads, K key/value heads, D head dim, C model dim, V vocabulary.

This is the only copy of the math: training, evaluation and decoding all run `Transformer.forward`. Speed comes
from choices made inside (the attention kernel, see kernels.py; the loss computed in the forward) and from
wrappers applied outside (compile, activation checkpointing, DDP/FSDP in train/parallelize.py; quantized
Linears in infer/). Nothing here knows about parallelism, compilation or quantization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minillama.config import ModelConfig, RopeScaling
from minillama.kernels import (
    ATTENTION_KERNELS,
    cached_attention_matmul,
    causal_attention_blocked,
    use_blocked_attention,
    use_matmul_cached_attention,
)

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: targets equal to it (padding) carry no loss


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
    """cos and sin of position * frequency, each (B, T, 1, D/2) for positions (B, T), in fp32. Computed once per
    forward and shared by every layer (inside a compiled block the compiler would recompute them per element)."""
    angles = positions.float()[:, :, None, None] * inv_freq  # (B, T, 1, D/2): the 1 broadcasts over heads
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+D/2}) pair of x (B, T, heads, D) by its position's angle ("rotate half" layout).

    Written as the two rotated halves rather than x * cos + rotate_half(x) * sin: the same products and sums,
    without the concatenated copy of (-x2, x1) that a compiler would materialise. Applied before the heads are
    transposed (as in Meta's model.py), so q keeps the (B, T, H, D) memory order that attention's output inherits
    and the output projection reads without a copy."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, T, heads, D/2) each
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


# --------------------------------------------------------------------------------------------------------------
# The KV cache: an argument to forward, never state inside the model
# --------------------------------------------------------------------------------------------------------------
@dataclass
class KVCache:
    """Keys and values of past positions for every layer, in fixed-size buffers, with each row's own length.

    k, v: one (B, K, max_len, D) buffer per layer; lengths: (B,) int64, the positions each row holds. A forward with
    the cache writes its new keys at the rows' `positions` and attends over the buffer through a mask (a key is seen
    iff its position <= the query's), so rows of one batch sit at different positions, a row is reset by setting its
    length to 0 (what it held is masked out, then overwritten) and rolled back by lowering it (speculative
    decoding). `static` keeps the attended span at max_len so that shapes never change and no forward syncs with the
    host (CUDA graphs); otherwise a forward attends only up to the longest row. `rows(a, b)` is a view of some rows,
    to prefill or decode them alone. A buffer per layer, not one (n_layers, ...) tensor: a compiled forward then
    writes each layer's new keys in place, where a write into a slice of one shared tensor made torch.compile copy
    the whole cache for every layer (15m, 32 rows: 130 ms a step against 24 ms eager).
    """

    k: tuple[torch.Tensor, ...]  # n_layers x (B, K, max_len, D)
    v: tuple[torch.Tensor, ...]
    lengths: torch.Tensor
    static: bool = False

    @classmethod
    def empty(cls, cfg: ModelConfig, batch_size: int, max_len: int, *, dtype: torch.dtype,
              device: torch.device | str = "cpu", static: bool = False) -> KVCache:
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        return cls(tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)),
                   tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)),
                   torch.zeros(batch_size, device=device, dtype=torch.long), static)

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows [start, stop) as a cache of their own: views, so writes land in this cache."""
        return KVCache(tuple(k[start:stop] for k in self.k), tuple(v[start:stop] for v in self.v),
                       self.lengths[start:stop], self.static)

    def prefix(self, length: int) -> KVCache:
        """Every row's first `length` positions as a cache of its own (views): a static one attends over just those,
        so a compiled step's span can follow the rows' lengths (the CPU engine marks it dynamic)."""
        return KVCache(tuple(k[:, :, :length] for k in self.k), tuple(v[:, :, :length] for v in self.v),
                       self.lengths, self.static)

    def reset(self, row: int | None = None) -> None:
        """Empty one row (or all): its next forward starts at position 0."""
        if row is None:
            self.lengths.zero_()
        else:
            self.lengths[row] = 0


# --------------------------------------------------------------------------------------------------------------
# Attention with grouped-query heads, the kernel chosen here
# --------------------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, kernel: str = "auto"):
        super().__init__()
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention kernel must be one of {ATTENTION_KERNELS}, got {kernel!r}")
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.kernel = kernel  # auto | sdpa | blocked: which attention code runs (kernels.py)
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Without a cache: causal attention over the T tokens. With one (this layer's (B, K, max_len, D) k and v
        buffers, the tokens' positions (B, T) and the (B, 1, T, S) mask of visible keys): write, then attend."""
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin)  # (B, T, H, D)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)  # (B, T, K, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or K, T, D)

        gqa = self.n_kv_heads != self.n_heads  # each of the K key/value heads serves H/K query heads
        if cache is None:
            if use_blocked_attention(self.kernel, x.device, T):
                out = causal_attention_blocked(q, k, v)  # (B, H, T, D)
            else:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # (B, H, T, D)
        else:
            cache_k, cache_v = cache  # (B, K, max_len, D)
            # Write each row's T new keys and values at its own positions. Index assignment writes just those
            # slots; scatter_ copied the whole buffer on CPU (125m, 32 rows: 4.5 ms per call, 30% of a step).
            rows = torch.arange(B, device=x.device)[:, None]  # (B, 1)
            cache_k[rows, :, positions] = k.transpose(1, 2).to(cache_k.dtype)  # slots (B, T, K, D)
            cache_v[rows, :, positions] = v.transpose(1, 2).to(cache_v.dtype)
            span = mask.shape[-1]  # S: the positions any row of this batch can see
            k, v = cache_k[:, :, :span].to(q.dtype), cache_v[:, :, :span].to(q.dtype)  # (B, K, S, D)
            if use_matmul_cached_attention(self.kernel, x.device, B):
                out = cached_attention_matmul(q, k, v, mask)  # (B, H, T, D)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # (B, H, T, D)
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
    def __init__(self, cfg: ModelConfig, attention: str = "auto", dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, attention)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        attended = self.attention(self.attention_norm(x), cos, sin, cache, positions, mask)
        x = x + _dropout(attended, self.dropout, self.training)  # (B, T, C)
        return x + _dropout(self.feed_forward(self.ffn_norm(x)), self.dropout, self.training)  # (B, T, C)


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """nanoGPT's residual and embedding dropout; p = 0 (LLaMA's setting) leaves the graph untouched."""
    return F.dropout(x, p) if p and training else x


class Transformer(nn.Module):
    """A LLaMA-family decoder.

        forward(tokens (B, T))                    -> logits (B, T, V)
        forward(tokens, targets (B, T))           -> mean next-token cross-entropy, fp32 scalar
        forward(tokens, cache=KVCache)            -> logits, the cache extended by the tokens (decoding)
        forward(..., logits_index=(B, N) or -1)   -> logits of those positions only, (B, N, V) or (B, 1, V)

    `attention` picks the kernel used without a cache (kernels.py); `dropout` applies to the embeddings and each
    residual branch in training mode (nanoGPT's; LLaMA uses none). Built under `torch.device("meta")` it
    allocates nothing (count a 405B model on a laptop); `to_empty(device=...)` then `init_weights()` materialises
    it. Built anywhere else it is initialised at once.
    """

    def __init__(self, cfg: ModelConfig, attention: str = "auto", dropout: float = 0.0):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.cfg = cfg
        self.dropout = dropout
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, attention, dropout) for _ in range(cfg.n_layers))
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

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, logits_index: torch.Tensor | int | None = None
                ) -> torch.Tensor:
        B, T = tokens.shape
        mask = None
        if cache is not None:
            # Each row continues where it stands unless told otherwise; keys are visible up to the query's position.
            if positions is None:
                positions = cache.lengths[:, None] + torch.arange(T, device=tokens.device)  # (B, T)
            if cache.static:
                # No host sync, so that a CUDA graph can hold the whole step; the caller keeps positions below
                # max_len (a write past the buffer fails in the index assignment).
                span = cache.max_len
            else:
                last = int(positions.max())  # one host sync per forward: it sizes the span, checks the context
                if last >= min(self.cfg.max_seq_len, cache.max_len):
                    raise ValueError(f"position {last} is beyond the context: max_seq_len={self.cfg.max_seq_len}, "
                                     f"cache max_len={cache.max_len}")
                span = last + 1
            mask = torch.arange(span, device=tokens.device) <= positions[:, None, :, None]  # (B, 1, T, S)
        elif positions is None:
            if T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {T} positions exceeds max_seq_len={self.cfg.max_seq_len}")
            positions = torch.arange(T, device=tokens.device)[None]  # (1, T): the same for every row
        cos, sin = rope_cos_sin(self.rope_inv_freq, positions)  # (B or 1, T, 1, D/2) each

        h = _dropout(self.tok_embeddings(tokens), self.dropout, self.training)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i])
            h = layer(h, cos, sin, layer_cache, positions if cache is not None else None, mask)  # (B, T, C)
        if cache is not None:
            cache.lengths.copy_(positions[:, -1] + 1)

        if targets is not None:
            return self.head_loss(h, targets)
        if isinstance(logits_index, int):
            h = h[:, logits_index:][:, :1]  # (B, 1, C)
        elif logits_index is not None:
            h = h.gather(1, logits_index[:, :, None].expand(-1, -1, h.shape[-1]))  # (B, N, C)
        return self.output(self.norm(h))  # (B, T or N, V)

    def head_loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Final norm, output projection and the mean next-token cross-entropy in fp32 (IGNORE_INDEX targets
        skipped). A method of its own so that train/parallelize.py can compile it: compiled, the projection, the
        upcast and the log-softmax fuse, and the (B, T, V) logits never exist in fp32."""
        logits = self.output(self.norm(h))  # (B, T, V), bf16 under autocast
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)

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
