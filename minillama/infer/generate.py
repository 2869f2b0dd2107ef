"""Autoregressive generation with the KV cache: one prefill of the prompt, then one token per forward."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from minillama.errors import MinillamaError
from minillama.infer.sampling import check_sampling_args, sample_next
from minillama.model import KVCache, Transformer


@torch.no_grad()
def generate_ids(model: Transformer, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop_ids: tuple[int, ...] = ()) -> Iterator[int]:
    """Yield new token ids one at a time; stops at a stop id (not yielded), max_new_tokens or the context."""
    check_sampling_args(temperature, top_k, top_p)
    if not prompt_ids:
        raise MinillamaError("the prompt encodes to no tokens; give a prompt or encode with a BOS token")
    cfg = model.cfg
    device = next(model.parameters()).device
    total = min(cfg.max_seq_len, len(prompt_ids) + max_new_tokens)
    if len(prompt_ids) >= total:
        raise MinillamaError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {cfg.max_seq_len}")
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    cache = KVCache.empty(cfg, batch_size=1, max_len=total, device=device, dtype=dtype)
    tokens = torch.tensor([prompt_ids], device=device)
    logits = model(tokens, cache=cache, logits_index=-1)[:, -1]  # prefill: (1, V)
    position = len(prompt_ids)
    try:
        while position < total:
            next_id = sample_next(logits, temperature, top_k, top_p, generator)  # (1,)
            token = int(next_id.item())
            if token in stop_ids:
                return
            yield token
            if position + 1 >= total:
                return
            logits = model(next_id[:, None], cache=cache)[:, -1]
            position += 1
    finally:
        model.train(was_training)


def generate(model: Transformer, tokenizer, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
             top_k: int | None = 200, top_p: float | None = None, seed: int | None = None) -> str:
    """The prompt's continuation as text (BOS prepended, stops at EOS)."""
    ids = tokenizer.encode(prompt, bos=True)
    new = list(generate_ids(model, ids, max_new_tokens, temperature, top_k, top_p, seed,
                            stop_ids=(tokenizer.eos_id,)))
    return tokenizer.decode(new)


def sample_checkpoint(checkpoint: str | Path, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                      top_k: int | None = 200, seed: int | None = None) -> str:
    """The prompt and its continuation by a saved checkpoint (what `minillama train` prints at the end)."""
    from minillama.checkpoint import load

    model, tokenizer = load(checkpoint)
    if tokenizer is None:
        raise MinillamaError(f"checkpoint {checkpoint} has no tokenizer files")
    return prompt + generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k, seed=seed)
