"""The inference engine, sampling and streaming text: against Hugging Face's greedy `generate`, against full
recomputation, batched against alone (joins, leaves, cancels, chunked prefill, static cache), seeds, stop strings,
UTF-8 streaming, the exact effect of every sampling filter and penalty, and the CLI."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from test_checkpoint import CASES, random_model

from minillama import MinillamaError, ModelConfig, Transformer, save
from minillama.cli import main
from minillama.infer import Engine, SamplingParams
from minillama.infer.sampling import SequenceSampler, sample, token_probabilities
from minillama.infer.streaming import StopStrings, TextStream
from minillama.tokenizer import load_tokenizer, train_bpe_from_texts

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LLAMA2_MODEL = SHARED_DATA / "llama2-tokenizer.model"
TEXT = "Hello 🦙é wörld! A llama said: «ça va?» then STOP, and more after the end."


def small_model(vocab_size: int = 300, seed: int = 0, **fields) -> Transformer:
    """A 2-layer GQA model with Llama 3.1 RoPE scaling inside its context, weights spread enough that greedy
    decoding wanders over the vocabulary."""
    cfg = ModelConfig(**{**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size,
                                ffn_hidden_dim=96, max_seq_len=96,
                                rope_scaling=dict(factor=8.0, original_max_position_embeddings=16)), **fields})
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def prompts_of(lengths: list[int], vocab_size: int = 300, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab_size, (n - 1,), generator=g).tolist() for n in lengths]


def alone(model: Transformer, prompt, params: SamplingParams, tokenizer=None, **engine_options):
    return Engine(model, tokenizer, max_batch=1, **engine_options).generate([prompt], params)[0]


def assert_same(got, expected) -> None:
    """Identical tokens, text and finish; log-probabilities equal to fp32 rounding, same top-n tokens."""
    assert got.token_ids == expected.token_ids
    assert (got.text, got.finish_reason) == (expected.text, expected.finish_reason)
    if expected.logprobs is not None:
        torch.testing.assert_close(torch.tensor([lp.logprob for lp in got.logprobs]),
                                   torch.tensor([lp.logprob for lp in expected.logprobs]), rtol=1e-4, atol=1e-4)
        assert [[t for t, _ in lp.top] for lp in got.logprobs] == [[t for t, _ in lp.top] for lp in expected.logprobs]


@pytest.fixture(scope="module")
def bpe():
    """Our byte-level BPE (every byte a token, so characters split across tokens), trained in a blink."""
    return train_bpe_from_texts([TEXT * 20, "the end of a small corpus, with words and more words"], 300)


@pytest.fixture(scope="module", params=["bpe", "llama2"])
def tokenizer(request, bpe):
    """Both byte-fallback kinds: our byte-level BPE and Llama 2's SentencePiece (leading-space handling)."""
    if request.param == "bpe":
        return bpe
    if not LLAMA2_MODEL.is_file():
        pytest.skip(f"{LLAMA2_MODEL} not present")
    return load_tokenizer(LLAMA2_MODEL)


# --------------------------------------------------------------------------------------------------------------
# Exactness: against Hugging Face, against recomputation, batched against alone
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_transformers_generate(case):
    transformers = pytest.importorskip("transformers")
    from minillama.interop.hf import config_to_hf, hf_state_dict

    cfg = ModelConfig(**CASES[case])
    ours = random_model(cfg).eval()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{k: v for k, v in config_to_hf(cfg).items() if k != "architectures"})).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(ours), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.generation_config.eos_token_id = None  # run the full length, as ours with ignore_eos
    new = 40  # past original_max_position_embeddings=32 of the llama3.1 case: scaled frequencies matter
    prompts = prompts_of([3, 17, 30], cfg.vocab_size)
    ours_out = Engine(ours, max_batch=3).generate(
        prompts, SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True))
    for prompt, got in zip(prompts, ours_out):
        with torch.no_grad():
            expected = hf.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, pad_token_id=0)
        assert got.token_ids == expected[0, len(prompt):].tolist()


def test_cached_decoding_equals_full_recomputation():
    model = small_model()
    prompt = prompts_of([7])[0]
    got = alone(model, prompt, SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True, logprobs=3))
    sequence = list(prompt)
    for token, logprob in zip(got.token_ids, got.logprobs):
        with torch.no_grad():
            full = model(torch.tensor([sequence]))[0, -1].log_softmax(-1)  # no cache: every position recomputed
        assert token == int(full.argmax())
        assert math.isclose(logprob.logprob, float(full[token]), rel_tol=1e-4, abs_tol=1e-5)
        assert [t for t, _ in logprob.top] == full.topk(3).indices.tolist()
        sequence.append(token)
    assert len(got.token_ids) == 30 and got.finish_reason == "length"


@pytest.mark.parametrize("static", [False, True], ids=["span", "static-buckets"])
def test_batch_with_joins_leaves_and_cancel_equals_each_alone(static):
    """Five prompts of different lengths through four rows: two start, more join between steps (one while
    another prefills in chunks), they leave at different lengths (rows move), one is cancelled mid-way. Each
    finished sequence equals its prompt run alone; greedy and seeded sampling, penalties and logprobs mixed."""
    model = small_model()
    prompts = prompts_of([5, 23, 2, 11, 40])
    params = [
        SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True, logprobs=2),
        SamplingParams(max_new_tokens=30, temperature=0.9, top_k=50, seed=11, ignore_eos=True, logprobs=2),
        SamplingParams(max_new_tokens=20, temperature=0, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(max_new_tokens=25, temperature=1.1, top_p=0.9, min_p=0.05, frequency_penalty=0.5,
                       presence_penalty=0.3, seed=5, ignore_eos=True, logprobs=0),
        SamplingParams(max_new_tokens=9, temperature=0.7, seed=3, ignore_eos=True),
    ]
    expected = [alone(model, p, q) for p, q in zip(prompts, params)]
    engine = Engine(model, max_batch=4, prefill_chunk=8, static_cache=static)  # static: batch 3 padded to 4
    ids = [engine.add(prompts[0], params[0]), engine.add(prompts[1], params[1])]
    done, cancelled = {}, None
    for step in range(200):
        if step == 2:
            ids.append(engine.add(prompts[2], params[2]))
        if step == 4:
            ids += [engine.add(prompts[3], params[3]), engine.add(prompts[4], params[4])]
        if step == 9:
            cancelled = ids[2]
            before = engine.stats()
            assert engine.cancel(cancelled) and not engine.cancel(cancelled)
            after = engine.stats()
            assert after.free_rows == before.free_rows + 1  # the row is free at once, and its KV memory
            assert after.kv_tokens_in_use < before.kv_tokens_in_use
        for out in engine.step():
            assert out.seq_id != cancelled or step < 9
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


def test_cancel_while_streaming_ends_that_sequence_only():
    model = small_model()
    prompts = prompts_of([6, 9])
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    engine = Engine(model, max_batch=2)
    got: dict[int, list[int]] = {0: [], 1: []}
    for i, out in engine.stream(prompts, params):
        got[i] += out.token_ids
        if i == 1 and len(got[1]) == 3:
            engine.cancel(out.seq_id)
    assert len(got[1]) == 3 and got[0] == alone(model, prompts[0], params).token_ids
    assert not engine.has_work() and engine.stats().kv_tokens_in_use == 0


def test_chunked_prefill_equals_one_shot():
    model = small_model()
    prompts = prompts_of([60, 9, 33])
    params = SamplingParams(max_new_tokens=15, temperature=0, ignore_eos=True, logprobs=4)
    one_shot = Engine(model, max_batch=3, prefill_chunk=1000).generate(prompts, params)
    for chunk in (1, 7):
        chunked = Engine(model, max_batch=3, prefill_chunk=chunk).generate(prompts, params)
        for got, expected in zip(chunked, one_shot):
            assert_same(got, expected)


def test_a_long_prefill_does_not_stall_running_sequences():
    """While a 60-token prompt is prefilled 8 tokens a step, the running sequence gets a token every step."""
    model = small_model()
    short, long = prompts_of([4, 60])
    engine = Engine(model, max_batch=2, prefill_chunk=8)
    first = engine.add(short, SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True))
    engine.step()  # prefills the short prompt: its first token
    second = engine.add(long, SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True))
    for _ in range(7):  # 60 tokens in chunks of 8: 7 steps without a token for the long one
        outputs = {out.seq_id: out for out in engine.step()}
        assert len(outputs[first].token_ids) == 1 and second not in outputs
        assert engine.stats().prefilling == 1
    outputs = {out.seq_id: out for out in engine.step()}
    assert len(outputs[second].token_ids) == 1 and len(outputs[first].token_ids) == 1


def test_kv_memory_accounting_and_admission_budget():
    model = small_model()
    cfg = model.cfg
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4  # fp32 keys and values
    prompts = prompts_of([10, 6])
    params = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
    engine = Engine(model, max_batch=2, max_len=64, max_cached_tokens=15)  # room for one reservation of 15
    assert engine.stats().kv_bytes_allocated == 2 * 64 * per_token
    a, b = engine.add(prompts[0], params), engine.add(prompts[1], params)
    engine.step()
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.kv_tokens_reserved) == (1, 1, 15)  # b waits for the budget
    assert stats.kv_tokens_in_use == 10 and stats.kv_bytes_in_use == 10 * per_token
    engine.step()
    assert engine.stats().kv_tokens_in_use == 11  # the first generated token is now in the cache
    finished = [out.seq_id for out in engine.run() if out.completion is not None]
    assert finished == [a, b]  # b admitted only after a released its reservation
    with pytest.raises(MinillamaError, match="max_cached_tokens is 15"):
        engine.add(prompts[0], SamplingParams(max_new_tokens=6))


def test_context_full_finishes_with_length():
    model = small_model()
    got = Engine(model, max_batch=1, max_len=12).generate(
        [prompts_of([9])[0]], SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True))[0]
    assert len(got.token_ids) == 3 and got.finish_reason == "length"  # 9 + 3 = max_len
    with pytest.raises(MinillamaError, match="at most 11 prompt tokens"):
        Engine(model, max_batch=1, max_len=12).add(prompts_of([12])[0])


def test_eos_and_stop_token_ids_end_a_sequence_and_are_not_included():
    model = small_model()
    prompt = prompts_of([5])[0]
    free = alone(model, prompt, SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True))
    stop_at = free.token_ids[6]
    first = free.token_ids.index(stop_at)
    got = alone(model, prompt, SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True,
                                              stop_token_ids=(stop_at,)))
    assert got.token_ids == free.token_ids[:first] and (got.finish_reason, got.stop_reason) == ("stop", stop_at)
    same_weights = small_model(eos_id=stop_at)  # no tokenizer: the model config's EOS ends it
    eos = alone(same_weights, prompt, SamplingParams(max_new_tokens=20, temperature=0))
    assert eos.token_ids == free.token_ids[:first] and eos.stop_reason == stop_at


# --------------------------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------------------------
def test_same_seed_same_text_alone_and_in_a_busy_batch(bpe):
    model = small_model()
    prompt = "Hello, the llama"
    params = SamplingParams(max_new_tokens=25, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    by_itself = alone(model, prompt, params, bpe)
    others = [SamplingParams(max_new_tokens=n, temperature=1.2, seed=n, ignore_eos=True) for n in (5, 30, 12)]
    engine = Engine(model, bpe, max_batch=4, prefill_chunk=4)
    busy = engine.generate(["the end", "more words", prompt, "a"], [others[0], others[1], params, others[2]])
    assert_same(busy[2], by_itself)
    assert by_itself.seed == 1234
    reseeded = alone(model, prompt, SamplingParams(**{**vars(params), "seed": 99}), bpe)
    assert reseeded.token_ids != by_itself.token_ids


def test_seedless_requests_leave_the_global_rng_alone(bpe):
    model = small_model()
    state = torch.random.get_rng_state()
    params = SamplingParams(max_new_tokens=10, temperature=1.0, ignore_eos=True)
    a, b = Engine(model, bpe, max_batch=2).generate(["Hello", "Hello"], params)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.seed != b.seed  # each drew its own fresh seed
    again = alone(model, "Hello", SamplingParams(**{**vars(params), "seed": a.seed}), bpe)
    assert again.token_ids == a.token_ids  # the reported seed reproduces the sequence


# --------------------------------------------------------------------------------------------------------------
# Text: streaming, UTF-8, stop strings
# --------------------------------------------------------------------------------------------------------------
class Scripted(torch.nn.Module):
    """A model that predicts the next token of `script` at every position. A real model runs underneath, so the
    engine's cache moves exactly as it does for any model; only the logits are replaced."""

    def __init__(self, inner: Transformer, script: list[int]) -> None:
        super().__init__()
        self.inner, self.cfg, self.script = inner, inner.cfg, script
        self.tok_embeddings = inner.tok_embeddings

    def forward(self, tokens, targets=None, cache=None, positions=None, logits_index=None):
        logits = self.inner(tokens, cache=cache, positions=positions, logits_index=logits_index)
        following = [self.script[min(p, len(self.script) - 1)] for p in cache.lengths.tolist()]
        out = torch.full_like(logits, -20.0)
        out[torch.arange(len(following)), -1, following] = 20.0
        return out


def scripted_run(tokenizer, text: str, prompt_text: str = "Hello", **params):
    """Stream `text` after the prompt `prompt_text` (its first tokens) through the engine: (pieces, expected)."""
    script = tokenizer.encode(text, bos=True)
    prompt_tokens = next(n for n in range(len(script)) if tokenizer.decode(script[:n]) == prompt_text)
    model = Scripted(small_model(vocab_size=max(300, tokenizer.vocab_size), max_seq_len=128), script)
    engine = Engine(model, tokenizer, max_batch=2)
    params = SamplingParams(**{"max_new_tokens": len(script) - prompt_tokens, "temperature": 0, **params})
    pieces = [out.text for _, out in engine.stream([script[:prompt_tokens]], params)]
    expected = tokenizer.decode(script)[len(tokenizer.decode(script[:prompt_tokens])):]
    return pieces, expected


def test_streaming_never_splits_a_utf8_character(tokenizer):
    pieces, expected = scripted_run(tokenizer, TEXT, ignore_eos=True)
    assert "".join(pieces) == expected  # the leading space of the continuation included
    assert expected.startswith(" 🦙é") and all("\ufffd" not in piece for piece in pieces)
    assert sum(1 for piece in pieces if piece) > 10  # streamed in many pieces, not all at the end


@pytest.mark.parametrize("stop, cut_before", [
    (("STOP",), "STOP"),
    (("a va?",), "a va?"),  # after "ç", inside a word, across tokens
    (("llama said", "wörld"), "wörld"),  # several: the earliest wins
    (("🦙é w",), "🦙é w"),  # a multi-byte character at the start of the text
    ((" 🦙",), " 🦙"),  # matches at the very start: empty text
])
def test_stop_strings_end_the_text_and_never_leak(tokenizer, stop, cut_before):
    pieces, full = scripted_run(tokenizer, TEXT, stop=stop, ignore_eos=True)
    text = "".join(pieces)
    assert text == full[:full.index(cut_before)]
    for i in range(len(pieces)):  # at no point has any stop string (or a character's half) been shown
        shown = "".join(pieces[:i + 1])
        assert not any(s in shown for s in stop) and "\ufffd" not in shown


def test_stop_string_result_in_the_completion(bpe):
    script = bpe.encode(TEXT, bos=True)
    model = Scripted(small_model(), script)
    got = Engine(model, bpe, max_batch=1).generate([script[:3]], SamplingParams(
        max_new_tokens=100, temperature=0, stop=("STOP",), ignore_eos=True))[0]
    assert (got.finish_reason, got.stop_reason) == ("stop", "STOP")
    assert bpe.decode(script[:3] + got.token_ids).endswith("STOP")  # the tokens up to the stop string are kept
    assert "STOP" not in got.text


def test_stop_strings_hold_back_only_possible_starts():
    stops = StopStrings(["abc", "xyz"])
    assert stops.push("hello a") == "hello "  # "a" may start "abc"
    assert stops.push("b") == ""  # "ab" still may
    assert stops.push("d x") == "abd "  # "abd" cannot; "x" may start "xyz"
    assert stops.push("yz tail") == "" and stops.matched == "xyz"
    assert stops.flush() == "" and stops.push("more") == ""
    unmatched = StopStrings(["abc"])
    assert unmatched.push("zzab") == "zz" and unmatched.flush() == "ab"


def test_text_stream_flushes_an_incomplete_character_at_the_end(bpe):
    ids = bpe.encode("ж", bos=False)  # not in the BPE's training text
    assert len(ids) == 2  # two bytes, two tokens
    stream = TextStream(bpe, [], ())
    assert stream.push(ids[:1]) == ("", False)
    assert stream.finish() == "\ufffd"  # the sequence ended mid-character: what it decodes to is given


# --------------------------------------------------------------------------------------------------------------
# Sampling: each filter and penalty by its definition, on hand-made logits
# --------------------------------------------------------------------------------------------------------------
PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def probabilities(temperature=1.0, top_k=4, top_p=1.0, min_p=0.0, logits=None):
    logits = PROBS.log() if logits is None else logits
    return token_probabilities(logits[None], torch.tensor([temperature]), torch.tensor([top_k]),
                               torch.tensor([top_p]), torch.tensor([min_p]))[0]


def test_temperature_top_k_top_p_min_p_by_definition():
    torch.testing.assert_close(probabilities(), PROBS)
    squared = PROBS ** 2  # temperature 0.5: p^(1/T), renormalised
    torch.testing.assert_close(probabilities(temperature=0.5), squared / squared.sum())
    torch.testing.assert_close(probabilities(top_k=2), torch.tensor([0.625, 0.375, 0, 0]))
    # top_p 0.7: 0.5 alone is short of 0.7, 0.5 + 0.3 reaches it; the rest goes.
    torch.testing.assert_close(probabilities(top_p=0.7), torch.tensor([0.625, 0.375, 0, 0]))
    torch.testing.assert_close(probabilities(top_p=0.4), torch.tensor([1.0, 0, 0, 0]))  # the top token stays
    torch.testing.assert_close(probabilities(top_p=0.9), torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95)
    # min_p 0.2: below 0.2 x 0.5 = 0.1 goes.
    torch.testing.assert_close(probabilities(min_p=0.2), torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95)
    torch.testing.assert_close(probabilities(min_p=0.7), torch.tensor([1.0, 0, 0, 0]))
    # In order: top-k 3 first (drops 0.05), then top-p 0.6 of what is left (0.5/0.95 < 0.6 <= 0.8/0.95).
    torch.testing.assert_close(probabilities(top_k=3, top_p=0.6), torch.tensor([0.625, 0.375, 0, 0]))


def test_rows_keep_their_own_settings():
    logits = PROBS.log().expand(3, 4)
    probs = token_probabilities(logits, torch.tensor([1.0, 1.0, 1.0]), torch.tensor([4, 1, 4]),
                                torch.tensor([1.0, 1.0, 0.7]), torch.tensor([0.0, 0.0, 0.0]))
    torch.testing.assert_close(probs, torch.stack([PROBS, torch.tensor([1.0, 0, 0, 0]),
                                                   torch.tensor([0.625, 0.375, 0, 0])]))


def test_penalties_by_definition():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])
    # Repetition (CTRL/HF): seen tokens (prompt 0, output 1 and 2) divided if positive, multiplied if negative.
    rep = SequenceSampler(SamplingParams(repetition_penalty=2.0), 5, prompt_ids=[0])
    for t in (1, 2, 1):
        rep.observe(t)
    torch.testing.assert_close(rep.penalize(logits), torch.tensor([1.0, -2.0, 0.25, 3.0, -2.0]))
    # Frequency and presence (OpenAI): minus count x 0.5 and minus 0.25 once present, output tokens only.
    fp = SequenceSampler(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), 5, prompt_ids=[0])
    for t in (1, 2, 1):
        fp.observe(t)
    torch.testing.assert_close(fp.penalize(logits), torch.tensor([2.0, -1.0 - 1.0 - 0.25, 0.5 - 0.5 - 0.25,
                                                                  3.0, -2.0]))


def test_greedy_is_exactly_argmax_after_penalties():
    logits = torch.tensor([[1.0, 3.0, 2.9, -1.0]])
    plain = SequenceSampler(SamplingParams(temperature=0), 4)
    assert sample(logits, [plain])[0] == [1]
    penalized = SequenceSampler(SamplingParams(temperature=0, repetition_penalty=1.1), 4, prompt_ids=[1])
    assert sample(logits, [penalized])[0] == [2]  # 3.0 / 1.1 < 2.9


def test_draws_follow_the_distribution_and_never_pick_zero_mass():
    sampler = SequenceSampler(SamplingParams(temperature=1.0, top_k=3, seed=0), 4)
    logits = PROBS.log()[None]
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[sample(logits, [sampler])[0][0]] += 1
    expected = torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95
    assert counts[3] == 0
    torch.testing.assert_close(counts / counts.sum(), expected, atol=0.03, rtol=0)


def test_logprobs_are_the_models_before_processing():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    sampler = SequenceSampler(SamplingParams(temperature=0.3, top_k=1, logprobs=2, seed=0), 4)
    tokens, logprobs = sample(logits, [sampler])
    expected = logits[0].log_softmax(-1)
    assert tokens == [1] and logprobs[0].token_id == 1
    assert math.isclose(logprobs[0].logprob, float(expected[1]), rel_tol=1e-6)
    assert [t for t, _ in logprobs[0].top] == [1, 2]
    assert math.isclose(logprobs[0].top[1][1], float(expected[2]), rel_tol=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -0.1, "temperature must be a number >= 0"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
    ("top_p", 1.5, r"top_p must be in \(0, 1\]"),
    ("min_p", -0.1, r"min_p must be in \[0, 1\]"),
    ("top_k", 0, "top_k must be an integer >= 1"),
    ("max_new_tokens", 0, "max_new_tokens must be an integer >= 1"),
    ("repetition_penalty", 0.0, "repetition_penalty must be a number > 0"),
    ("frequency_penalty", 2.5, r"frequency_penalty must be in \[-2, 2\]"),
    ("presence_penalty", float("nan"), r"presence_penalty must be in \[-2, 2\]"),
    ("stop", ("",), "stop must be non-empty strings"),
    ("seed", -1, "seed must be an integer"),
    ("logprobs", 21, "logprobs must be None or an integer in"),
])
def test_bad_sampling_parameters_name_the_field(field, value, message):
    with pytest.raises(MinillamaError, match=message):
        SamplingParams(**{field: value})


# --------------------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, bpe):
    directory = tmp_path_factory.mktemp("ck") / "ck"
    save(small_model(vocab_size=bpe.vocab_size, max_seq_len=64), bpe, directory)
    return directory


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "temperature must be a number >= 0"),
    (["--top-p", "0"], r"top_p must be in \(0, 1\]"),
    (["--top-p", "1.01"], r"top_p must be in \(0, 1\]"),
    (["--min-p", "1.5"], r"min_p must be in \[0, 1\]"),
    (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
    (["--max-new-tokens", "-3"], "max_new_tokens must be an integer >= 1"),
    (["--top-k", "-2"], "top_k must be an integer >= 1"),
    (["--repetition-penalty", "0"], "repetition_penalty must be a number > 0"),
    (["--prompt", "word " * 80], "the model's context is 64"),
    (["--stop", ""], "stop must be non-empty strings"),
    (["--prompt-file", "/nonexistent/prompts.txt"], "cannot read prompt file"),
    (["--stream", "--json"], "exclude each other"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
])
def test_cli_bad_values_exit_2_with_one_line(checkpoint, capsys, flags, message):
    import re

    assert main(["generate", "--checkpoint", str(checkpoint), *flags]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minillama: error: ") and re.search(message, lines[0])
    assert captured.out == ""


def test_cli_json_batch_of_prompts(checkpoint, tmp_path, capsys, bpe):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("the end\n\nmore words\n", encoding="utf-8")
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "Hello", "--prompt-file",
                 str(prompt_file), "--max-new-tokens", "8", "--temperature", "0", "--json", "--dtype", "fp32"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["prompt"] for r in records] == ["Hello", "the end", "more words"]
    keys = {"prompt", "text", "token_ids", "prompt_tokens", "completion_tokens", "finish_reason", "stop_reason",
            "seed", "time_to_first_token_s", "decode_tokens_per_s", "total_s"}
    model, _ = load_checkpoint(checkpoint)
    expected = Engine(model, bpe, max_batch=1).generate(
        ["Hello", "the end", "more words"], SamplingParams(max_new_tokens=8, temperature=0))
    for record, completion in zip(records, expected):
        assert set(record) == keys and record["time_to_first_token_s"] > 0
        assert record["token_ids"] == completion.token_ids  # batched in the CLI, alone here
        ids = bpe.encode(record["prompt"], bos=True)
        assert record["text"] == bpe.decode(ids + record["token_ids"])[len(bpe.decode(ids)):]


def test_cli_prints_prompt_and_completion_and_streams_the_same(checkpoint, capsys):
    args = ["generate", "--checkpoint", str(checkpoint), "--prompt", "Hello", "--prompt", "the end",
            "--max-new-tokens", "10", "--seed", "7", "--stop", "e"]
    assert main(args + ["--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed == "".join(r["prompt"] + r["text"] + "\n" for r in records)
    assert main(args + ["--stream"]) == 0
    assert capsys.readouterr().out == printed


def load_checkpoint(directory):
    from minillama.checkpoint import load

    return load(directory)


@contextlib.contextmanager
def autotune_failures():
    """Compile afresh (no cached graphs or autotuning results) and collect the errors inductor logs while it
    autotunes: each is a kernel choice that failed, and pages of C++ errors on the user's terminal."""

    class Failures(logging.Handler):
        def __init__(self):
            super().__init__(logging.ERROR)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage()[:300])

    handler, log = Failures(), logging.getLogger("torch._inductor.select_algorithm")
    log.addHandler(handler)
    try:
        with torch._inductor.config.patch(fx_graph_cache=False, autotune_local_cache=False):
            yield handler.messages
    finally:
        log.removeHandler(handler)


@pytest.mark.slow
def test_compiled_static_decode_equals_eager():
    """compile=True (what runs on CUDA, as CUDA graphs there): torch.compile'd decode over a static cache, batch
    sizes padded to buckets, gives the eager engine's tokens. Slow (compilation): `pytest -m slow`."""
    model = small_model()
    prompts = prompts_of([5, 23, 2])
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True, logprobs=2)
    eager = Engine(model, max_batch=4).generate(prompts, params)
    compiled = Engine(model, max_batch=4, compile=True).generate(prompts, params)
    for got, expected in zip(compiled, eager):
        assert_same(got, expected)


@pytest.mark.slow
def test_compiled_cpu_decode_step_runs_with_prepacked_weights():
    """On CPU the compiled decode step is frozen and its matmuls autotuned: they run on weights prepacked for
    oneDNN/MKL or in inductor's generated GEMM kernels (blocked weights), not through aten::mm
    (torch.compile's options={"freezing": True} alone left aten::mm in the graph). Slow: `pytest -m slow`."""
    from torch._dynamo.utils import counters
    from torch.profiler import profile

    counters.clear()
    engine = Engine(small_model(), max_batch=1, compile=True)
    params = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    with torch._inductor.config.patch(fx_graph_cache=False, autotune_local_cache=False):  # compiled here, afresh
        engine.generate(prompts_of([5]), params)
    assert counters["inductor"]["select_algorithm_autotune"] > 0, dict(counters["inductor"])
    with profile() as prof:
        engine.generate(prompts_of([5]), params)
    with_weights = {event.key for event in prof.key_averages()}
    packed = {"mkldnn::_linear_pointwise", "mkl::_mkl_linear"} & with_weights
    generated = counters["inductor"]["cpp_templated_kernel_counter"]
    assert packed or generated, (sorted(with_weights), dict(counters["inductor"]))
    # The prompt's prefill is eager: one forward, 7 projections a layer and the head. The 3 decode steps add none.
    mm_calls = sum(e.count for e in prof.key_averages() if e.key == "aten::mm")
    assert mm_calls == 7 * engine.model.cfg.n_layers + 1, mm_calls


@pytest.mark.slow
def test_compiled_warm_up_leaves_nothing_to_compile_under_load():
    """`warm_up()` compiles every batch bucket's decode step (the span a dynamic dimension), so rows joining and
    leaving at any length compile nothing more, and the output equals the eager engine's. No kernel that inductor
    tries while autotuning fails to compile (in fp32 its batched-matmul template did, for the attention of every
    bucket of two rows or more, and printed pages of C++ errors). Slow: `pytest -m slow`."""
    from torch._dynamo.utils import counters

    model = small_model()
    assert model.norm.weight.dtype == torch.float32
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    prompts = prompts_of([3, 9, 5, 14, 7])
    engine = Engine(model, max_batch=4, compile=True)
    with autotune_failures() as failures:
        engine.warm_up()
    assert not failures, failures
    compiled = counters["stats"]["unique_graphs"]
    got = engine.generate(prompts, params)
    assert counters["stats"]["unique_graphs"] == compiled
    want = Engine(model, max_batch=4).generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


@pytest.mark.slow
def test_two_compiled_engines_over_one_model_keep_their_own_graphs():
    """A compiled CPU graph holds its engine's cache as constants; a second compiled engine over the same model in
    the same process must compile its own (it took the first's: index out of bounds, or tokens decoded from the
    first engine's cache). Slow: `pytest -m slow`."""
    model = small_model()
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    first, second = prompts_of([4, 9]), prompts_of([7, 3], seed=2)
    want = Engine(model, max_batch=2).generate(first + second, params)
    one = Engine(model, max_batch=2, compile=True)
    two = Engine(model, max_batch=2, max_len=48, compile=True)
    got = one.generate(first, params) + two.generate(second, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.token_ids for c in one.generate(second, params)] == [c.token_ids for c in want[2:]]


@pytest.mark.slow
def test_warmed_up_engines_keep_their_tokens_with_only_the_telling_guards_checked():
    """After warm_up() a compiled engine's decode calls check only the guards that tell its graphs apart
    (CacheForward._run). Two warmed engines over one model, with other buckets and cache sizes, interleaved, each give
    the eager engine's tokens as rows join and leave, also after the other added graphs to the same code's cache.
    Slow: `pytest -m slow`."""
    model = small_model()
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    prompts = prompts_of([3, 9, 5, 14, 7])
    want = [c.token_ids for c in Engine(model, max_batch=4).generate(prompts, params)]
    one = Engine(model, max_batch=4, compile=True)
    one.warm_up()
    assert [c.token_ids for c in one.generate(prompts, params)] == want
    two = Engine(model, max_batch=2, max_len=48, compile=True)  # not warmed up: every guard checked
    assert [c.token_ids for c in two.generate(prompts[:3], params)] == want[:3]
    assert [c.token_ids for c in one.generate(prompts[2:], params)] == want[2:]
    two.warm_up()
    assert [c.token_ids for c in two.generate(prompts[1:], params)] == want[1:]
    assert [c.token_ids for c in one.generate(prompts, params)] == want


@pytest.mark.slow
def test_warmed_up_engine_decodes_to_the_end_of_its_context():
    """Rows that run to max_len (the span then the whole cache) after warm_up() decode as the eager engine does.
    Slow: `pytest -m slow`."""
    from torch._dynamo.utils import counters

    model = small_model()
    params = SamplingParams(max_new_tokens=64, temperature=0, ignore_eos=True)
    prompts = prompts_of([3, 9, 5])
    want = [c.token_ids for c in Engine(model, max_batch=2, max_len=20).generate(prompts, params)]
    engine = Engine(model, max_batch=2, max_len=20, compile=True)
    engine.warm_up()
    compiled = counters["stats"]["unique_graphs"]
    got = engine.generate(prompts, params)
    assert [c.token_ids for c in got] == want and {c.finish_reason for c in got} == {"length"}
    assert counters["stats"]["unique_graphs"] == compiled


@pytest.mark.slow
def test_a_warmed_up_engine_that_meets_a_new_graph_goes_back_to_every_guard():
    """Should a decode step need a graph after warm_up() (here: dynamo's caches were reset), dynamo refuses under
    the skip-guards stance before running anything; the engine warns once, checks every guard from then on, and
    decodes the eager engine's tokens. Slow: `pytest -m slow`."""
    model = small_model()
    params = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
    prompts = prompts_of([3, 9, 5])
    want = [c.token_ids for c in Engine(model, max_batch=2).generate(prompts, params)]
    engine = Engine(model, max_batch=2, compile=True)
    engine.warm_up()
    torch._dynamo.reset()
    with pytest.warns(RuntimeWarning, match="checks every guard from now on"):
        got = engine.generate(prompts, params)
    assert [c.token_ids for c in got] == want


@pytest.mark.slow
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_compiled_quantized_decode_equals_eager(method):
    """A quantized model's compiled CPU decode step (inductor's own int8 kernel, torch's int4 one as an external
    call) gives the eager quantized engine's tokens. Slow (compilation): `pytest -m slow`."""
    from minillama.quantize import quantize

    model = quantize(small_model(vocab_size=320), method)
    prompts = prompts_of([5, 23, 2])
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    eager = Engine(model, max_batch=4).generate(prompts, params)
    engine = Engine(model, max_batch=4, compile=True)
    engine.warm_up()
    for got, expected in zip(engine.generate(prompts, params), eager):
        assert got.token_ids == expected.token_ids
