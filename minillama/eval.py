"""Loss, perplexity and bits per byte of a checkpoint on a text file or a prepared data directory.

Bits per byte = total nats / (ln 2 x UTF-8 bytes of the text scored): unlike loss per token it does not depend
on the tokenizer, so models with different vocabularies (or a character-level one) compare honestly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from minillama.errors import MinillamaError
from minillama.model import IGNORE_INDEX
from minillama.runtime import autocast_context


@dataclass
class EvalResult:
    loss: float  # nats per token
    perplexity: float
    bits_per_byte: float
    nats_per_byte: float
    tokens: int
    bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches, device: torch.device, dtype: str) -> tuple[float, int]:
    """Total nats and scored-token count over (inputs, targets) batches, through the model's own loss; targets
    equal to IGNORE_INDEX (padding at the end of a split) are not scored.

    Compiled parts of the model run eagerly here: a forward-only graph would be compiled anew (~15 s for 15m on
    2 cores) to save a few percent of an evaluation that takes seconds."""
    was_training = model.training
    model.eval()
    total_nats, total_tokens = 0.0, 0
    with torch.compiler.set_stance("force_eager"):
        for inputs, targets in batches:
            inputs, targets = inputs.to(device), targets.to(device)
            scored = int((targets != IGNORE_INDEX).sum())
            # Run even a batch with nothing to score: under FSDP every rank must take part in every forward.
            with autocast_context(device, dtype):
                mean_nats = model(inputs, targets)  # fp32, averaged over the scored positions
            if scored == 0:
                continue
            total_nats += mean_nats.item() * scored
            total_tokens += scored
    model.train(was_training)
    return total_nats, total_tokens


def text_windows(ids: list[int], seq_len: int, batch_size: int):
    """Non-overlapping (inputs, targets) windows of seq_len over one token stream; the last one is shorter."""
    windows = []
    for start in range(0, max(1, len(ids) - 1), seq_len):
        chunk = ids[start:start + seq_len + 1]
        if len(chunk) >= 2:
            windows.append(torch.tensor(chunk))
    # Same-length windows batch together; the ragged tail goes alone.
    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        lengths = {len(w) for w in group}
        batches = [group] if len(lengths) == 1 else [[w] for w in group]
        for b in batches:
            stacked = torch.stack(b)
            yield stacked[:, :-1], stacked[:, 1:]


def window_length(model, seq_len: int | None, batch_size: int) -> int:
    """The evaluation window: `seq_len`, or the model's context when None. A window longer than the context (or
    empty), or a batch of fewer than one window, is a MinillamaError naming the value."""
    context = model.cfg.max_seq_len
    seq_len = context if seq_len is None else seq_len
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 1 <= seq_len <= context:
        raise MinillamaError(f"seq_len {seq_len!r} must be in 1..{context} (the model's context)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MinillamaError(f"batch_size must be a positive integer, got {batch_size!r}")
    return seq_len


def evaluate_text(model, tokenizer, text: str, seq_len: int | None = None, batch_size: int = 8,
                  dtype: str = "bf16") -> EvalResult:
    seq_len = window_length(model, seq_len, batch_size)
    ids = tokenizer.encode(text, bos=True, eos=True)
    device = next(model.parameters()).device
    nats, tokens = evaluate_loss(model, text_windows(ids, seq_len, batch_size), device, dtype)
    return _result(nats, tokens, len(text.encode("utf-8")))


def evaluate_prepared(model, data_dir: Path, seq_len: int | None = None, batch_size: int = 8,
                      dtype: str = "bf16", max_tokens: int | None = None) -> EvalResult:
    from minillama.data import MixtureLoader

    seq_len = window_length(model, seq_len, batch_size)
    loader = MixtureLoader(data_dir, seq_len=seq_len, batch_size=batch_size, seed=0, split="val")
    device = next(model.parameters()).device
    max_batches = None if max_tokens is None else max(1, max_tokens // (batch_size * seq_len))
    nats, tokens = evaluate_loss(model, loader.val_batches(max_batches=max_batches), device, dtype)
    return _result(nats, tokens, round(tokens * loader.bytes_per_token["val"]))


def _result(nats: float, tokens: int, n_bytes: int) -> EvalResult:
    if tokens == 0:
        raise MinillamaError("nothing to evaluate: the data holds fewer than two tokens")
    loss = nats / tokens
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), bits_per_byte=nats / (math.log(2) * n_bytes),
                      nats_per_byte=nats / n_bytes, tokens=tokens, bytes=n_bytes)


def evaluate_path(checkpoint: str | Path, data: str | Path, seq_len: int | None = None, batch_size: int = 8,
                  dtype: str = "bf16", quantize: str | None = None, group_size: int | None = None) -> EvalResult:
    """A text file is read whole and scored; a directory with manifest.json is scored on its validation split.
    `quantize` ("int8", "int4" with `group_size`) quantizes the weights at load time (`checkpoint.load`)."""
    from minillama.checkpoint import load

    model, tokenizer = load(checkpoint, quantize=quantize, group_size=group_size)
    data = Path(data)
    if data.is_dir() and (data / "manifest.json").exists():
        return evaluate_prepared(model, data, seq_len, batch_size, dtype)
    if not data.is_file():
        raise MinillamaError(f"--data {data}: not a text file or a prepared data directory (with manifest.json)")
    if tokenizer is None:
        raise MinillamaError(f"checkpoint {checkpoint} has no tokenizer files to encode {data} with")
    try:
        text = data.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MinillamaError(f"{data}: not UTF-8 text (byte {exc.start})") from None
    return evaluate_text(model, tokenizer, text, seq_len, batch_size, dtype)
