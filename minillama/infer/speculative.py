"""Speculative decoding: a cheap drafter proposes k tokens per sequence, the model verifies all of them in one
forward, and a rule decides how many to keep, so that each step yields 1 to k + 1 tokens for about the price of
one forward of the model (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding";
Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling").

    engine = SpeculativeEngine(model, tokenizer, draft=small_model, draft_tokens=4, max_batch=8)
    engine = SpeculativeEngine(model, tokenizer, prompt_lookup=3, draft_tokens=4)      # no draft model
    engine.generate(prompts, params)   # as Engine; completions carry .speculation (drafted, accepted, ...)

Drafters.
- A draft model (`draft=`): a smaller checkpoint with the same tokenizer. It has its own KV cache whose rows are
  the engine's rows (a row that moves in the engine's cache moves in the draft's too) and drafts k tokens in k
  batched forwards over the running rows; when every running row is greedy without penalties, the k forwards and
  their argmaxes are one call (CacheForward's greedy=k, one graph when compiled). Its cache catches up lazily: a
  sequence's prompt is prefilled into the draft at its first speculative step (in chunks of `prefill_chunk`, alone
  in its row), after which it is at most two tokens behind (the target's extra token, and the last draft when all
  were accepted) and catches up in the first of the k forwards. A draft pays only as far as it agrees with the
  model: one trained on the model's own output as well as the text agrees far more often than one trained on the
  text alone (sequence-level distillation; `benchmarks/speculative.py` trains both).
- Prompt lookup (`prompt_lookup=N`; Saxena 2023, "Prompt Lookup Decoding", as in Hugging Face's
  `prompt_lookup_num_tokens`): the sequence's last n tokens (n = N, N-1, ..., 1, the longest that occurs) are
  looked up earlier in its own prompt and output, most recent occurrence first; the tokens that followed are the
  draft. No model, so it pays only where text repeats (code, quotes, summaries of the prompt).

A sequence's first token comes from its prefill, as in Engine; speculation starts with the second. Each row
drafts k tokens, fewer near its max_new_tokens (k + 1 tokens would pass it).

Verification. The model reads, per row, the last accepted token and the k drafts at their positions in one
forward, which gives its distribution p at each of the k + 1 positions. Rows with fewer drafts (near max_new_tokens,
or a lookup that found less) are left-padded with copies of their first token at its own position: a copy
computes exactly what the token itself does and writes the same keys and values, so one (rows, k + 1) forward
serves all rows. Both distributions are what the sequence samples from: penalties (counting the drafts before
each position as generated), temperature, top-k/top-p/min-p, with the sequence's own SamplingParams.
- Greedy rows keep the drafts up to the first that is not the argmax, then the argmax there: exactly the tokens
  the model alone gives.
- Sampled rows: modified rejection sampling (Leviathan et al. §2.3, Chen et al. Algorithm 2): draft d at
  position j is kept with probability min(1, p_j(d) / q_j(d)); at the first rejection the token is drawn from
  norm(max(0, p_j - q_j)), and when all k are kept one more is drawn from p_{k+1}. Each emitted token is then
  distributed exactly as the model alone would sample it. Prompt-lookup drafts are deterministic proposals:
  q is one-hot, so d is kept with probability p(d) and a rejection draws from p with d removed.
Then the caches roll back to the kept tokens by lowering their lengths (KVCache: stale positions are masked, then
overwritten).

Randomness: every draw of a sequence (its drafts, the acceptance tests, the residual or extra token) comes from
its own generator, in an order fixed by its own tokens, so a seeded sequence gives the same text whatever else is
in the batch, for the same drafter and k (up to the last-bit rounding batched matmuls may change, as in Engine).
It is not the text the plain Engine gives for that seed: the generator is consumed differently. The
distribution is the same; greedy text is the same token for token.

Speed. A step costs one forward of the model over k + 1 tokens per row plus k forwards of the draft; it pays when
the model's forward is bound by reading its weights (k + 1 tokens cost about as much as one) and the draft is
much cheaper than the model. `benchmarks/speculative.py` measures acceptance and speed-up for a trained pair.

Compiled (`compile=True`; `minillama generate --draft D --compile`): the verification forward always takes k + 1
tokens a row (rows with fewer drafts padded as above), so each batch bucket is one graph, and the draft model's
one- and two-token forwards are compiled too; both are engine.py's CacheForward (static cache, batch buckets, the
span trimmed on CPU), and `warm_up()` builds every graph. The prefills (the model's and the draft's) run eager, as
in Engine. Off by default, on CUDA too (measured on CPU only). On 2 AVX2 cores in fp32 (one thread), the 13M
Shakespeare target with a 0.5M draft distilled from it: 2.26 ms a token at k = 4 against 4.45 for the compiled plain
step, the same tokens (1.97x; the draft trained on the text alone: 3.85 ms; benchmarks/RESULTS.md, 2026-12-03).
Not done: tree or multi-draft verification.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minillama.errors import MinillamaError
from minillama.infer.engine import CacheForward, Completion, Engine, SequenceState, StepOutput, move_cache_row
from minillama.infer.sampling import TokenLogprob, draw, probabilities_for, token_logprob
from minillama.model import KVCache

DEFAULT_DRAFT_TOKENS = 4


@dataclass
class SpeculationStats:
    """What speculation did, for one sequence or an engine's whole life."""

    drafted_tokens: int = 0  # tokens the drafter proposed
    accepted_tokens: int = 0  # of those, the ones verification kept
    verify_steps: int = 0  # forwards of the model that decoded (each yields accepted drafts + 1 token)

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted drafts / drafted tokens (None when nothing was drafted)."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else None

    @property
    def tokens_per_step(self) -> float | None:
        """Tokens yielded per forward of the model (1 is plain decoding; at most k + 1)."""
        return (self.accepted_tokens + self.verify_steps) / self.verify_steps if self.verify_steps else None

    def add(self, drafted: int, accepted: int) -> None:
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        self.verify_steps += 1

    def to_dict(self) -> dict[str, Any]:
        return dict(drafted_tokens=self.drafted_tokens, accepted_tokens=self.accepted_tokens,
                    acceptance_rate=self.acceptance_rate, verify_steps=self.verify_steps,
                    tokens_per_step=self.tokens_per_step)


@dataclass
class SpeculativeCompletion(Completion):
    """A Completion with what speculation did for it."""

    speculation: SpeculationStats = field(default_factory=SpeculationStats)


@dataclass
class Drafts:
    """Proposals for the running rows: tokens[i] (at most row i's budget) and, for a row whose drafts were drawn
    at random, the (len(tokens[i]), V) distributions q they were drawn from; None: proposed deterministically
    (greedy rows, prompt lookup), i.e. q is one-hot on the draft."""

    tokens: list[list[int]]
    probs: list[torch.Tensor | None]


# --------------------------------------------------------------------------------------------------------------
# Drafters
# --------------------------------------------------------------------------------------------------------------
class Drafter:
    """Proposes tokens for the running rows. A drafter with state per row follows the engine's rows."""

    def propose(self, seqs: list[SequenceState], budgets: list[int]) -> Drafts:
        raise NotImplementedError

    def verified(self, seqs: list[SequenceState], accepted: list[int]) -> None:
        """Verification kept accepted[i] of row i's drafts."""

    def move_row(self, src: int, dst: int, length: int) -> None:
        """The engine moved a sequence's row (its first `length` positions) from src to dst."""

    def forget(self, seq_id: int) -> None:
        """A sequence left the engine."""

    def warm_up(self) -> None:
        """Compile what the drafter compiles (the engine's warm_up)."""


class PromptLookup(Drafter):
    """Drafts the continuation of the longest recent n-gram match (n <= max_ngram) in the sequence itself."""

    def __init__(self, max_ngram: int) -> None:
        if not (isinstance(max_ngram, int) and max_ngram >= 1):
            raise MinillamaError(f"prompt lookup's n-gram size must be an integer >= 1, got {max_ngram!r}")
        self.max_ngram = max_ngram

    def propose(self, seqs: list[SequenceState], budgets: list[int]) -> Drafts:
        tokens = [lookup_continuation(s.prompt_ids + s.output_ids, self.max_ngram, b) if b else []
                  for s, b in zip(seqs, budgets)]
        return Drafts(tokens, [None] * len(seqs))


def lookup_continuation(ids: Sequence[int], max_ngram: int, count: int) -> list[int]:
    """Up to `count` tokens that followed the most recent earlier occurrence of the longest suffix of `ids` of at
    most max_ngram tokens that occurs earlier; [] if none does."""
    ids = list(ids)
    end = len(ids)
    for n in range(min(max_ngram, end - 1), 0, -1):
        pattern = ids[end - n:]
        # Starts from the most recent; an occurrence must leave at least one token after it inside ids[:end - 1].
        for start in range(end - n - 1, -1, -1):
            if ids[start] == pattern[0] and ids[start:start + n] == pattern:
                return ids[start + n:start + n + count]
    return []


class DraftModel(Drafter):
    """A smaller model with the same tokenizer, its KV cache's rows kept as the engine's rows."""

    def __init__(self, model: torch.nn.Module, max_batch: int, max_len: int, prefill_chunk: int, draft_tokens: int,
                 compiled: bool = False, static: bool | None = None) -> None:
        self.model = model.eval()
        self.draft_tokens = draft_tokens  # k: the most a proposal holds
        weight = model.tok_embeddings.weight
        self.device = weight.device
        self.cache = KVCache.empty(model.cfg, max_batch, max_len, dtype=weight.dtype, device=self.device,
                                   static=compiled if static is None else static)
        self.steps = CacheForward(model, self.cache, compiled)  # the batched forwards (the prefill runs eager)
        self.prefill_chunk = prefill_chunk
        self.cached: dict[int, int] = {}  # seq_id -> positions of its row that hold its tokens
        self._proposed: list[tuple[int, int, int]] = []  # per row of the last proposal: seq_id, length, fed drafts

    def propose(self, seqs: list[SequenceState], budgets: list[int]) -> Drafts:
        n, most = len(seqs), max(budgets)
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        self._proposed = []
        if most == 0:
            return Drafts(drafts, [None] * n)
        ids = [s.prompt_ids + s.output_ids for s in seqs]
        tokens, positions = self._catch_up(seqs, ids)  # what each row's cache lacks, left-padded: (n, 1 or 2)
        self._proposed = [(s.seq_id, len(ids[i]), min(budgets[i], most - 1)) for i, s in enumerate(seqs)]
        if all(s.params.greedy and not s.params.penalized for s in seqs):
            # Every row drafts the argmax: k drafts in one call (one graph when compiled). A row with a smaller
            # budget drafts past it too (at positions it never keeps; clamped into the cache) and keeps its budget's
            # worth.
            chosen = self.steps(self._tensor(tokens), self._tensor(positions), greedy=self.draft_tokens).tolist()
            return Drafts([row[:b] for row, b in zip(chosen, budgets)], [None] * n)
        logits = self._forward(tokens, positions)  # (n, V): the draft's next-token logits after each row's last
        for j in range(1, most + 1):
            active = [i for i in range(n) if budgets[i] >= j]
            for i, token, q in zip(active, *choose(logits[active], [seqs[i] for i in active],
                                                    [drafts[i] for i in active])):
                drafts[i].append(token)
                if q is not None:
                    probs[i].append(q)
            if j == most:
                break
            # Feed the drafts; a row that drafted all it may repeats its last token at its position (rewriting
            # the same keys and values), so that the batch stays rows [0, n) and no position passes its budget.
            fed = [drafts[i][min(j, budgets[i]) - 1] if budgets[i] else ids[i][-1] for i in range(n)]
            positions = [len(ids[i]) - 1 + min(j, budgets[i]) for i in range(n)]
            logits = self._forward([[t] for t in fed], [[p] for p in positions])
        return Drafts(drafts, [torch.stack(p) if p else None for p in probs])

    def verified(self, seqs: list[SequenceState], accepted: list[int]) -> None:
        # The draft holds the sequence's tokens and the drafts it was fed; those up to the first rejection stay.
        for (seq_id, length, fed), kept in zip(self._proposed, accepted):
            self.cached[seq_id] = length + min(kept, fed)

    def move_row(self, src: int, dst: int, length: int) -> None:
        move_cache_row(self.cache, src, dst, length)

    def warm_up(self) -> None:
        """Compile the draft's batched forwards: one token per row, and two when catching up, giving logits
        (sampled or penalized rows) or k greedy drafts."""
        self.steps.warm_up(widths=[1, 2], positions=True)
        self.steps.warm_up(widths=[1, 2], positions=True, greedy=self.draft_tokens)

    def forget(self, seq_id: int) -> None:
        self.cached.pop(seq_id, None)

    def _catch_up(self, seqs: list[SequenceState], ids: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
        """Prefill new sequences' prompts alone in their rows; then what each row's draft cache still lacks (one or
        two tokens, left-padded to one width): tokens and positions (n, 1 or 2), for one batched forward."""
        have = [self.cached.get(s.seq_id, 0) for s in seqs]
        for i in range(len(seqs)):  # a new sequence: its prompt alone in its row, leaving one token to the batch
            while len(ids[i]) - have[i] > 2:
                chunk = ids[i][have[i]:min(len(ids[i]) - 1, have[i] + self.prefill_chunk)]
                end = have[i] + len(chunk)  # a view of the positions the row holds after this chunk
                self.model(torch.tensor([chunk], device=self.device), cache=self.cache.rows(i, i + 1).prefix(end),
                           positions=torch.arange(have[i], end, device=self.device)[None], logits_index=-1)
                have[i] += len(chunk)
        width = max(len(ids[i]) - have[i] for i in range(len(seqs)))  # 1 or 2
        tokens, positions = [], []
        for i in range(len(seqs)):  # left-padded with copies of the first missing token at its own position
            pad = width - (len(ids[i]) - have[i])
            tokens.append([ids[i][have[i]]] * pad + ids[i][have[i]:])
            positions.append([have[i]] * pad + list(range(have[i], len(ids[i]))))
        return tokens, positions

    def _forward(self, tokens: list[list[int]], positions: list[list[int]]) -> torch.Tensor:
        """The next-token logits after each row's last token, (n, V)."""
        return self.steps(self._tensor(tokens), self._tensor(positions))[:, -1]

    def _tensor(self, rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, device=self.device)


# --------------------------------------------------------------------------------------------------------------
# Choosing and verifying tokens
# --------------------------------------------------------------------------------------------------------------
def penalized(logits: torch.Tensor, seqs: Sequence[SequenceState], pending: Sequence[Sequence[int]]
              ) -> torch.Tensor:
    """Rows of logits (N, V) in fp32 with seqs[r]'s penalties, counting pending[r] as generated."""
    logits = logits.float()
    rows = [r for r, s in enumerate(seqs) if s.params.penalized]
    if rows:
        logits = logits.clone()
        for r in rows:
            logits[r] = seqs[r].sampler.penalize(logits[r], pending[r])
    return logits


def choose(logits: torch.Tensor, seqs: list[SequenceState], pending: list[list[int]]
           ) -> tuple[list[int], list[torch.Tensor | None]]:
    """A draft token per row of logits (N, V): the argmax for greedy rows; for sampled rows a draw with the
    sequence's generator from its distribution q, returned beside it (None for greedy rows)."""
    logits = penalized(logits, seqs, pending)
    tokens = logits.argmax(dim=-1).tolist()
    dists: list[torch.Tensor | None] = [None] * len(seqs)
    sampled = [r for r, s in enumerate(seqs) if not s.params.greedy]
    if sampled:
        q = probabilities_for(logits[sampled], [seqs[r].params for r in sampled])
        for r, token, row in zip(sampled, draw(q, [seqs[r].sampler.generator for r in sampled]).tolist(), q):
            tokens[r], dists[r] = token, row
    return tokens, dists


def rejection_sample(target_probs: torch.Tensor, drafts: list[int], draft_probs: torch.Tensor | None,
                     generator: torch.Generator) -> list[int]:
    """Modified rejection sampling for one sequence (Leviathan et al. 2023 §2.3; Chen et al. 2023, Algorithm 2).

    target_probs (k + 1, V): the model's distribution at each draft's position and after the last; draft_probs
    (k, V): the distributions the drafts were drawn from, or None for deterministic drafts (q one-hot). Returns the
    kept drafts and one more token; each token is distributed as the model's own sample there."""
    k = len(drafts)
    index = torch.arange(k, device=target_probs.device)
    drafted = torch.tensor(drafts, dtype=torch.long, device=target_probs.device)
    p_of_draft = target_probs[index, drafted].tolist()
    q_of_draft = draft_probs[index, drafted].tolist() if draft_probs is not None else [1.0] * k
    for j in range(k):
        uniform = torch.rand(1, generator=generator, dtype=torch.float64).item()
        if uniform * q_of_draft[j] < p_of_draft[j]:  # kept with probability min(1, p/q)
            continue
        if draft_probs is not None:
            residual = (target_probs[j] - draft_probs[j]).clamp_(min=0)
        else:
            residual = target_probs[j].index_fill(0, drafted[j:j + 1], 0.0)
        if not float(residual.sum()) > 0:  # p <= q everywhere only by rounding (p == q): p itself
            residual = target_probs[j]
        return drafts[:j] + draw(residual[None], [generator]).tolist()
    return drafts + draw(target_probs[k:], [generator]).tolist()


def greedy_accept(choices: list[int], drafts: list[int]) -> list[int]:
    """Drafts up to the first that is not the model's choice there, then its choice: choices has k + 1 entries."""
    kept = next((j for j, (d, c) in enumerate(zip(drafts, choices)) if d != c), len(drafts))
    return drafts[:kept] + [choices[kept]]


# --------------------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------------------
class SpeculativeEngine(Engine):
    """The Engine with speculative decoding: each step, every running sequence gets up to draft_tokens + 1 tokens.

    draft           a smaller model with the target's tokenizer (its vocabulary; a context covering max_len), or
    prompt_lookup   the longest n-gram looked up in the sequence itself (n <= prompt_lookup); exactly one of the two
    draft_tokens    tokens drafted per step (k, default 4)
    draft_tokenizer the draft's tokenizer, checked against the engine's (fingerprint) when both are given
    compile         compile the verification forward (always k + 1 tokens per row) and the draft's forwards
                    (default off, on CUDA too: measured on CPU only; see the module docstring)

    Everything else is Engine's (continuous batching, prefill, stop strings, logprobs, streaming).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, *, draft: torch.nn.Module | None = None,
                 prompt_lookup: int | None = None, draft_tokens: int = DEFAULT_DRAFT_TOKENS,
                 draft_tokenizer: Any = None, compile: bool | None = None, **options: Any) -> None:
        check_speculation(draft is not None, prompt_lookup, draft_tokens)
        super().__init__(model, tokenizer, compile=bool(compile), **options)
        self.draft_tokens = draft_tokens
        if draft is not None:
            check_draft(self.cfg, draft.cfg, self.max_len, tokenizer, draft_tokenizer)
            if draft.tok_embeddings.weight.device != self.device:
                raise MinillamaError(f"the draft model is on {draft.tok_embeddings.weight.device}, the model on "
                                     f"{self.device}; put both on one device")
            self.drafter: Drafter = DraftModel(draft, self.max_batch, self.max_len, self.prefill_chunk, draft_tokens,
                                               compiled=self.compiled, static=self.cache.static)
        else:
            self.drafter = PromptLookup(prompt_lookup)
        self.speculation = SpeculationStats()  # the engine's whole life
        self._speculation: dict[int, SpeculationStats] = {}  # per running sequence

    def decode_step(self, seqs: list[SequenceState]) -> list[StepOutput]:
        budgets = [min(self.draft_tokens, s.max_new_tokens - len(s.output_ids) - 1) for s in seqs]
        drafts = self.drafter.propose(seqs, budgets)
        logits = self._verify_forward(seqs, drafts.tokens)  # (n, k + 1, V)
        emitted = self._emitted(seqs, drafts, logits)
        accepted = [len(e) - 1 for e in emitted]
        raw = logits.float().log_softmax(dim=-1) if any(s.logprobs is not None for s in seqs) else None
        outputs = []
        for i, (seq, tokens) in enumerate(zip(seqs, emitted)):
            # Keep the last token and the accepted drafts in the cache; the new last token is fed next step.
            seq.cached += accepted[i] + 1
            self.speculation.add(len(drafts.tokens[i]), accepted[i])
            self._speculation.setdefault(seq.seq_id, SpeculationStats()).add(len(drafts.tokens[i]), accepted[i])
            for token in tokens:
                seq.sampler.observe(token)
            logprobs: list[TokenLogprob | None] = [None] * len(tokens)
            if raw is not None and seq.params.logprobs is not None:
                logprobs = [token_logprob(raw[i, j], t, seq.params.logprobs) for j, t in enumerate(tokens)]
            outputs.append(self.accept(seq, tokens, logprobs))
        self.cache.lengths[:len(seqs)] = torch.tensor([s.cached for s in seqs], device=self.device)
        self.drafter.verified(seqs, accepted)
        return outputs

    def _verify_forward(self, seqs: list[SequenceState], drafts: list[list[int]]) -> torch.Tensor:
        """The model over each row's last token and its drafts in one forward: logits (n, w + 1, V), entry j of
        row i predicting the token after its j-th draft (entries past a row's drafts repeat its last); w is the
        most drafts a row has, or k when compiled (one graph per batch bucket)."""
        width = self.draft_tokens if self.compiled else max(len(d) for d in drafts)
        tokens, positions, index = [], [], []
        for seq, d in zip(seqs, drafts):
            pad, last = width - len(d), seq.cached  # the last token's position (it is not in the cache yet)
            tokens.append([seq.output_ids[-1]] * (pad + 1) + d)
            positions.append([last] * (pad + 1) + list(range(last + 1, last + 1 + len(d))))
            index.append([min(pad + j, width) for j in range(width + 1)])
        as_tensor = lambda rows: torch.tensor(rows, device=self.device)
        return self.steps(as_tensor(tokens), as_tensor(positions), as_tensor(index))

    def _emitted(self, seqs: list[SequenceState], drafts: Drafts, logits: torch.Tensor) -> list[list[int]]:
        """Each row's kept drafts and one more token."""
        n, width, vocab = logits.shape
        flat_seqs = [s for s in seqs for _ in range(width)]
        pending = [d[:j] for d in drafts.tokens for j in range(width)]  # drafts before each position
        scores = penalized(logits.reshape(n * width, vocab), flat_seqs, pending).view(n, width, vocab)
        out: list[list[int]] = [[] for _ in seqs]
        greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
        if greedy:
            choices = scores[greedy].argmax(dim=-1).tolist()
            for i, row in zip(greedy, choices):
                out[i] = greedy_accept(row, drafts.tokens[i])
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampled:
            params = [seqs[i].params for i in sampled for _ in range(width)]
            probs = probabilities_for(scores[sampled].flatten(0, 1), params).view(len(sampled), width, vocab)
            for i, p in zip(sampled, probs):
                d = drafts.tokens[i]
                out[i] = rejection_sample(p[:len(d) + 1], d, drafts.probs[i], seqs[i].sampler.generator)
        return out

    def _build_graphs(self) -> None:
        self.steps.warm_up(widths=[self.draft_tokens + 1], positions=True, gather=True)
        self.drafter.warm_up()

    # Rows: the draft's follow the engine's.
    def _move_row(self, src: int, dst: int, length: int) -> None:
        super()._move_row(src, dst, length)
        self.drafter.move_row(src, dst, length)

    def _release_row(self, seq: SequenceState) -> None:
        super()._release_row(seq)
        self.drafter.forget(seq.seq_id)
        self._speculation.pop(seq.seq_id, None)

    def _complete(self, seq: SequenceState, now: float) -> SpeculativeCompletion:
        done = super()._complete(seq, now)
        return SpeculativeCompletion(**vars(done), speculation=self._speculation.get(seq.seq_id, SpeculationStats()))


# --------------------------------------------------------------------------------------------------------------
# Checks, and what `minillama generate --draft/--prompt-lookup` builds
# --------------------------------------------------------------------------------------------------------------
def check_speculation(has_draft: bool, prompt_lookup: int | None, draft_tokens: int | None) -> None:
    """One drafter, and sizes that make sense."""
    if has_draft == (prompt_lookup is not None):
        raise MinillamaError("speculative decoding needs exactly one drafter: a draft model (--draft) or prompt "
                             "lookup (--prompt-lookup N)")
    if prompt_lookup is not None and not (isinstance(prompt_lookup, int) and prompt_lookup >= 1):
        raise MinillamaError(f"prompt lookup's n-gram size (--prompt-lookup) must be an integer >= 1, "
                             f"got {prompt_lookup!r}")
    if draft_tokens is not None and not (isinstance(draft_tokens, int) and draft_tokens >= 1):
        raise MinillamaError(f"draft tokens per step (--draft-tokens) must be an integer >= 1, got {draft_tokens!r}")


def check_draft(target_cfg: Any, draft_cfg: Any, max_len: int, tokenizer: Any = None, draft_tokenizer: Any = None,
                where: str = "the draft model") -> None:
    """The draft must share the target's tokenizer (vocabulary size, and fingerprint when both are known) and
    hold max_len positions."""
    if draft_cfg.vocab_size != target_cfg.vocab_size:
        raise MinillamaError(f"{where} has a vocabulary of {draft_cfg.vocab_size} tokens, the model "
                             f"{target_cfg.vocab_size}: speculative decoding needs a draft with the same tokenizer")
    if tokenizer is not None and draft_tokenizer is not None and draft_tokenizer.fingerprint != tokenizer.fingerprint:
        raise MinillamaError(f"{where} has another tokenizer (fingerprint {draft_tokenizer.fingerprint[:12]}, the "
                             f"model's {tokenizer.fingerprint[:12]}): speculative decoding needs the same tokenizer")
    if draft_cfg.max_seq_len < max_len:
        raise MinillamaError(f"{where}'s context (max_seq_len={draft_cfg.max_seq_len}) is shorter than the "
                             f"{max_len} positions this engine holds per sequence; use shorter prompts or "
                             f"max_new_tokens, or a draft with a longer context")


def load_draft(checkpoint: str | Path, model: Any, tokenizer: Any, device: str = "auto", dtype: str = "auto"
               ) -> tuple[Any, Any]:
    """(draft model, its tokenizer) from a checkpoint, on `device` in `dtype`, checked against the model's
    tokenizer (the context is checked by the engine, which knows max_len)."""
    from minillama.infer.generate import load_for_inference

    draft, draft_tokenizer = load_for_inference(checkpoint, device=device, dtype=dtype)
    check_draft(model.cfg, draft.cfg, 0, tokenizer, draft_tokenizer, where=f"draft checkpoint {checkpoint}")
    return draft, draft_tokenizer


def speculative_options(draft: str | Path | None, prompt_lookup: int | None, draft_tokens: int | None, model: Any,
                        tokenizer: Any, device: str = "auto", dtype: str = "auto") -> dict[str, Any]:
    """SpeculativeEngine's options for `minillama generate --draft CKPT | --prompt-lookup N [--draft-tokens K]`
    (the flags checked before the draft is loaded)."""
    if draft_tokens is not None and draft is None and prompt_lookup is None:
        raise MinillamaError("--draft-tokens sets how many tokens a drafter proposes; give --draft CKPT or "
                             "--prompt-lookup N")
    check_speculation(draft is not None, prompt_lookup, draft_tokens)
    options: dict[str, Any] = dict(draft_tokens=draft_tokens or DEFAULT_DRAFT_TOKENS, prompt_lookup=prompt_lookup)
    if draft is not None:
        options["draft"], options["draft_tokenizer"] = load_draft(draft, model, tokenizer, device, dtype)
    return options


__all__ = ["SpeculativeEngine", "SpeculativeCompletion", "SpeculationStats", "Drafter", "DraftModel",
           "PromptLookup", "Drafts", "lookup_continuation", "rejection_sample", "greedy_accept", "check_draft",
           "check_speculation", "load_draft", "speculative_options", "DEFAULT_DRAFT_TOKENS"]
