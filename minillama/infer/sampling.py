"""Choosing the next token: per-sequence sampling parameters, and the batched logits -> token step.

For each row of logits, in this order (Hugging Face's `generate` and vLLM use the same one):

1. penalties on the raw logits:
   - repetition (CTRL, Keskar et al. 2019, §4.1, as HF's RepetitionPenaltyLogitsProcessor): every token seen in
     the prompt or the output so far has its logit divided by the penalty if positive, multiplied if negative;
   - frequency and presence (OpenAI's definition, "Parameter details" in their API guide):
     logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty, count[j] being how often j
     was generated so far (the output only, as OpenAI and vLLM count it);
2. temperature 0: the token is exactly the argmax of these logits (greedy); nothing below applies;
3. otherwise logits / temperature, then top-k (keep the k largest), top-p (nucleus, Holtzman et al. 2019: keep
   the most likely tokens until their mass reaches top_p; a token is dropped when the tokens ranked above it
   already hold top_p), min-p (Nguyen et al. 2024: drop tokens whose probability is below min_p times the
   largest), and a draw from the renormalised distribution with the sequence's own `torch.Generator`.

`token_probabilities` is step 3 up to the draw: the distribution a sequence samples from, for tests and for
speculative decoding, which needs it to accept or reject drafted tokens.

Log-probabilities (`SamplingParams.logprobs`) are the model's: log_softmax of the raw logits, before penalties,
temperature and filtering, as OpenAI reports them (and vLLM by default): they score the text, not the sampler.

Randomness: each sequence owns a CPU `torch.Generator` (seeded with `seed`, or from `secrets` when no seed is
given) and draws one uniform number per sampled token; the token is where that number falls in the cumulative
distribution. So a seeded sequence gives the same tokens whatever else shares its batch (up to the rounding of the
logits themselves, which batched matmuls may change in the last bit), on any device, and nothing here touches
torch's global RNG.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from minillama.errors import MinillamaError

MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is continued. Validated on construction (MinillamaError naming the field).

    max_new_tokens     tokens to generate at most (fewer if the context fills first: finish reason "length")
    temperature        0 is greedy (exactly argmax); else logits are divided by it
    top_k              keep the k most likely tokens (None: all)
    top_p              nucleus sampling mass in (0, 1] (1: off)
    min_p              drop tokens below min_p x the top probability, in [0, 1] (0: off)
    repetition_penalty CTRL/HF penalty over prompt + output tokens, > 0 (1: off)
    frequency_penalty  OpenAI's, in [-2, 2], per past occurrence in the output
    presence_penalty   OpenAI's, in [-2, 2], once per token present in the output
    stop               strings that end the text, matched on the decoded text; the match is not included
    stop_token_ids     token ids that end the sequence (not included in the output)
    ignore_eos         don't stop at the tokenizer's (or model config's) EOS
    seed               seeds this sequence's own generator; None draws a fresh random seed
    logprobs           None: no log-probabilities; n >= 0: the chosen token's and the n most likely tokens'

    Several completions of one prompt (OpenAI's `n`) are several sequences: add the prompt n times, with seeds
    seed, seed + 1, ... (or none), and they decode as one batch.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens,
               "an integer >= 1")
        _check(_is_real(self.temperature) and self.temperature >= 0, "temperature", self.temperature,
               "a number >= 0 (0 is greedy)")
        _check(self.top_k is None or (_is_int(self.top_k) and self.top_k >= 1), "top_k", self.top_k,
               "an integer >= 1, or None for all tokens")
        _check(_is_real(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        _check(_is_real(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "in [0, 1]")
        _check(_is_real(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
               self.repetition_penalty, "a number > 0 (1 is off)")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _check(_is_real(value) and -2 <= value <= 2, name, value, "in [-2, 2] (OpenAI's range)")
        for s in self.stop:
            _check(isinstance(s, str) and s != "", "stop", s, "non-empty strings")
        for t in self.stop_token_ids:
            _check(_is_int(t) and t >= 0, "stop_token_ids", t, "token ids >= 0")
        _check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63), "seed", self.seed,
               "an integer in [0, 2**63), or None")
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS),
               "logprobs", self.logprobs, f"None or an integer in [0, {MAX_TOP_LOGPROBS}]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise MinillamaError(f"sampling parameter {name} must be {expected}, got {value!r}")


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log-probability under the model, and the `n` most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-probability), most likely first


@dataclass
class SequenceSampler:
    """The sampling state of one sequence: its parameters, its generator and, when penalties are on, which tokens
    it has seen (prompt + output, for the repetition penalty) and how often it generated each (output only)."""

    params: SamplingParams
    vocab_size: int
    prompt_ids: list[int] = field(default_factory=list, repr=False)
    seed: int = field(init=False)
    generator: torch.Generator = field(init=False, repr=False)
    seen: torch.Tensor | None = field(init=False, default=None, repr=False)  # (V,) bool
    counts: torch.Tensor | None = field(init=False, default=None, repr=False)  # (V,) fp32

    def __post_init__(self) -> None:
        # A seedless sequence draws its seed from the OS, never from (or into) torch's global RNG.
        self.seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(self.seed)
        if self.params.penalized:
            self.seen = torch.zeros(self.vocab_size, dtype=torch.bool)
            self.seen[torch.tensor(self.prompt_ids, dtype=torch.long)] = True
            self.counts = torch.zeros(self.vocab_size)

    def observe(self, token_id: int) -> None:
        """Count a generated token (only penalties need it)."""
        if self.counts is not None:
            self.seen[token_id] = True
            self.counts[token_id] += 1

    def penalize(self, logits: torch.Tensor, pending: Sequence[int] = ()) -> torch.Tensor:
        """The row's logits (V,) with its penalties applied (a new tensor). `pending`: tokens counted as if already
        generated (speculative decoding scores drafted tokens before they are accepted)."""
        p = self.params
        if self.seen.device != logits.device:  # kept beside the logits from the first step on
            self.seen, self.counts = self.seen.to(logits.device), self.counts.to(logits.device)
        seen, counts = self.seen, self.counts
        if pending:
            index = torch.tensor(list(pending), device=logits.device)
            seen = seen.index_fill(0, index, True)
            counts = counts.index_add(0, index, torch.ones(len(index), device=logits.device))
        if p.repetition_penalty != 1:
            penalized = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(seen, penalized, logits)
        if p.frequency_penalty != 0 or p.presence_penalty != 0:
            logits = logits - counts * p.frequency_penalty - (counts > 0).float() * p.presence_penalty
        return logits


def token_probabilities(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                        top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """The distribution each row samples from: logits (N, V) (penalties already applied) -> probabilities (N, V).

    Per-row settings, each (N,): temperature > 0; top_k in 1..V (V keeps all); top_p in (0, 1]; min_p in [0, 1].
    """
    logits = logits.float() / temperature[:, None]
    vocab = logits.shape[-1]
    filtered = top_k < vocab  # (N,): rows that keep fewer than all tokens
    if bool(filtered.any()):
        k_max = int(top_k[filtered].max())
        kth = logits.topk(k_max, dim=-1).values.gather(1, (top_k.clamp(max=k_max) - 1)[:, None])  # (N, 1)
        kth = torch.where(filtered[:, None], kth, float("-inf"))  # rows keeping all tokens: no threshold
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if bool((top_p < 1).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs  # (N, V): mass of the tokens ranked above
        # Rows with top_p = 1 drop nothing (the cumulative sum can round past 1 at the tail).
        drop_sorted = (mass_above >= top_p[:, None]) & (top_p[:, None] < 1)
        drop_sorted[:, 0] = False  # the most likely token always stays
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    if bool((min_p > 0).any()):
        threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values  # (N, 1)
        probs = probs.masked_fill(probs < threshold, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def probabilities_for(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """`token_probabilities` with row i's settings taken from params[i] (none of them greedy): (N, V) -> (N, V)."""
    vocab = logits.shape[-1]
    as_tensor = lambda values: torch.tensor(values, device=logits.device)
    return token_probabilities(logits, as_tensor([p.temperature for p in params]),
                               as_tensor([min(p.top_k or vocab, vocab) for p in params]),
                               as_tensor([p.top_p for p in params]), as_tensor([p.min_p for p in params]))


def token_logprob(raw_logprobs: torch.Tensor, token_id: int, top_n: int) -> TokenLogprob:
    """A chosen token's entry from one row of the model's log-probabilities (V,), with the top_n most likely."""
    top = ()
    if top_n > 0:
        values, ids = raw_logprobs.topk(top_n)
        top = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token_id, float(raw_logprobs[token_id]), top)


def draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of probs (N, V), each from its own generator: where one uniform number falls in the
    row's cumulative distribution (inverse transform sampling). Tokens of probability 0 are never drawn."""
    uniforms = torch.tensor([torch.rand(1, generator=g, dtype=torch.float64).item() for g in generators],
                            dtype=torch.float64, device=probs.device)  # (N,)
    cdf = probs.double().cumsum(dim=-1)  # (N, V); float64 so that the tail's tiny masses stay distinct
    target = uniforms[:, None] * cdf[:, -1:]  # (N, 1), below the row's total
    # right=True: the first index whose cumulative mass exceeds the target, which never lands on a zero-mass
    # token (its cumulative mass equals its predecessor's).
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def sample(logits: torch.Tensor, samplers: list[SequenceSampler]) -> tuple[list[int], list[TokenLogprob | None]]:
    """Next tokens for rows of logits (B, V), row i by samplers[i]; with each row's log-probabilities if asked.

    Greedy rows without penalties or log-probabilities cost one argmax: the batch-1 fast path."""
    logits = logits.float()
    rows = range(len(samplers))
    raw_logprobs = None
    if any(s.params.logprobs is not None for s in samplers):
        raw_logprobs = logits.log_softmax(dim=-1)  # the model's log-probabilities, before any processing
    penalized = [i for i in rows if samplers[i].params.penalized]
    if penalized:
        logits = logits.clone()
        for i in penalized:
            logits[i] = samplers[i].penalize(logits[i])
    greedy = [i for i in rows if samplers[i].params.greedy]
    tokens = [0] * len(samplers)
    if len(greedy) == len(samplers):
        tokens = logits.argmax(dim=-1).tolist()
    else:
        if greedy:
            for i, t in zip(greedy, logits[greedy].argmax(dim=-1).tolist()):
                tokens[i] = t
        sampled = [i for i in rows if not samplers[i].params.greedy]
        probs = probabilities_for(logits[sampled], [samplers[i].params for i in sampled])
        for i, t in zip(sampled, draw(probs, [samplers[i].generator for i in sampled]).tolist()):
            tokens[i] = t
    logprobs: list[TokenLogprob | None] = [None] * len(samplers)
    if raw_logprobs is not None:
        for i in rows:
            if samplers[i].params.logprobs is not None:
                logprobs[i] = token_logprob(raw_logprobs[i], tokens[i], samplers[i].params.logprobs)
    for i in rows:
        samplers[i].observe(tokens[i])
    return tokens, logprobs


__all__ = ["SamplingParams", "SequenceSampler", "TokenLogprob", "token_probabilities", "probabilities_for",
           "token_logprob", "draw", "sample", "MAX_TOP_LOGPROBS"]
