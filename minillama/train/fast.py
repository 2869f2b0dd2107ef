"""The training fast path: the model's own math from tokens to loss as one function, built for speed.

`model.py` is the reference and serves inference; training calls `TrainingLoss(model)(tokens, targets)` instead,
which reads the same parameters (names, shapes, checkpoints all unchanged) and computes the same loss, but:

- on CPU, causal attention is plain matmuls over query blocks that each see only the keys up to their own end
  (a staircase covering about (n + 1) / 2n of the T x T square), with a softmax that keeps its probabilities in
  bf16 for backward. PyTorch's CPU flash kernel, which the model's `scaled_dot_product_attention` picks, runs
  forward + backward 2-4x slower at these sizes. Long sequences (where the T x T probabilities would cost too much
  memory) and GPUs keep `scaled_dot_product_attention`;
- the loss is part of the forward, so under `torch.compile` the projection to the vocabulary, the fp32 upcast
  and the cross-entropy compile together;
- the rotary cos/sin tables are computed once per call and passed in: inside a compiled graph the compiler
  recomputes them for every element of q and k in every layer;
- `retain_freed_memory` stops glibc from handing large freed blocks back to the kernel: otherwise every step
  page-faults its activations and gradients into fresh zeroed pages (~100k faults per 15m step).

What they add up to, against model.py compiled and against Hugging Face, is in benchmarks/RESULTS.md ("Training
throughput"). tests/test_train_step.py checks that loss and gradients equal model.py's in fp32, so an edit to
model.py that this file does not mirror fails there; `train.fast_path = false` trains through model.py itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minillama.model import Block, Transformer, rope_cos_sin

# Blocked attention on CPU up to this many positions; beyond it the saved (B, H, T, T) probabilities grow too
# large and the flash kernel's O(T) memory wins.
MAX_BLOCKED_ATTENTION_LEN = 1024
QUERY_BLOCK = 64  # query rows per block: at T = 256, 64 beat 32 and 128 in the fast path's development runs


class _CausalSoftmax(torch.autograd.Function):
    """softmax(scores * scale) over the allowed keys, computed in fp32, kept for backward in the scores' dtype.

    Autograd's own softmax would keep its fp32 output: with bf16 scores this keeps half the bytes (the largest
    activation of blocked attention) and the backward, p * (g - sum(g * p)), reads half as much. In fp32 it is
    autograd's softmax exactly."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
        probs = scores.float().mul(scale).masked_fill(~allowed, float("-inf")).softmax(dim=-1).to(scores.dtype)
        ctx.save_for_backward(probs)
        ctx.scale = scale
        return probs

    @staticmethod
    def backward(ctx, grad_probs: torch.Tensor):
        (probs,) = ctx.saved_tensors
        p, g = probs.float(), grad_probs.float()
        grad_scores = p * (g - (g * p).sum(dim=-1, keepdim=True)) * ctx.scale
        return grad_scores.to(grad_probs.dtype), None, None


def causal_attention_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_block: int = QUERY_BLOCK
                             ) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + causal mask) v as batched matmuls; grouped-query heads without repeating k, v.

    q (B, H, T, D), k and v (B, K, T, D) -> (B, H, T, D). Query rows go in blocks; the block [start, end) needs
    keys [0, end) only, so each row's softmax is complete within its block and the masked-out upper right of
    the square is mostly never computed.
    """
    B, H, T, D = q.shape
    K = k.shape[1]
    G = H // K  # query heads per key/value head: head h reads key/value head h // G, as in repeat_kv
    q = q.reshape(B, K, G, T, D)
    outputs = []
    for start in range(0, T, query_block):
        end = min(T, start + query_block)
        n = end - start
        q_block = q[:, :, :, start:end].reshape(B, K, G * n, D)
        scores = (q_block @ k[:, :, :end].transpose(-1, -2)).view(B, K, G, n, end)  # (B, K, G, n, end)
        allowed = torch.ones(n, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
        probs = _CausalSoftmax.apply(scores, allowed, D ** -0.5).view(B, K, G * n, end)
        outputs.append((probs @ v[:, :, :end]).view(B, K, G, n, D))  # (B, K, G, n, D)
    return torch.cat(outputs, dim=3).view(B, H, T, D)


def _dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(x, p) if p else x  # p = 0 leaves the graph exactly the model's


def apply_rope_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """model.apply_rope as its two rotated halves: the same products and sums, without the concatenated copy of
    (-x2, x1) that a compiler materialises. x (B, heads, T, D); cos and sin (T, D), both halves equal."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[:, :half], sin[:, :half]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class TrainingLoss(nn.Module):
    """forward(tokens (B, T), targets (B, T)) -> mean next-token cross-entropy in fp32, the model's own math.

    forward(tokens) without targets returns the model's logits (uncompiled), so evaluation runs through the same
    module.
    `model` stays a submodule: DDP and the optimizer see exactly its parameters.

    compile: one compiled graph that every block shares (the parameters are its inputs) plus one for the head
    (final norm, output projection, loss). In the fast path's development runs this compiled in 15 s on 2 cores
    for 15m, against 70 s for one graph of the whole forward, and ran as fast."""

    computes_loss = True  # TrainStep calls a module with this flag as loss = module(inputs, targets)

    def __init__(self, model: Transformer, compile: bool = False, blocked_attention: bool | None = None,
                 activation_checkpointing: bool = False, dropout: float = 0.0):
        super().__init__()
        self.model = model
        self.dropout = dropout  # on the embeddings and each residual branch, in training mode only
        self.blocked_attention = blocked_attention  # None: CPU and T <= MAX_BLOCKED_ATTENTION_LEN
        self.activation_checkpointing = activation_checkpointing
        self._block = torch.compile(self._block_eager) if compile else self._block_eager
        self._head = torch.compile(self._head_eager) if compile else self._head_eager

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        model = self.model
        T = tokens.shape[1]
        if T > model.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} positions exceeds max_seq_len={model.cfg.max_seq_len}")
        blocked = self.blocked_attention
        if blocked is None:
            blocked = tokens.device.type == "cpu" and T <= MAX_BLOCKED_ATTENTION_LEN
        cos, sin = rope_cos_sin(model.rope_inv_freq, torch.arange(T, device=tokens.device))  # (T, D) each
        if targets is None:
            return self._logits_eager(tokens, cos, sin, blocked)
        return self._loss(tokens, targets, cos, sin, blocked)

    def _logits_eager(self, tokens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, blocked: bool
                      ) -> torch.Tensor:
        """The model's logits (B, T, V) for evaluation, never compiled: a forward-only graph would be compiled
        again (15 s for 15m on 2 cores) to save a few percent of an evaluation that takes seconds."""
        h = self._hidden_states(tokens, cos, sin, blocked, self._block_eager, dropout=0.0, checkpointing=False)
        return self.model.output(self.model.norm(h))  # (B, T, V)

    def _loss(self, tokens: torch.Tensor, targets: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              blocked: bool) -> torch.Tensor:
        h = self._hidden_states(tokens, cos, sin, blocked, self._block, dropout=self.dropout if self.training else 0.0,
                                checkpointing=self.activation_checkpointing)
        return self._head(h, targets)

    def _hidden_states(self, tokens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, blocked: bool, block,
                       dropout: float, checkpointing: bool) -> torch.Tensor:
        """Embeddings, then every block (`block` is _block_eager or its compiled form) -> (B, T, C)."""
        h = _dropout(self.model.tok_embeddings(tokens), dropout)  # (B, T, C)
        for layer in self.model.layers:
            if checkpointing:
                h = checkpoint(block, layer, h, cos, sin, blocked, dropout, use_reentrant=False)
            else:
                h = block(layer, h, cos, sin, blocked, dropout)  # (B, T, C)
        return h

    def _head_eager(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model.output(self.model.norm(h))  # (B, T, V), bf16 under autocast
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())  # trainer.cross_entropy_loss

    def _block_eager(self, layer: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, blocked: bool,
                     dropout: float = 0.0) -> torch.Tensor:
        """Block.forward without a cache: x + Attention(RMSNorm(x)), then + FeedForward(RMSNorm(x)); with
        `dropout`, each branch's output is dropped out before it is added."""
        attn, ffn = layer.attention, layer.feed_forward
        B, T, _ = x.shape
        H, K, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
        h = layer.attention_norm(x)
        q = attn.wq(h).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = attn.wk(h).view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        v = attn.wv(h).view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rope_halves(q, cos, sin), apply_rope_halves(k, cos, sin)
        if blocked:
            out = causal_attention_blocked(q, k, v)  # (B, H, T, D)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=K != H)  # (B, H, T, D)
        x = x + _dropout(attn.wo(out.transpose(1, 2).reshape(B, T, H * D)), dropout)  # (B, T, C)
        return x + _dropout(ffn(layer.ffn_norm(x)), dropout)  # (B, T, C)


def retain_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse: no mmap for large blocks, no trimming of the heap.

    PyTorch's CPU allocator keeps no cache, and glibc serves large blocks by mmap and unmaps them on free, so each
    step's activations and gradients land in fresh pages that fault in and are zeroed 4 kB at a time. With this,
    what one step frees the next one reuses. Process-wide and for the rest of the process; returns False where
    the C library is not glibc (nothing changes there)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
