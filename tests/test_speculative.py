"""Speculative decoding: greedy output identical to the model alone (a draft that disagrees, one that mostly
agrees, the model itself, prompt lookup; batched with joins, leaves and a cancel, and alone), sampling that keeps
the model's distribution (chi-square on a vocabulary of 8 against the exact distribution), seeds, stop strings,
stop ids, lengths and streaming as in the plain engine, refused drafts, and the CLI."""

from __future__ import annotations

import copy
import json
import re

import pytest
import test_infer
import torch
from test_infer import TEXT, alone, assert_same, autotune_failures, prompts_of, small_model

from minillama import MinillamaError, save
from minillama.cli import main
from minillama.infer import Engine, SamplingParams
from minillama.infer.engine import CacheForward
from minillama.infer.sampling import SequenceSampler, probabilities_for
from minillama.infer.speculative import (
    SpeculativeEngine,
    greedy_accept,
    lookup_continuation,
    rejection_sample,
)
from minillama.model import KVCache
from minillama.tokenizer import train_bpe_from_texts

bpe = test_infer.bpe  # the byte-level BPE fixture


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run thousands of forwards of tiny models. On a busy 2-core machine every parallel region waits
    for the thread the scheduler took away: 1000 sampled sequences took 30 s with 2 threads, 1.5 s with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DRAFTERS = ["other-model", "perturbed-copy", "itself", "prompt-lookup"]


def perturbed(model, scale: float, seed: int = 7):
    """The model with noise added to its weights: a draft that agrees with it often, not always."""
    copied = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in copied.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return copied


def drafter_options(kind: str, target) -> dict:
    if kind == "other-model":  # another shape and other weights, the same vocabulary
        return dict(draft=small_model(seed=5, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden_dim=48))
    if kind == "perturbed-copy":
        return dict(draft=perturbed(target, 0.005))
    if kind == "itself":
        return dict(draft=target)
    return dict(prompt_lookup=3)


# --------------------------------------------------------------------------------------------------------------
# Greedy: the model's own tokens
# --------------------------------------------------------------------------------------------------------------
def joins_leaves_and_cancel(engine_for) -> tuple:
    """Five prompts through four rows (two start, three join later, one while another prefills in chunks; rows
    leave at different lengths and move; one is cancelled), greedy with penalties and logprobs mixed in, through the
    engine engine_for(target) builds; asserts every finished sequence has the tokens, text and log-probabilities of
    the plain engine run alone. Returns the engine, the completions by id and the ids."""
    target = small_model()
    repetitive = [1] + [5, 6, 7, 8] * 5  # prompt lookup finds matches here
    prompts = prompts_of([5, 23, 2, 11]) + [repetitive]
    params = [
        SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True, logprobs=2),
        SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True),
        SamplingParams(max_new_tokens=20, temperature=0, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(max_new_tokens=25, temperature=0, frequency_penalty=0.5, presence_penalty=0.3,
                       ignore_eos=True, logprobs=0),
        SamplingParams(max_new_tokens=17, temperature=0, ignore_eos=True),
    ]
    expected = [alone(target, p, q) for p, q in zip(prompts, params)]
    engine = engine_for(target)
    ids = [engine.add(prompts[0], params[0]), engine.add(prompts[1], params[1])]
    done, cancelled = {}, None
    for step in range(200):
        if step == 1:
            ids.append(engine.add(prompts[2], params[2]))
        if step == 2:
            ids += [engine.add(prompts[3], params[3]), engine.add(prompts[4], params[4])]
        if step == 4:
            cancelled = ids[2]
            assert engine.cancel(cancelled)
        for out in engine.step():
            if out.completion is not None:
                done[out.seq_id] = out.completion
        if not engine.has_work():
            break
    assert set(done) == set(ids) - {cancelled}
    for i, seq_id in enumerate(ids):
        if seq_id != cancelled:
            assert_same(done[seq_id], expected[i])
    stats = engine.stats()
    assert (stats.running, stats.free_rows, stats.kv_tokens_in_use, stats.kv_tokens_reserved) == (0, 4, 0, 0)
    return engine, done, ids


@pytest.mark.parametrize("static", [False, True], ids=["growing-cache", "static-cache"])
@pytest.mark.parametrize("kind", DRAFTERS)
def test_greedy_equals_the_model_alone_batched_with_joins_leaves_and_cancel(kind, static):
    """joins_leaves_and_cancel for each drafter; with the static cache (what compile=True uses) the batch is padded
    to a bucket of rows, the padding rows decoding beside the running ones (CacheForward)."""
    engine, done, ids = joins_leaves_and_cancel(lambda target: SpeculativeEngine(
        target, max_batch=4, prefill_chunk=8, draft_tokens=3, static_cache=static, **drafter_options(kind, target)))
    rate = engine.speculation.acceptance_rate
    if kind == "itself":
        assert rate == 1.0 and engine.speculation.tokens_per_step > 2.5
    elif kind == "perturbed-copy":
        assert 0.3 < rate < 1.0  # both paths taken: kept drafts and rejected ones
    elif kind == "prompt-lookup":
        assert done[ids[4]].speculation.accepted_tokens > 0  # the repetitive prompt's drafts were used


@pytest.mark.slow
def test_compiled_speculation_equals_the_model_alone_and_compiles_nothing_after_warm_up():
    """compile=True: the verification forward (k + 1 tokens a row, every bucket) and the draft model's forwards
    are compiled by warm_up() with no kernel choice failing to compile; rows joining, leaving and being cancelled
    then compile nothing more, and every sequence has the plain engine's tokens. Slow (compilation, ~5 min on 2
    cores): `pytest -m slow`."""
    kind = "perturbed-copy"  # a draft model: both compiled forwards (prompt lookup compiles only verification)
    from torch._dynamo.utils import counters

    graphs = []

    def compiled_engine(target):
        engine = SpeculativeEngine(target, max_batch=4, prefill_chunk=8, draft_tokens=3, compile=True,
                                   **drafter_options(kind, target))
        with autotune_failures() as failures:  # in fp32 the verification's attention met a failing template
            assert engine.warm_up() > 0
        assert not failures, failures
        graphs.append(counters["stats"]["unique_graphs"])
        return engine

    engine, _, _ = joins_leaves_and_cancel(compiled_engine)
    assert counters["stats"]["unique_graphs"] == graphs[0]
    assert engine.speculation.accepted_tokens > 0


@pytest.mark.parametrize("static", [False, True], ids=["growing-cache", "static-cache"])
def test_greedy_drafting_in_one_call_equals_argmax_fed_back_one_forward_at_a_time(static):
    """CacheForward(greedy=k), a draft model's proposal in one call (one graph when compiled): k argmax tokens,
    each fed back at the next position, equal k one-token forwards with the argmax taken outside, in the tokens
    and in every key and value written. Three rows at different lengths (the static cache pads them to a bucket of
    four), one of them at the end of the cache, whose positions past it are clamped into it."""
    model = small_model()
    k, max_len = 4, 40
    prompts = prompts_of([5, 23, max_len - 1])
    caches, chosen = [], []
    for fused in (True, False):
        cache = KVCache.empty(model.cfg, 4, max_len, dtype=torch.float32, static=static)
        steps = CacheForward(model, cache, compiled=False)
        with torch.inference_mode():
            for row, prompt in enumerate(prompts):  # all but the last token, alone in its row
                model(torch.tensor([prompt[:-1]]), cache=cache.rows(row, row + 1).prefix(len(prompt) - 1))
            tokens = torch.tensor([[p[-1]] for p in prompts])  # (3, 1)
            positions = torch.tensor([[len(p) - 1] for p in prompts])
            if fused:
                out = steps(tokens, positions, greedy=k)
            else:
                out = []
                for _ in range(k):
                    out.append(steps(tokens, positions)[:, -1].argmax(dim=-1))
                    tokens, positions = out[-1][:, None], (positions + 1).clamp(max=max_len - 1)
                out = torch.stack(out, dim=1)
        assert out.shape == (3, k)
        caches.append(cache)
        chosen.append(out)
    assert torch.equal(chosen[0], chosen[1])
    for a, b in zip((*caches[0].k, *caches[0].v), (*caches[1].k, *caches[1].v)):
        torch.testing.assert_close(a[:3], b[:3], rtol=0, atol=1e-6)
    assert torch.equal(caches[0].lengths, caches[1].lengths)
    assert len(set(chosen[0][:2].flatten().tolist())) > 2  # rows that wander: a copied first token would fail


@pytest.mark.parametrize("draft_tokens", [1, 2, 5])
def test_greedy_alone_equals_the_model_for_each_k(draft_tokens):
    target = small_model()
    draft = perturbed(target, 0.005)
    params = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    for prompt in prompts_of([3, 30], seed=4):
        engine = SpeculativeEngine(target, draft=draft, draft_tokens=draft_tokens, max_batch=1)
        draft_calls = []
        forward = engine.drafter.steps.__call__
        engine.drafter.steps = (lambda *args, calls=draft_calls, forward=forward, **kwargs:
                                calls.append(kwargs) or forward(*args, **kwargs))
        got = engine.generate([prompt], params)[0]
        assert got.token_ids == alone(target, prompt, params).token_ids
        assert got.speculation.verify_steps < 40  # fewer forwards of the model than tokens
        # Greedy rows without penalties: each proposal is one call of the draft, all k drafts chosen inside it
        # (a last step with one token left drafts nothing)
        assert draft_calls and all(call == dict(greedy=draft_tokens) for call in draft_calls)
        assert len(draft_calls) in (got.speculation.verify_steps - 1, got.speculation.verify_steps)


def test_context_full_and_static_cache():
    """A row whose context fills mid-draft stops at max_len as the plain engine does; the static cache too."""
    target = small_model()
    params = SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True)
    prompt = prompts_of([9])[0]
    plain = Engine(target, max_batch=1, max_len=20).generate([prompt], params)[0]
    for static in (False, True):
        got = SpeculativeEngine(target, draft=target, draft_tokens=4, max_batch=2, max_len=20,
                                static_cache=static).generate([prompt], params)[0]
        assert got.token_ids == plain.token_ids and got.finish_reason == "length" and len(got.token_ids) == 11


# --------------------------------------------------------------------------------------------------------------
# Sampling: the model's distribution, whatever the drafter
# --------------------------------------------------------------------------------------------------------------
VOCAB = 8


def tiny_vocab_model(seed: int):
    return small_model(vocab_size=VOCAB, seed=seed, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                       ffn_hidden_dim=48, max_seq_len=32)


def bigram_model(follows: dict[int, int], seed: int = 0):
    """tiny_vocab_model made a bigram model: attention and feed-forward outputs zeroed, so the logits after token
    a are output(norm(embedding[a])); embeddings one-hot and the output set so that they are 2.5 on follows[a]
    plus noise. Text that repeats a pattern the bigrams favour: prompt lookup's drafts are often right."""
    model = tiny_vocab_model(seed)
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(VOCAB, VOCAB, generator=g) * 0.7  # [a, next]
    for a, b in follows.items():
        table[a, b] += 2.5
    dim = model.cfg.dim
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        model.tok_embeddings.weight.copy_(torch.eye(VOCAB, dim))
        model.norm.weight.fill_(1.0)
        output = torch.zeros(VOCAB, dim)
        output[:, :VOCAB] = table.T / dim ** 0.5  # RMSNorm turns the one-hot embedding into sqrt(dim) one-hot
        model.output.weight.copy_(output)
    return model


def exact_pair_distribution(model, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """P(second, third generated token) (VOCAB, VOCAB), summed over the first, by the model's sampling rule
    (penalties counting the generated tokens, temperature, filters) computed exactly."""

    def next_probs(prefixes: list[list[int]]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + p for p in prefixes]))[:, -1].float()  # (N, V)
        rows = []
        for prefix, row in zip(prefixes, logits):
            sampler = SequenceSampler(params, VOCAB, prompt)
            for t in prefix:
                sampler.observe(t)
            rows.append(sampler.penalize(row) if params.penalized else row)
        return probabilities_for(torch.stack(rows), [params] * len(prefixes))

    first = next_probs([[]])[0]  # (V,)
    second = next_probs([[a] for a in range(VOCAB)])  # (V, V): [a, b]
    third = next_probs([[a, b] for a in range(VOCAB) for b in range(VOCAB)]).view(VOCAB, VOCAB, VOCAB)
    return torch.einsum("a,ab,abc->bc", first.double(), second.double(), third.double())


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test of counts against probabilities; cells expecting fewer than 5 are pooled into
    one. The p-value is the chi-square upper tail, Q(df/2, x/2) (the regularized upper incomplete gamma)."""
    n = counts.sum()
    expected = probs.flatten() * n
    counts = counts.flatten().double()
    small = expected < 5
    if small.any():
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
        counts = torch.cat([counts[~small], counts[small].sum()[None]])
    statistic = ((counts - expected) ** 2 / expected).sum()
    df = len(expected) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), statistic / 2))


@pytest.mark.parametrize("drafter, params", [
    ("other-model", SamplingParams(max_new_tokens=3, temperature=1.0, ignore_eos=True)),
    ("perturbed-copy", SamplingParams(max_new_tokens=3, temperature=0.8, top_k=6, presence_penalty=0.7,
                                      ignore_eos=True)),
    ("prompt-lookup", SamplingParams(max_new_tokens=3, temperature=1.0, top_p=0.9, ignore_eos=True)),
], ids=["other-model", "perturbed-copy-topk-penalty", "prompt-lookup-topp"])
def test_sampling_keeps_the_models_distribution(drafter, params):
    """Tokens 2 and 3 of 4000 seeded sequences (token 1 comes from the prefill; 2 and 3 from one speculative
    step: two drafts verified, or one rejected and redrawn, then the next step) against the exact distribution of
    the pair under the model alone: chi-square over the 64 pairs. A correct sampler fails this with probability
    1e-4 over the choice of seeds. Sabotaged, it fails: a rejection redrawn from p instead of norm(max(0, p - q))
    gave p-values of 1e-33, 1e-48 and 1e-102 on these cases; drafts kept with probability p(d) instead of
    p(d)/q(d) 1e-33 and 1e-50 (for prompt lookup, q one-hot, the two rules are the same)."""
    prompt = [1, 2, 3, 4, 2, 3, 4, 2, 3]
    if drafter == "prompt-lookup":  # a model that tends to continue the prompt's pattern
        target, options = bigram_model({2: 3, 3: 4, 4: 2}), dict(prompt_lookup=2)
    else:
        target = tiny_vocab_model(seed=0)
        draft = tiny_vocab_model(seed=3) if drafter == "other-model" else perturbed(target, 0.12)
        options = dict(draft=draft)
    trials = 4000
    engine = SpeculativeEngine(target, max_batch=1000, draft_tokens=2, **options)
    got = engine.generate([prompt] * trials, [SamplingParams(**{**vars(params), "seed": s}) for s in range(trials)])
    counts = torch.zeros(VOCAB, VOCAB)
    for completion in got:
        counts[completion.token_ids[1], completion.token_ids[2]] += 1
    rate = engine.speculation.acceptance_rate
    assert 0.15 < rate < 0.85  # drafts kept and rejected alike: both branches are in the distribution
    assert chi_square_p_value(counts, exact_pair_distribution(target, prompt, params)) > 1e-4


def test_rejection_sampling_first_token_follows_the_target():
    """rejection_sample on hand-made distributions: the first token returned is distributed as p_1 whatever q
    is (q that misses p's support, q one-hot), and all drafts are kept when q == p."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(3, VOCAB, generator=g) * 1.5, dim=-1)  # p_1, p_2, p_3
    q = torch.softmax(torch.randn(2, VOCAB, generator=g) * 1.5, dim=-1)
    q[0, 0], q[0, 1] = 0.0, q[0, 1] + q[0, 0]  # token 0 can never be drafted first
    q = q / q.sum(-1, keepdim=True)
    trials, counts, one_hot_counts = 20000, torch.zeros(VOCAB), torch.zeros(VOCAB)
    for _ in range(trials):
        drafts = torch.multinomial(q, 1, generator=g).flatten().tolist()
        counts[rejection_sample(p, drafts, q, g)[0]] += 1
        one_hot_counts[rejection_sample(p, [3, 4], None, g)[0]] += 1
    assert chi_square_p_value(counts, p[0]) > 1e-4
    assert chi_square_p_value(one_hot_counts, p[0]) > 1e-4
    assert rejection_sample(p[:3], [5, 6], p[:2], g)[:2] == [5, 6]  # p/q = 1: always kept


def test_greedy_accept_and_prompt_lookup_by_definition():
    assert greedy_accept([4, 5, 6], [4, 5]) == [4, 5, 6]  # both kept, then the choice after them
    assert greedy_accept([4, 9, 6], [4, 5]) == [4, 9]  # the second differs: the model's choice there
    assert greedy_accept([9], []) == [9]
    ids = [1, 2, 3, 9, 5, 2, 3, 4, 1, 2, 3]
    assert lookup_continuation(ids, 3, 2) == [9, 5]  # the longest suffix found ("1 2 3", at 0) beats a recent one
    assert lookup_continuation(ids, 2, 2) == [4, 1]  # "2 3": its most recent earlier occurrence (at 5)
    assert lookup_continuation(ids, 1, 3) == [4, 1, 2]  # "3" most recently at 6
    assert lookup_continuation([1, 2, 3, 4], 2, 2) == []  # no repeat
    assert lookup_continuation([7, 7, 7], 2, 4) == [7]  # "7 7" at 0 is followed by one 7 before the end


# --------------------------------------------------------------------------------------------------------------
# Seeds, stop strings, stop ids, lengths, streaming
# --------------------------------------------------------------------------------------------------------------
def test_same_seed_same_text_alone_and_in_a_busy_batch(bpe):
    target = small_model()
    draft = perturbed(target, 0.005)
    prompt = "Hello, the llama"
    params = SamplingParams(max_new_tokens=25, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True, logprobs=1)
    engine = lambda batch: SpeculativeEngine(target, bpe, draft=draft, draft_tokens=3, max_batch=batch,
                                             prefill_chunk=4)
    by_itself = engine(1).generate([prompt], params)[0]
    others = [SamplingParams(max_new_tokens=n, temperature=1.2, seed=n, ignore_eos=True) for n in (5, 30, 12)]
    busy = engine(4).generate(["the end", "more words", prompt, "a"], [others[0], others[1], params, others[2]])
    assert_same(busy[2], by_itself)
    assert by_itself.speculation.accepted_tokens > 0
    reseeded = engine(1).generate([prompt], SamplingParams(**{**vars(params), "seed": 99}))[0]
    assert reseeded.token_ids != by_itself.token_ids


class ScriptedEverywhere(torch.nn.Module):
    """A model that predicts the next token of `script` at every position it is asked about (several per row in
    a verification forward). A real model runs underneath, so the caches move as for any model."""

    def __init__(self, inner, script: list[int]) -> None:
        super().__init__()
        self.inner, self.cfg, self.script = inner, inner.cfg, script
        self.tok_embeddings = inner.tok_embeddings

    def forward(self, tokens, targets=None, cache=None, positions=None, logits_index=None):
        if positions is None:
            positions = cache.lengths[:, None] + torch.arange(tokens.shape[1])
        logits = self.inner(tokens, cache=cache, positions=positions, logits_index=logits_index)
        if isinstance(logits_index, int):
            positions = positions[:, logits_index:][:, :1]
        elif logits_index is not None:
            positions = positions.gather(1, logits_index)
        following = torch.tensor(self.script)[(positions + 1).clamp(max=len(self.script) - 1)]  # (B, N)
        return torch.full_like(logits, -20.0).scatter(-1, following[..., None], 20.0)


@pytest.mark.parametrize("params", [
    dict(stop=("STOP",)), dict(stop=("a va?", "llama said")), dict(max_new_tokens=13), dict(stop_token_ids="6th"),
], ids=["stop-string", "two-stop-strings", "length", "stop-id"])
def test_stop_strings_ids_and_lengths_as_the_plain_engine(bpe, params):
    """A draft that is always right: each step accepts several tokens, which may run past a stop string, a stop
    id or max_new_tokens; the output is cut there exactly as the plain engine cuts it, and the streamed pieces
    never show a stop string."""
    script = bpe.encode(TEXT, bos=True)
    target = ScriptedEverywhere(small_model(), script)
    draft = ScriptedEverywhere(small_model(seed=9), script)
    if params.get("stop_token_ids") == "6th":
        params = dict(stop_token_ids=(script[3 + 6],))
    params = SamplingParams(**{"max_new_tokens": 100, "temperature": 0, "ignore_eos": True, **params})
    plain = Engine(target, bpe, max_batch=1).generate([script[:3]], params)[0]
    engine = SpeculativeEngine(target, bpe, draft=draft, draft_tokens=5, max_batch=1)
    pieces, completion = [], None
    for _, out in engine.stream([script[:3]], params):
        pieces.append(out.text)
        completion = out.completion or completion
        assert not any(s in "".join(pieces) for s in params.stop)
    assert_same(completion, plain)
    assert (completion.finish_reason, completion.stop_reason) == (plain.finish_reason, plain.stop_reason)
    assert "".join(pieces) == plain.text
    assert completion.speculation.tokens_per_step > 3  # several tokens per step did pass through the cut


# --------------------------------------------------------------------------------------------------------------
# Refused drafts and options
# --------------------------------------------------------------------------------------------------------------
def test_a_draft_that_does_not_fit_is_refused(bpe):
    target = small_model(vocab_size=bpe.vocab_size)
    other_bpe = train_bpe_from_texts(["quite another corpus of words, words and words " * 30], bpe.vocab_size)
    with pytest.raises(MinillamaError, match="vocabulary of 200 tokens, the model 300"):
        SpeculativeEngine(target, draft=small_model(vocab_size=200), max_batch=1)
    with pytest.raises(MinillamaError, match="another tokenizer"):
        SpeculativeEngine(target, bpe, draft=small_model(), draft_tokenizer=other_bpe, max_batch=1)
    short = small_model(max_seq_len=32)
    with pytest.raises(MinillamaError, match=r"context \(max_seq_len=32\) is shorter than the 96 positions"):
        SpeculativeEngine(target, draft=short, max_batch=1)
    assert SpeculativeEngine(target, draft=short, max_batch=1, max_len=32).max_len == 32  # covered: fine
    for options, message in [(dict(), "exactly one drafter"), (dict(draft=short, prompt_lookup=2), "exactly one"),
                             (dict(prompt_lookup=0), "must be an integer >= 1"),
                             (dict(prompt_lookup=2, draft_tokens=0), "--draft-tokens")]:
        with pytest.raises(MinillamaError, match=re.escape(message)):
            SpeculativeEngine(target, max_batch=1, **options)


# --------------------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, bpe):
    root = tmp_path_factory.mktemp("spec")
    target = small_model(vocab_size=bpe.vocab_size, max_seq_len=64)
    save(target, bpe, root / "target")
    save(perturbed(target, 0.005), bpe, root / "draft")
    other = train_bpe_from_texts(["quite another corpus of words, words and words " * 30], bpe.vocab_size)
    save(small_model(vocab_size=bpe.vocab_size, max_seq_len=64), other, root / "other-tokenizer")
    return root


@pytest.mark.parametrize("flags", [["--draft", "{root}/draft", "--draft-tokens", "3"], ["--prompt-lookup", "2"]],
                         ids=["draft", "prompt-lookup"])
def test_cli_speculative_json_equals_plain(checkpoints, capsys, flags):
    args = ["generate", "--checkpoint", str(checkpoints / "target"), "--prompt", "Hello", "--prompt", "the end the",
            "--max-new-tokens", "12", "--temperature", "0", "--json", "--dtype", "fp32"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(args + [f.format(root=checkpoints) for f in flags]) == 0
    speculative = json.loads(capsys.readouterr().out)
    for a, b in zip(speculative, plain):
        assert (a["token_ids"], a["text"]) == (b["token_ids"], b["text"])
        assert a["drafted_tokens"] >= a["accepted_tokens"] >= 0 and a["verify_steps"] >= 1
        assert a["acceptance_rate"] is None or 0 <= a["acceptance_rate"] <= 1
    assert "acceptance_rate" not in plain[0]


def test_cli_draft_with_another_tokenizer_is_one_line(checkpoints, capsys):
    code = main(["generate", "--checkpoint", str(checkpoints / "target"), "--draft",
                 str(checkpoints / "other-tokenizer"), "--prompt", "Hello"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and re.match(r"minillama: error: draft checkpoint .*other-tokenizer has another tokenizer",
                                        lines[0])
