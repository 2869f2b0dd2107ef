"""The inference engine: many sequences decoded together in one preallocated KV cache, joining and leaving between
steps (continuous batching, Yu et al. 2022, "Orca"), each giving exactly what its prompt gives alone.

    engine = Engine(model, tokenizer, max_batch=8)
    seq_id = engine.add(tokenizer.encode("Once upon", bos=True), SamplingParams(temperature=0.8, seed=1))
    while engine.has_work():
        for out in engine.step():          # StepOutput: seq_id, token_ids, text (delta), finish_reason, ...
            print(out.text, end="")
    engine.generate(["a prompt", "another"], SamplingParams(max_new_tokens=50))   # -> list[Completion]

How a step works. Sequences wait in a FIFO queue until a cache row is free and the token budget admits them.
Each `step()` first spends up to `prefill_chunk` prompt tokens on the waiting sequences (a long prompt takes
several steps, one chunk each, so the running sequences are never stalled by more than one chunk; a sequence
whose prompt is done samples its first token), then runs one decode forward for every running sequence (one new
token each). The cache is the model's `KVCache` (model.py): each row is one sequence at its own position, a
prompt is prefilled alone in its row's view, and rows decode together.

Rows. The running sequences occupy rows [0, n) of the cache, so one decode forward covers exactly them through a
view (no gather, no wasted rows). When a sequence leaves (finished or cancelled), the last running row's keys and
values move into its row: one copy of that sequence's tokens, once. The alternatives cost more on CPU, measured
once on the 125m preset in bf16 with rows of 256 positions (2 shared cores, CPU time): a move 0.4 ms, once;
gathering 4 active rows out of 8 for a step 20 ms, every step; decoding 4 idle rows beside 4 active ones 36 ms
more per step (65 -> 101 ms). A sequence being prefilled holds row n and joins the running ones when its prompt
is done.

Memory. The cache is allocated once: max_batch x max_len positions x `kv_bytes_per_token` (2 x layers x KV heads
x head dim x bytes per element). `stats()` reports the bytes allocated, the bytes that hold live tokens (the sum
of the sequences' lengths) and the tokens reserved by admitted sequences (prompt + max_new_tokens each, capped by
max_len). `max_cached_tokens` caps the reserved total: a sequence is admitted only when its reservation fits, so a
server can bound the live KV memory below what is allocated. `cancel()` frees a row at once.

Speed. Measured on this project's development machine (2 shared cores of an AMD EPYC with AVX512-BF16, busy
with other work, so CPU time per token rather than wall time; `benchmarks/decode.py` measures wall time side by
side with Hugging Face on a quiet machine):
- Batch-1 decoding of the small presets is bound by reading the weights: the 15m preset's 57 matmuls take
  4.8 ms of its ~6.7 ms per token in fp32 (~13 GB/s from memory), and the engine adds nothing measurable on top
  of the model's forward. bf16 weights read half the bytes (3.3 ms for the same matmuls; 350m: 119 vs 169 ms),
  and at a few rows bf16 matmuls are several times faster than fp32 ones (1024 x 3072 at 8 rows: 0.43 vs 2.1 ms),
  so inference defaults to bf16 weights and cache on CPUs with native bf16 (`generate.inference_dtype`).
- Threads: with other processes on the cores, two threads made a 15m decode step 10x slower than one (121 vs
  12 ms): every parallel region waits for the thread the scheduler took away. The engine leaves the setting to
  the caller (`minillama generate --threads 1`; torch.set_num_threads).
- `compile=True`: the decode forward compiled with torch.compile over a static cache (`CacheForward`, which
  speculative decoding's verification and draft use too: fixed shapes, no host sync), batch sizes padded to
  buckets 1, 2, 4, ... max_batch (padding rows decode into free rows and their lengths are put back). On CUDA
  it is the default, with mode="reduce-overhead": each bucket's step replays as a CUDA graph. On CPU it compiles
  with inductor's freezing and autotuned GEMMs (`CPU_COMPILE_OPTIONS`: inductor's own AVX-512 kernels over
  blocked weights where they time faster than oneDNN's) and, for one row, attention as fused reductions
  (kernels.py). The 15m preset in bf16 went from ~15 ms a token eager to ~7 ms
  frozen for oneDNN (2026-12-02) and ~2.5 ms now (2026-12-03, 2 threads); 350m from ~50 ms frozen to ~28 ms.
  Compiling takes 1-3 minutes (autotuning times every matrix shape once; inductor caches the results on disk),
  so it is off there by default (`minillama generate --compile`; worth it for a long-running server).
- Sampling costs one argmax for greedy rows without penalties or log-probabilities; filters and draws are
  batched over rows (sampling.py).

The engine takes any model with `Transformer`'s forward (e.g. one whose Linears were swapped for quantized ones
outside model.py). Speculative decoding (speculative.py) overrides `decode_step` and builds on `accept` (see
their docstrings).
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from minillama.errors import MinillamaError
from minillama.infer.sampling import SamplingParams, SequenceSampler, TokenLogprob, sample
from minillama.infer.streaming import TextStream
from minillama.model import KVCache

# Inductor's options for a compiled CPU decode step, beside freezing (which makes the weights constants of the
# graph; see CacheForward). max_autotune with the CPP backend lets inductor generate its own matrix kernels for the
# frozen weights (blocked weights, AVX-512 micro-kernels, the int8 scale as an epilogue) and keep oneDNN's where
# those time faster. 350m's 169 projections in bf16 at one row, 2 threads, interleaved rounds: 18.3 ms a token
# generated against 34.1 ms prepacked for oneDNN (freezing alone) and 67.1 ms eager (2026-12-03). Autotuning times
# each shape once (compiling takes ~2x longer). Tried and left out (benchmarks/RESULTS.md): cpp_wrapper (15m
# 0.99x, 350m int8 0.93x); cpp.enable_concat_linear (wq/wk/wv and w1/w3 as one matmul each: 15m bf16 0.99-1.04x,
# 350m int8 0.94x); a hand-written int8 matrix-vector kernel (benchmarks/int8_gemv_probe.py: 19.0 against
# inductor's 23.5 GB/s).
CPU_COMPILE_OPTIONS = dict(max_autotune=True, max_autotune_gemm_backends="CPP,ATEN",
                           autotune_num_choices_displayed=0, max_autotune_report_choices_stats=False)  # quiet

_COMPILED_FORWARDS = itertools.count()  # numbers the compiled CacheForwards of this process (their graphs' guards)
MAX_SIGNATURES = 4  # call signatures (T, positions, logits or greedy) a CacheForward compiles per bucket at most

FINISH_STOP = "stop"  # EOS, a stop token id or a stop string
FINISH_LENGTH = "length"  # max_new_tokens, or the context is full


@dataclass
class Completion:
    """A finished sequence."""

    seq_id: int
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens; a stop token id is not included, a stop string's tokens are
    text: str  # the generated text (decoded in context of the prompt), cut before a stop string
    finish_reason: str  # "stop" or "length"
    stop_reason: str | int | None  # the stop string or stop token id that ended it (None: length)
    logprobs: list[TokenLogprob] | None  # one per token in token_ids when SamplingParams.logprobs was set
    seed: int  # the seed its generator used (the given one, or the fresh one drawn)
    time_to_first_token_s: float  # from add() to its first token
    total_s: float  # from add() to its end

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first per second of decoding (None with fewer than two tokens)."""
        decode_s = self.total_s - self.time_to_first_token_s
        return (len(self.token_ids) - 1) / decode_s if len(self.token_ids) > 1 and decode_s > 0 else None


@dataclass
class StepOutput:
    """What one step did for one sequence: its new tokens and text, and how it finished if it did."""

    seq_id: int
    token_ids: list[int]  # new tokens (usually one; none when the first sampled token was a stop token)
    text: str  # new stable text (possibly ""): held back while a character or a stop string is incomplete
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None = None  # None while the sequence runs
    completion: Completion | None = None  # set on a sequence's last output


@dataclass
class EngineStats:
    waiting: int  # added, not admitted yet
    prefilling: int  # admitted, prompt partly in the cache (0 or 1)
    running: int  # decoding
    free_rows: int
    kv_bytes_per_token: int
    kv_bytes_allocated: int  # the whole preallocated cache
    kv_tokens_in_use: int  # positions that hold a live sequence's keys and values
    kv_bytes_in_use: int
    kv_tokens_reserved: int  # what admitted sequences may grow to (prompt + max_new_tokens, capped by max_len)


@dataclass(eq=False)
class SequenceState:
    """One sequence inside the engine (read-only to callers; the engine updates it)."""

    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    sampler: SequenceSampler
    stream: TextStream | None
    max_new_tokens: int  # params.max_new_tokens capped by the context
    stop_ids: frozenset[int]
    reserved_tokens: int
    arrival_s: float
    row: int | None = None
    cached: int = 0  # positions of its row that hold its tokens
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    text: list[str] = field(default_factory=list)
    first_token_s: float | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class Engine:
    """Continuous batching over one KV cache. Not thread-safe: one caller drives `step()`.

    model          a `Transformer` (or a model with its forward), on the device to run on; put in eval mode
    tokenizer      for text prompts, text output and stop strings; None works with ids only
    max_batch      cache rows: sequences decoded together at most
    max_len        positions per row, prompt + generated (default: the model's max_seq_len)
    cache_dtype    dtype of keys and values (default: the dtype of the model's embedding weights)
    prefill_chunk  prompt tokens prefilled per step at most (default 512)
    max_cached_tokens  admission budget in tokens reserved (default: no limit beyond the cache itself)
    compile        compile the decode forward (default: on CUDA only; see the module docstring)
    static_cache   fixed-shape cache with batch buckets (default: as `compile`; CUDA graphs need it)
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, *, max_batch: int = 8,
                 max_len: int | None = None, cache_dtype: torch.dtype | None = None, prefill_chunk: int = 512,
                 max_cached_tokens: int | None = None, compile: bool | None = None,
                 static_cache: bool | None = None) -> None:
        cfg = model.cfg
        max_len = cfg.max_seq_len if max_len is None else max_len
        if not 2 <= max_len <= cfg.max_seq_len:
            raise MinillamaError(f"max_len must be in [2, {cfg.max_seq_len}] (the model's max_seq_len), "
                                 f"got {max_len}")
        if max_batch < 1 or prefill_chunk < 1:
            raise MinillamaError(f"max_batch and prefill_chunk must be >= 1, got {max_batch} and {prefill_chunk}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.device = model.tok_embeddings.weight.device
        self.max_batch, self.max_len, self.prefill_chunk = max_batch, max_len, prefill_chunk
        self.compiled = self.device.type == "cuda" if compile is None else compile
        static = self.compiled if static_cache is None else static_cache
        # Ordinary tensors (not made under inference_mode), so that cancel() and callers outside a step may
        # write to them; step() runs under inference_mode.
        self.cache = KVCache.empty(cfg, max_batch, max_len, dtype=cache_dtype or model.tok_embeddings.weight.dtype,
                                   device=self.device, static=static)
        self.kv_bytes_per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * self.cache.k[0].element_size()
        self.max_cached_tokens = max_cached_tokens if max_cached_tokens is not None else max_batch * max_len
        eos = getattr(tokenizer, "eos_id", None)
        self.eos_id = eos if eos is not None else cfg.eos_id
        self.steps = CacheForward(model, self.cache, self.compiled)  # every decode forward goes through it
        self._ids = itertools.count()
        self._waiting: deque[SequenceState] = deque()
        self._prefilling: SequenceState | None = None
        self._running: list[SequenceState] = []  # _running[i].row == i
        self._by_id: dict[int, SequenceState] = {}
        self._reserved = 0

    # ----------------------------------------------------------------------------------------------------------
    # Requests
    # ----------------------------------------------------------------------------------------------------------
    def add(self, prompt: Sequence[int] | str, params: SamplingParams | None = None) -> int:
        """Queue a prompt (token ids, or text: encoded with BOS); returns its sequence id. Bad input raises
        MinillamaError here, before anything is queued."""
        seq = self._new_sequence(prompt, params or SamplingParams())
        self._enqueue([seq])
        return seq.seq_id

    def cancel(self, seq_id: int) -> bool:
        """Drop a sequence now: its row (and its KV memory) is free for the next step. False if unknown/finished."""
        seq = self._by_id.pop(seq_id, None)
        if seq is None:
            return False
        if seq in self._waiting:
            self._waiting.remove(seq)
        elif seq is self._prefilling:
            self._prefilling = None
            self._reserved -= seq.reserved_tokens
            self.cache.reset(seq.row)
        else:
            self._release_row(seq)
        return True

    @property
    def running(self) -> list[SequenceState]:
        """The decoding sequences; the i-th holds cache row i (a copy of the list)."""
        return list(self._running)

    def has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._running)

    def stats(self) -> EngineStats:
        held = sum(s.cached for s in self._running) + (self._prefilling.cached if self._prefilling else 0)
        busy = len(self._running) + (self._prefilling is not None)
        return EngineStats(waiting=len(self._waiting), prefilling=int(self._prefilling is not None),
                           running=len(self._running), free_rows=self.max_batch - busy,
                           kv_bytes_per_token=self.kv_bytes_per_token,
                           kv_bytes_allocated=self.max_batch * self.max_len * self.kv_bytes_per_token,
                           kv_tokens_in_use=held, kv_bytes_in_use=held * self.kv_bytes_per_token,
                           kv_tokens_reserved=self._reserved)

    # ----------------------------------------------------------------------------------------------------------
    # Running
    # ----------------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One scheduling iteration: prefill work (up to prefill_chunk prompt tokens), then one decode forward for
        the sequences that were running when the step began. Returns an output per sequence that sampled."""
        outputs: list[StepOutput] = []
        decoding = list(self._running)
        self._prefill(outputs)
        if decoding:
            outputs += self.decode_step(decoding)
        for seq in sorted((s for s in decoding if s.finish_reason), key=lambda s: -s.row):
            self._release_row(seq)  # the highest rows first: fewer moves
        return outputs

    def run(self) -> Iterator[StepOutput]:
        """Step until no work is left, yielding every output."""
        while self.has_work():
            yield from self.step()

    def stream(self, prompts: Sequence[Sequence[int] | str],
               params: SamplingParams | Sequence[SamplingParams] | None = None) -> Iterator[tuple[int, StepOutput]]:
        """Run prompts together; yield (prompt index, output) as tokens arrive, until all of them finish or are
        cancelled (the caller may cancel between outputs). Other sequences already in the engine are stepped too
        (their outputs are not yielded)."""
        index = {seq_id: i for i, seq_id in enumerate(self._add_all(prompts, params))}
        while any(seq_id in self._by_id for seq_id in index):
            for out in self.step():
                if out.seq_id in index:
                    yield index[out.seq_id], out

    def generate(self, prompts: Sequence[Sequence[int] | str],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Run prompts together to the end: one Completion per prompt, in order."""
        completions: dict[int, Completion] = {}
        for i, out in self.stream(prompts, params):
            if out.completion is not None:
                completions[i] = out.completion
        return [completions[i] for i in sorted(completions)]

    # ----------------------------------------------------------------------------------------------------------
    # The seams speculative decoding builds on
    # ----------------------------------------------------------------------------------------------------------
    def decode_step(self, seqs: list[SequenceState]) -> list[StepOutput]:
        """What a step does after prefill: new tokens for the running sequences `seqs` (rows [0, len(seqs)), in
        row order), one each here; an output per sequence. Speculative decoding (speculative.py) overrides it."""
        logits = self.decode_rows(seqs)
        tokens, logprobs = sample(logits, [s.sampler for s in seqs])
        return [self.accept(s, [t], [lp]) for s, t, lp in zip(seqs, tokens, logprobs)]

    def decode_rows(self, seqs: list[SequenceState]) -> torch.Tensor:
        """Feed each running sequence its last sampled token (rows [0, len(seqs)), which must be the running
        ones in row order); returns next-token logits (len(seqs), V). A caller feeding several tokens per row
        (verification of drafts) calls `self.steps` itself and rolls `cache.lengths` and each sequence's `cached`
        back for the rejected ones."""
        tokens = torch.tensor([s.output_ids[-1] for s in seqs], device=self.device)[:, None]  # (n, 1)
        logits = self.steps(tokens)[:, -1]  # (n, V)
        for s in seqs:
            s.cached += 1
        return logits

    def warm_up(self) -> float:
        """Compile the decode step of every batch bucket now, so that no request waits for a compilation (a server
        calls this before it takes traffic); returns the seconds it took (0 when the engine is not compiled). The
        engine must be idle: the warm-up writes into the cache's rows, then empties them."""
        if not self.compiled:
            return 0.0
        if self.has_work():
            raise MinillamaError("warm_up() needs an idle engine (no sequences added yet)")
        started = time.perf_counter()
        self._build_graphs()
        return time.perf_counter() - started

    def accept(self, seq: SequenceState, token_ids: list[int], logprobs: list[TokenLogprob | None]) -> StepOutput:
        """Take sampled tokens for a sequence, in order, until one ends it (stop token, stop string, length);
        returns its output. It does not touch the cache."""
        now = time.perf_counter()
        if seq.first_token_s is None:
            seq.first_token_s = now
        new_ids, text = [], []
        for token, logprob in zip(token_ids, logprobs):
            if token in seq.stop_ids:
                seq.finish_reason, seq.stop_reason = FINISH_STOP, token
                break
            seq.output_ids.append(token)
            new_ids.append(token)
            if seq.logprobs is not None:
                seq.logprobs.append(logprob)
            if seq.stream is not None:
                piece, stopped = seq.stream.push([token])
                text.append(piece)
                if stopped:
                    seq.finish_reason, seq.stop_reason = FINISH_STOP, seq.stream.matched
                    break
            if len(seq.output_ids) >= seq.max_new_tokens:
                seq.finish_reason = FINISH_LENGTH
                break
        if seq.finish_reason is not None and seq.stream is not None and seq.stream.matched is None:
            text.append(seq.stream.finish())  # the held-back text; a stop string may still be found in it
            if seq.stream.matched is not None:
                seq.finish_reason, seq.stop_reason = FINISH_STOP, seq.stream.matched
        seq.text += text
        out = StepOutput(seq.seq_id, new_ids, "".join(text),
                         [lp for lp in logprobs[:len(new_ids)]] if seq.logprobs is not None else None,
                         seq.finish_reason)
        if seq.finish_reason is not None:
            out.completion = self._complete(seq, now)
        return out

    # ----------------------------------------------------------------------------------------------------------
    # Internals
    # ----------------------------------------------------------------------------------------------------------
    def _build_graphs(self) -> None:
        """Compile every graph a decode step uses (warm_up); speculative decoding adds its own."""
        self.steps.warm_up(widths=[1])

    def _encode(self, prompt: Sequence[int] | str) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise MinillamaError("a text prompt needs a tokenizer; give the engine one or pass token ids")
            return self.tokenizer.encode(prompt, bos=self.tokenizer.bos_id is not None)
        return [int(t) for t in prompt]

    def _new_sequence(self, prompt: Sequence[int] | str, params: SamplingParams) -> SequenceState:
        if not isinstance(params, SamplingParams):
            raise MinillamaError(f"params must be SamplingParams, got {type(params).__name__}")
        ids = self._encode(prompt)
        if not ids:
            raise MinillamaError("the prompt has no tokens; give text or ids (a text prompt is encoded with BOS)")
        if min(ids) < 0 or max(ids) >= self.cfg.vocab_size:
            bad = next(t for t in ids if not 0 <= t < self.cfg.vocab_size)
            raise MinillamaError(f"prompt token id {bad} is outside the model's vocabulary "
                                 f"(0..{self.cfg.vocab_size - 1})")
        if len(ids) >= self.max_len:
            raise MinillamaError(f"the prompt has {len(ids)} tokens but the context holds {self.max_len} "
                                 f"(max_len): at most {self.max_len - 1} prompt tokens leave room for one new one")
        if params.stop and self.tokenizer is None:
            raise MinillamaError("stop strings need a tokenizer (they are matched on the decoded text)")
        reserved = min(len(ids) + params.max_new_tokens, self.max_len)
        if reserved > self.max_cached_tokens:
            raise MinillamaError(f"the prompt ({len(ids)} tokens) and max_new_tokens ({params.max_new_tokens}) need "
                                 f"{reserved} cache positions; max_cached_tokens is {self.max_cached_tokens}")
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos or self.eos_id is None else {self.eos_id})
        return SequenceState(
            seq_id=next(self._ids), prompt_ids=ids, params=params,
            sampler=SequenceSampler(params, self.cfg.vocab_size, ids),
            stream=TextStream(self.tokenizer, ids, params.stop) if self.tokenizer is not None else None,
            max_new_tokens=min(params.max_new_tokens, self.max_len - len(ids)), stop_ids=frozenset(stop_ids),
            reserved_tokens=reserved, arrival_s=time.perf_counter(),
            logprobs=[] if params.logprobs is not None else None)

    def _enqueue(self, seqs: list[SequenceState]) -> None:
        for seq in seqs:
            self._waiting.append(seq)
            self._by_id[seq.seq_id] = seq

    def _add_all(self, prompts: Sequence[Sequence[int] | str],
                 params: SamplingParams | Sequence[SamplingParams] | None) -> list[int]:
        if isinstance(prompts, str):
            raise MinillamaError("prompts must be a list of prompts, got one string")
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise MinillamaError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        seqs = [self._new_sequence(p, q) for p, q in zip(prompts, params)]  # all checked before any is queued
        self._enqueue(seqs)
        return [s.seq_id for s in seqs]

    def _admit(self) -> SequenceState | None:
        """The next waiting sequence, given a free row, if a row is free and its reservation fits (FIFO: the
        head is never overtaken, so no sequence starves)."""
        if not self._waiting or len(self._running) >= self.max_batch:
            return None
        seq = self._waiting[0]
        if self._reserved + seq.reserved_tokens > self.max_cached_tokens:
            return None
        self._waiting.popleft()
        self._reserved += seq.reserved_tokens
        seq.row = len(self._running)  # the first row after the running ones
        self.cache.reset(seq.row)
        return seq

    def _prefill(self, outputs: list[StepOutput]) -> None:
        budget = self.prefill_chunk
        while budget > 0:
            seq = self._prefilling or self._admit()
            if seq is None:
                return
            chunk = seq.prompt_ids[seq.cached:seq.cached + budget]
            tokens = torch.tensor([chunk], device=self.device)  # (1, T)
            # Over the positions the row holds after this chunk, not the whole row (a static cache would attend
            # over max_len: 15m, 512 positions for a 100-token prompt).
            view = self.cache.rows(seq.row, seq.row + 1).prefix(seq.cached + len(chunk))
            logits = self.model(tokens, cache=view, logits_index=-1)[:, -1]
            seq.cached += len(chunk)
            budget -= len(chunk)
            if seq.cached < len(seq.prompt_ids):
                self._prefilling = seq
                return
            self._prefilling = None
            self._join(seq)
            tokens, logprobs = sample(logits, [seq.sampler])
            outputs.append(self.accept(seq, tokens, logprobs))
            if seq.finish_reason is not None:
                self._release_row(seq)

    def _join(self, seq: SequenceState) -> None:
        """A prefilled sequence becomes the last running row (moved there if rows left while it prefilled)."""
        target = len(self._running)
        if seq.row != target:
            self._move_row(seq.row, target, seq.cached)
            seq.row = target
        self._running.append(seq)

    def _release_row(self, seq: SequenceState) -> None:
        """Free a running sequence's row; the last running row moves into it, so rows [0, n) stay the running
        ones."""
        last = self._running.pop()
        if last is not seq:
            self._move_row(last.row, seq.row, last.cached)
            last.row = seq.row
            self._running[seq.row] = last
        else:
            self.cache.reset(seq.row)
        self._by_id.pop(seq.seq_id, None)
        self._reserved -= seq.reserved_tokens
        seq.row = None

    def _move_row(self, src: int, dst: int, length: int) -> None:
        move_cache_row(self.cache, src, dst, length)

    def _complete(self, seq: SequenceState, now: float) -> Completion:
        return Completion(seq_id=seq.seq_id, prompt_ids=seq.prompt_ids, token_ids=list(seq.output_ids),
                          text="".join(seq.text), finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                          logprobs=seq.logprobs, seed=seq.sampler.seed,
                          time_to_first_token_s=seq.first_token_s - seq.arrival_s, total_s=now - seq.arrival_s)


class CacheForward:
    """A model's forward over the first rows of a KV cache, as decode steps call it: tokens (n, T) for rows [0, n),
    eager or compiled. Engine's decode step, speculative verification and a draft model each own one.

        steps = CacheForward(model, cache, compiled=True)
        logits = steps(tokens)                              # each row continues at its length: (n, 1, V)
        logits = steps(tokens, positions, logits_index)     # at given positions (n, T), logits (n, N, V)
        chosen = steps(tokens, positions, greedy=k)         # then k argmax tokens, each fed back: (n, k)

    Compiled (the cache must be static), each batch bucket (1, 2, 4, ... rows, the cache's batch size last) and
    each call signature (T, positions given or not, logits of the last position or gathered, greedy k) is a graph:
    n rows are padded to the bucket with rows beyond them, which decode into those rows at their lengths (positions
    clamped into the cache) and have their lengths put back. On CUDA with mode="reduce-overhead" (each graph
    replays as a CUDA graph); on CPU with inductor's freezing and autotuned GEMMs (CPU_COMPILE_OPTIONS). After
    `warm_up` has built every graph, calls check only the guards that tell the graphs apart (see __call__).
    """

    def __init__(self, model: torch.nn.Module, cache: KVCache, compiled: bool) -> None:
        self.model, self.cache, self.compiled = model, cache, compiled
        self.device = cache.lengths.device
        if compiled and not cache.static:
            raise MinillamaError("compile=True needs the static cache (a growing span would recompile every step)")
        # Batch sizes a static cache decodes at (each a compiled graph); views made once, so a compiled step sees
        # the same tensors every time.
        rows = cache.batch_size
        self.buckets = _powers_of_two_up_to(rows) if cache.static else list(range(1, rows + 1))
        self._views = {b: cache.rows(0, b) for b in self.buckets}
        self._forward = self._model_forward
        # On CPU a compiled step attends over the span the rows use (a view of the cache's first positions, its
        # length a dynamic dimension of one graph per bucket), not the whole static max_len: 15m, 32 rows of
        # ~300 positions in 512, 2 threads: 16.6 ms a step over max_len.
        self._trim_span = compiled and self.device.type != "cuda"
        # True once warm_up() has compiled every graph the owner's steps use (see __call__).
        self.graphs_built = False
        if compiled:
            for view in self._views.values():
                for tensor in (*view.k, *view.v, view.lengths):
                    torch._dynamo.mark_static_address(tensor)  # the cache is state, not an input to copy
            # Graphs per bucket and signature, for every CacheForward of the process: allow that many more (dynamo's
            # default limit of 8 would fall back to eager). Each one's number is part of its graphs' guards.
            torch._dynamo.config.recompile_limit += MAX_SIGNATURES * len(self.buckets) + 1
            self._graph_key = next(_COMPILED_FORWARDS)
            if self.device.type == "cuda":
                self._forward = torch.compile(self._model_forward, mode="reduce-overhead", dynamic=False)
            else:
                # Freezing: the weights become constants of the graph, prepacked for oneDNN's matmuls. The model must
                # not change afterwards, and the packed copies take memory beside its weights. Inductor reads the
                # setting from its global config while compiling (torch 2.13: passed as options={"freezing": True}
                # to torch.compile it is ignored and the graph keeps aten::mm), so _compiled patches it around calls.
                self._forward = torch.compile(self._model_forward, dynamic=False, options=CPU_COMPILE_OPTIONS)
                # Autotuning's benchmark harness touches a deprecated storage API (torch 2.13); not the user's concern.
                warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                 logits_index: torch.Tensor | int = -1, greedy: int = 0) -> torch.Tensor:
        """The model over rows [0, n) of the cache: tokens (n, T) at `positions` (n, T) (default: each row at its
        length); logits (n, N, V) of the positions logits_index picks ((n, N), or -1: the last, N = 1).

        greedy=k (positions given, logits_index -1): instead of logits, k tokens per row (n, k), the argmax after
        the last position, then k - 1 times the argmax after feeding the previous one at the next position, all in
        one call (one graph when compiled): a draft model's greedy proposal. The fed tokens stay in the cache; a
        position past its end is clamped to its last slot, which the caller must not need."""
        n, width = tokens.shape
        bucket = next(b for b in self.buckets if b >= n)
        saved = None
        if bucket > n:  # padding rows decode into rows beyond the running ones; their lengths are put back after
            saved = self.cache.lengths[n:bucket].clone()
            tokens = torch.cat([tokens, tokens.new_zeros(bucket - n, width)])
            if positions is not None:  # copies of one slot at each padding row's length (still inside the cache)
                pad = saved.clamp(max=self.cache.max_len - 1)[:, None].expand(-1, width)
                positions = torch.cat([positions, pad])
            if not isinstance(logits_index, int):
                logits_index = torch.cat([logits_index, logits_index.new_zeros(bucket - n, logits_index.shape[1])])
        view = self._views[bucket]
        if self._trim_span:
            last = int(view.lengths.max()) + width - 1 if positions is None else int(positions.max())
            last += max(greedy - 1, 0)  # the positions the chosen tokens are fed at
            view = view.prefix(min(last + 1, self.cache.max_len))
            if not self.graphs_built:  # after warm_up() nothing compiles (~0.14 ms a step saved at 15m)
                self._mark_span_dynamic(view)
        logits = self._run(tokens, view, positions, logits_index, greedy)
        if saved is not None:
            self.cache.lengths[n:bucket] = saved
            logits = logits[:n]
        return logits

    def warm_up(self, widths: Sequence[int], positions: bool = False, gather: bool = False, greedy: int = 0
                ) -> None:
        """Compile the graphs of every bucket for calls of these widths (T) with positions given or not, logits
        gathered or of the last position, or `greedy` tokens chosen; then no call of those signatures compiles. The
        cache's rows must hold nothing: it is emptied after."""
        if not self.compiled:
            return
        self.graphs_built = False  # checking every guard while these compile (a later warm-up adds signatures)
        with torch.inference_mode():
            for bucket in self.buckets:
                for width in widths:
                    self.cache.lengths[:bucket] = 1  # a span of >= 2: a dynamic dimension of size 1 is specialised
                    tokens = torch.zeros(bucket, width, dtype=torch.long, device=self.device)
                    # Contiguous, as the steps' own tensors are (an expanded view's strides would be another graph).
                    at = (torch.arange(width, device=self.device) + 1).clamp(max=self.cache.max_len - 1)
                    self(tokens, at.repeat(bucket, 1) if positions else None,
                         torch.arange(width, device=self.device).repeat(bucket, 1) if gather else -1, greedy)
            self.cache.reset()
        self.graphs_built = True

    def _model_forward(self, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor | None,
                       logits_index: torch.Tensor | int, greedy: int = 0) -> torch.Tensor:
        if self.compiled and self._graph_key < 0:
            # Never true; the comparison makes this object's number a guard of its graphs. They hold its cache as
            # constants (static addresses, frozen), so another CacheForward over the same model in this process must
            # not take them (it crashed with an index out of bounds, or decoded into the first engine's cache).
            raise AssertionError("unreachable")
        logits = self.model(tokens, cache=cache, positions=positions, logits_index=logits_index)  # (n, N, V)
        if not greedy:
            return logits
        chosen = [logits[:, -1].argmax(dim=-1)]  # (n,)
        at = positions[:, -1]  # (n,)
        for _ in range(greedy - 1):
            # Clamped: padding rows sit at their lengths, and a row may draft past its budget to the cache's end
            at = (at + 1).clamp(max=cache.max_len - 1)
            logits = self.model(chosen[-1][:, None], cache=cache, positions=at[:, None], logits_index=-1)
            chosen.append(logits[:, -1].argmax(dim=-1))
        return torch.stack(chosen, dim=1)  # (n, greedy)

    @staticmethod
    def _mark_span_dynamic(view: KVCache) -> None:
        for tensor in (*view.k, *view.v):
            torch._dynamo.mark_dynamic(tensor, 2)

    def _run(self, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor | None,
             logits_index: torch.Tensor | int, greedy: int) -> torch.Tensor:
        if not self.compiled:
            return self._forward(tokens, cache, positions, logits_index, greedy)
        if self.graphs_built:
            # After warm_up() no call should need a new graph (every bucket is compiled, the span is dynamic), so
            # dynamo checks only the guards that tell this code's graphs apart (bucket size, signature, owner's
            # number), not every one (each weight's metadata, ...). The full check took ~1.3 ms of 350m's ~19 ms
            # int8 step. Skipping it (and the span's dynamic marking), interleaved rounds on 2 threads (2026-12-03,
            # benchmarks/decode_ab.py): 15m bf16 1.13x, 350m int8 1.02-1.05x. Should a call still need a graph,
            # dynamo refuses before running anything; this object then goes back to checking every guard.
            try:
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    return self._compiled(tokens, cache, positions, logits_index, greedy)
            except RuntimeError as exc:
                if "skip_guard_eval_unsafe" not in str(exc):
                    raise
                warnings.warn("a compiled decode step needed a graph that warm_up() had not built; this engine "
                              "checks every guard from now on", RuntimeWarning, stacklevel=3)
                self.graphs_built = False
                if self._trim_span:
                    self._mark_span_dynamic(cache)
        return self._compiled(tokens, cache, positions, logits_index, greedy)

    def _compiled(self, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor | None,
                  logits_index: torch.Tensor | int, greedy: int) -> torch.Tensor:
        if self.device.type == "cuda":
            # A new iteration for CUDA graph trees: the last step's logits (already sampled) may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
            return self._forward(tokens, cache, positions, logits_index, greedy)
        # Around every call, not just a bucket's first (which compiles): a recompilation is frozen too, for ~17 us a
        # call.
        with torch._inductor.config.patch(freezing=True):
            return self._forward(tokens, cache, positions, logits_index, greedy)


def move_cache_row(cache: KVCache, src: int, dst: int, length: int) -> None:
    """Copy a row's first `length` positions into another row, which then holds them; the source row is empty."""
    for buffer in (*cache.k, *cache.v):  # (B, K, max_len, D) each
        buffer[dst, :, :length].copy_(buffer[src, :, :length])
    cache.lengths[dst] = length
    cache.lengths[src] = 0


def _powers_of_two_up_to(n: int) -> list[int]:
    """1, 2, 4, ... and n itself last: the batch sizes a static cache is decoded at."""
    sizes = [1 << i for i in range(n.bit_length()) if 1 << i < n]
    return sizes + [n]


__all__ = ["Engine", "CacheForward", "StepOutput", "Completion", "EngineStats", "SequenceState", "FINISH_STOP",
           "FINISH_LENGTH", "move_cache_row"]
