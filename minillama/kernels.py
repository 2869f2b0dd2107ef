"""Attention kernels that `model.Attention` chooses between. Each computes exactly causal softmax attention;
they differ only in speed and memory on a given device, and tests/test_train_step.py pins them equal in fp32.

- `sdpa`: `F.scaled_dot_product_attention`, PyTorch's fused kernels (flash / memory-efficient on GPU, a flash
  kernel on CPU). O(T) memory; the only choice for long sequences and GPUs.
- `blocked`: causal attention as plain batched matmuls over blocks of query rows, each block seeing only the keys
  up to its own end (a staircase covering about (n + 1) / 2n of the T x T square), with a softmax that keeps its
  probabilities in the scores' dtype (bf16 under autocast) for backward. On CPU at training lengths
  (T <= MAX_BLOCKED_ATTENTION_LEN) forward + backward runs 2-4x faster than PyTorch's CPU flash kernel, whose
  backward is slow at these sizes (benchmarks/RESULTS.md, "Training throughput").

With a KV cache (decoding), attention reads each row's keys up to a common span through a (B, 1, T, S) mask.
There `auto` picks `cached_attention_matmul` on CPU for batches of two rows or more: PyTorch's CPU flash kernel
slows down with a mask and many rows (bf16, 2 threads, one layer's call in a decode step: 8 rows of 100 cached
positions 0.53 ms against 0.20 ms as matmuls; 32 rows of 263, 125m's shapes, 10.2 ms against 1.4 ms), while for
one row sdpa is faster (74 against 175 us) and is kept, except in a compiled graph (see use_matmul_cached_attention).
"""

from __future__ import annotations

import torch

# Blocked attention on CPU up to this many positions; beyond it the saved (B, H, T, T) probabilities grow too
# large and the flash kernel's O(T) memory wins.
MAX_BLOCKED_ATTENTION_LEN = 1024
QUERY_BLOCK = 64  # query rows per block: at T = 256, 64 beat 32 and 128 when this kernel was developed

ATTENTION_KERNELS = ("auto", "sdpa", "blocked")


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
    G = H // K  # query heads per key/value head: head h reads key/value head h // G, as in Meta's repeat_kv
    q = q.reshape(B, K, G, T, D)
    # k and v arrive as transposed views of their (B, T, K, D) projections; made contiguous once, every block's
    # k[:, :, :end] is a view that the matmul takes (and saves) as it is, where a transposed one would be copied
    # (and saved) again for every block.
    k, v = k.contiguous(), v.contiguous()
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


def cached_attention_matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) masked) v as two batched matmuls; grouped-query heads without repeating k, v.

    q (B, H, T, D), k and v (B, K, S, D), mask (B, 1, T, S) of visible keys (each query sees at least one) ->
    (B, H, T, D). The scores are computed as k q^T, with the cache's keys as the left operand as they lie: k is
    a slice of the cache buffer, and q k^T made the matmul copy it transposed first (32 rows x 263 positions,
    125m's shapes: 1.9 ms a call against 0.5 ms). The softmax runs in fp32, its probabilities go back to q's dtype.
    """
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K  # query heads per key/value head, as in causal_attention_blocked
    if torch.compiler.is_compiling() and ((B == 1 and T == 1) or q.dtype == torch.float32):
        return _products_attention(q, k, v, mask)
    scores = k @ q.reshape(B, K, G * T, D).transpose(-1, -2)  # (B, K, S, G * T)
    scores = scores.view(B, K, S, G, T).permute(0, 1, 3, 4, 2)  # (B, K, G, T, S), a view
    probs = (scores.float() * D ** -0.5).masked_fill(~mask[:, :, None], float("-inf")).softmax(dim=-1)
    out = probs.to(q.dtype).reshape(B, K, G * T, S) @ v  # (B, K, G * T, D)
    return out.view(B, H, T, D)


def _products_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """cached_attention_matmul inside torch.compile, for the few query positions a row that a compiled cache
    forward has (1 when decoding, k + 1 when verifying k drafted tokens): products and sums that inductor fuses
    into loops over the cache as it lies, where each of the two batched matmuls was a library call costing more
    than its arithmetic (the engine's compiled 15m bf16 step on 1 thread: 4.2 -> 2.7 ms a token). In bf16, with
    32 rows, the matmuls stay ahead (15m, 2 threads: ~1,650 against ~1,500 tokens/s), so there this is for one
    row and one position. In fp32 it is for every batch size and position count: inductor then tries its own
    batched-matmul template for the two matmuls, whose C++ does not compile with the span a dynamic size (torch
    2.13: "'ks2' was not declared"), so each graph's compilation printed pages of compiler errors before it fell
    back to ATen's matmuls. The decoding speed is the same within this machine's noise (15m fp32, 2 AVX2 cores,
    2026-12-04: 8 rows, both forms compiled in one process, 6 alternating rounds: 1.04x by the median per-round
    ratio, rounds 0.89-1.31x; 32 rows, separate processes: 1,790-1,950 against 1,560-1,980 tokens/s). Scores and
    probabilities stay in fp32 throughout."""
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    Q = G * T  # the queries of one key/value head: its G heads x T positions, as in cached_attention_matmul
    qg = q.reshape(B, K, 1, Q, D).float()
    scores = (k[:, :, :, None, :].float() * qg).sum(-1).transpose(-1, -2)  # (B, K, Q, S)
    visible = mask[:, :, 0, None] if T == 1 else mask[:, :, None].expand(B, 1, G, T, S).reshape(B, 1, Q, S)
    probs = (scores * D ** -0.5).masked_fill(~visible, float("-inf")).softmax(dim=-1)  # (B, K, Q, S)
    out = (probs[..., None] * v[:, :, None].float()).sum(-2)  # (B, K, Q, D)
    return out.to(q.dtype).view(B, H, T, D)


def use_matmul_cached_attention(kernel: str, device: torch.device, batch_size: int) -> bool:
    """With a cache, `auto` (and `blocked`, which has no masked form) use the matmuls on CPU from 2 rows up, and for
    one row too inside torch.compile, where the scaling, mask and softmax between the two matmuls fuse into one
    kernel (the engine's compiled 15m bf16 step: 116 -> 141 tokens/s on 1 thread, 137 -> 154 on 2)."""
    if kernel == "sdpa" or device.type != "cpu":
        return False
    return batch_size >= 2 or torch.compiler.is_compiling()


def use_blocked_attention(kernel: str, device: torch.device, seq_len: int) -> bool:
    """`auto` picks the blocked kernel on CPU up to MAX_BLOCKED_ATTENTION_LEN positions, sdpa elsewhere."""
    if kernel == "auto":
        return device.type == "cpu" and seq_len <= MAX_BLOCKED_ATTENTION_LEN
    return kernel == "blocked"
