"""Conveniences over the engine: continue one prompt, sample from a saved checkpoint, and the pieces of
`minillama generate` (load for inference, read prompts, size an engine, stream prompts in order, JSON records)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minillama.errors import MinillamaError
from minillama.infer.engine import Completion, Engine
from minillama.infer.sampling import SamplingParams
from minillama.runtime import native_bf16


def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
             top_k: int | None = 200, top_p: float = 1.0, seed: int | None = None) -> str:
    """The prompt's continuation as text (BOS prepended, stops at EOS), by an engine of one row. The model's
    training mode is restored afterwards."""
    was_training = model.training
    try:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                seed=seed)
        ids = tokenizer.encode(prompt, bos=tokenizer.bos_id is not None)
        engine = Engine(model, tokenizer, max_batch=1, max_len=min(model.cfg.max_seq_len, len(ids) + max_new_tokens))
        return engine.generate([ids], params)[0].text
    finally:
        model.train(was_training)


def sample_checkpoint(checkpoint: str | Path, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                      top_k: int | None = 200, seed: int | None = None) -> str:
    """The prompt and its continuation by a saved checkpoint (what `minillama train` prints at the end)."""
    from minillama.checkpoint import load

    model, tokenizer = load(checkpoint)
    if tokenizer is None:
        raise MinillamaError(f"checkpoint {checkpoint} has no tokenizer files")
    return prompt + generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k, seed=seed)


# --------------------------------------------------------------------------------------------------------------
# What `minillama generate` runs
# --------------------------------------------------------------------------------------------------------------
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def inference_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA, and on CPUs with native bf16 matmuls (oneDNN's check: AVX512-BF16 or AMX), where
    they beat fp32 (the weights are half the bytes, and batched bf16 matmuls run several times faster than fp32
    ones at a few rows, benchmarks/decode.py); fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if name not in DTYPES:
        raise MinillamaError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def load_for_inference(checkpoint: str | Path, device: str = "auto", dtype: str = "auto",
                       quantize: str | None = None, group_size: int | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a checkpoint on `device` in `dtype` (weight-only int8/int4 with `quantize`, or as a
    quantized checkpoint says), ready for an Engine; a tokenizer is required."""
    from minillama.checkpoint import load
    from minillama.runtime import resolve_device

    resolved = resolve_device(device)
    model, tokenizer = load(checkpoint, device=resolved, dtype=inference_dtype(dtype, resolved), quantize=quantize,
                            group_size=group_size)
    if tokenizer is None:
        raise MinillamaError(f"checkpoint {checkpoint} has no tokenizer files")
    return model.eval(), tokenizer


@dataclass
class InferenceSetup:
    """A checkpoint loaded for inference and the engine class (with its options) that decodes it: what
    `minillama generate` and `minillama serve` build from --checkpoint, --quantize, --draft/--prompt-lookup,
    --dtype and --device, in one place."""

    model: Any
    tokenizer: Any
    engine_class: type[Engine]
    engine_options: dict[str, Any]

    def engine(self, **options: Any) -> Engine:
        """An engine over the model (options: Engine's, e.g. max_batch, max_len, compile)."""
        return self.engine_class(self.model, self.tokenizer, **options, **self.engine_options)


def load_inference_setup(checkpoint: str | Path, *, device: str = "auto", dtype: str = "auto",
                         quantize: str | None = None, group_size: int | None = None, draft: str | Path | None = None,
                         prompt_lookup: int | None = None, draft_tokens: int | None = None) -> InferenceSetup:
    """Load a checkpoint (quantized with `quantize`) and choose its engine: the plain Engine, or SpeculativeEngine
    when a drafter is given (`draft` checkpoint or `prompt_lookup`; the flags are checked before anything loads)."""
    model, tokenizer = load_for_inference(checkpoint, device=device, dtype=dtype, quantize=quantize,
                                          group_size=group_size)
    # Options that transform the model (quantize) apply above; those that change decoding (a drafter) choose
    # the engine class and its options.
    if draft is None and prompt_lookup is None and draft_tokens is None:
        return InferenceSetup(model, tokenizer, Engine, {})
    from minillama.infer.speculative import SpeculativeEngine, speculative_options

    options = speculative_options(draft, prompt_lookup, draft_tokens, model, tokenizer, device=device, dtype=dtype)
    return InferenceSetup(model, tokenizer, SpeculativeEngine, options)


def set_threads(threads: int | None) -> None:
    """torch's intra-op CPU threads for this process (None: leave torch's default); 1 is fastest on a busy machine
    (engine.py, "Threads")."""
    if threads is None:
        return
    if not (isinstance(threads, int) and threads >= 1):
        raise MinillamaError(f"--threads must be an integer >= 1, got {threads!r}")
    torch.set_num_threads(threads)


def read_prompts(prompts: Sequence[str] | None, prompt_file: str | Path | None) -> list[str]:
    """The --prompt values, then the lines of --prompt-file (UTF-8, one prompt a line, blank lines skipped);
    neither: one empty prompt (the model starts from BOS)."""
    out = list(prompts or [])
    if prompt_file is not None:
        path = Path(prompt_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise MinillamaError(f"cannot read prompt file {path}: {exc}") from None
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            raise MinillamaError(f"prompt file {path} has no prompts (one a line)")
        out += lines
    return out or [""]


def engine_for_prompts(model: Any, tokenizer: Any, prompts: Sequence[str], params: SamplingParams,
                       max_batch: int = 16, engine_class: type[Engine] = Engine, **engine_options: Any
                       ) -> tuple[Engine, list[list[int]]]:
    """An engine sized for these prompts (rows: up to max_batch; positions: the longest prompt + max_new_tokens,
    within the model's context) and the prompts' ids (BOS first). A prompt that leaves no room for a new token
    raises MinillamaError. `engine_class` and `engine_options` let a subclass (speculative decoding) take over."""
    ids = [tokenizer.encode(p, bos=tokenizer.bos_id is not None) for p in prompts]
    context = model.cfg.max_seq_len
    for p, prompt_ids in zip(prompts, ids):
        if len(prompt_ids) >= context:
            raise MinillamaError(f"prompt {p[:40]!r}... has {len(prompt_ids)} tokens; the model's context is "
                                 f"{context}, so at most {context - 1}")
    max_len = min(context, max(len(i) for i in ids) + params.max_new_tokens)
    engine = engine_class(model, tokenizer, max_batch=min(max_batch, len(prompts)), max_len=max_len,
                          **engine_options)
    return engine, ids


def stream_in_order(engine: Engine, prompts: Sequence[Sequence[int] | str], params: SamplingParams
                    ) -> Iterator[tuple[int, str, Completion | None]]:
    """Run prompts as one batch; yield (prompt index, text, completion or None) so that the prompts come out one
    after another: prompt 0's text as it arrives, then prompt 1's (what it buffered meanwhile, then live), ...
    A prompt's last event carries its Completion."""
    buffers: list[list[str]] = [[] for _ in prompts]
    done: list[Completion | None] = [None] * len(prompts)
    current = 0
    for i, out in engine.stream(prompts, params):
        buffers[i].append(out.text)
        done[i] = out.completion or done[i]
        while current < len(prompts):
            text, buffers[current] = "".join(buffers[current]), []
            if text:
                yield current, text, None
            if done[current] is None:
                break
            yield current, "", done[current]
            current += 1


def completion_record(prompt: str, completion: Completion) -> dict[str, Any]:
    """A completion as `minillama generate --json` prints it."""
    record = dict(prompt=prompt, text=completion.text, token_ids=completion.token_ids,
                  prompt_tokens=len(completion.prompt_ids), completion_tokens=len(completion.token_ids),
                  finish_reason=completion.finish_reason, stop_reason=completion.stop_reason, seed=completion.seed,
                  time_to_first_token_s=completion.time_to_first_token_s,
                  decode_tokens_per_s=completion.decode_tokens_per_s, total_s=completion.total_s)
    speculation = getattr(completion, "speculation", None)  # SpeculativeEngine's completions
    if speculation is not None:
        record.update(speculation.to_dict())
    if completion.logprobs is not None:
        record["logprobs"] = [dict(token_id=lp.token_id, logprob=lp.logprob, top=[list(t) for t in lp.top])
                              for lp in completion.logprobs]
    return record
