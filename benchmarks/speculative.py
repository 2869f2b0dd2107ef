"""Speculative decoding on a CPU: acceptance rate and speed-up of a draft/target pair trained with the Shakespeare
recipe, and of prompt lookup, against plain greedy decoding of the target; and whether the text is identical.

    python benchmarks/speculative.py                              # trains the pair (cached), then measures
    python benchmarks/speculative.py --target T --draft D --distilled-draft E   # checkpoints with one tokenizer
    python benchmarks/speculative.py --target-budget-s 60 --draft-budget-s 30 --new-tokens 48 --rounds 1 --ks 2,4 \
        --distill-prompts 64 --compiled-ks ""                     # a quick check that it runs (numbers mean little)

The pair. Both are trained by `minillama train`'s trainer on configs/shakespeare.toml (tinyshakespeare, a BPE of
1024 tokens trained on it), each for a wall-clock budget, cached under --work:
- target: the recipe with the 15m preset's shape (dim 384, 8 layers, 6 heads, 2 KV heads, SwiGLU 1024; 13.4M
  parameters with this vocabulary), trained for --target-budget-s (default 1200 s);
- draft: dim 128, 2 layers, 4 heads, 2 KV heads, SwiGLU 384 (0.5M), trained on the target's tokenizer
  (`[tokenizer] path` = the target checkpoint) for --draft-budget-s (default 300 s), run in fp32 (a model this
  small is bound by per-operation overhead on a CPU, where bf16 costs more: 0.9 vs 2.5 ms per token, measured once).
- distilled draft (sequence-level distillation: Kim and Rush 2016; for speculative decoding, DistillSpec, Zhou et
  al. 2023): the draft's shape and budget, trained on the text plus what the target writes, its greedy
  continuations of --distill-prompts scene openings from the training nine tenths (--distill-new-tokens each;
  the batched Engine writes them, cached). Both files are sources of the recipe's mixture, weighted by size.
  --distill-prompts 0 leaves it out.
The acceptance rate is how often the draft's greedy choice is the target's, so it needs a target that has learnt
the text: the target trained for 240 s (144 steps, 4.49 nats/token on validation, top-1 accuracy 11%) agreed with
the draft on 37% of the tokens of real text, too few for any speed-up (benchmarks/RESULTS.md has the numbers).
Why these shapes: speculation pays when one forward of the target over k + 1 tokens costs about what one token
costs and the draft is much cheaper. Measured once on the development machine (2 shared cores of an AMD EPYC with
AVX512-BF16, one thread, random weights, context 100, bf16, noisy): the 15m shape takes ~8-11 ms per forward for 1
to 7 tokens alike, the dim-128 2-layer draft ~0.7-1.1 ms, the recipe's own shape (dim 256, 6 layers) ~3 ms, so
with the recipe's shape as target four draft forwards would cost more than the target forward they save. In fp32
the 15m shape's 5-token forward costs ~2x its 1-token one, so bf16 (this machine's default) is where it pays. In
bf16, though, a (k + 1)-token forward rounds the logits differently from a 1-token one, so where the top two are
within bf16's rounding the greedy choice can differ from plain decoding's (`identical_text` counts the prompts
whose tokens equal plain decoding's; in fp32 all of them are).

What is measured: for each prompt (opening lines of scenes in the validation tenth of the text), greedy decoding of
--new-tokens tokens (EOS ignored), one sequence at a time, by the plain Engine, the SpeculativeEngine with each draft
(the draft, the distilled draft) for each k in --ks, and with prompt lookup (n-grams up to --lookup-ngram, k =
--lookup-k), all eager; and compiled (`compile=True`, warmed up before the rounds): the plain Engine
(--no-compiled-plain leaves it out) and the SpeculativeEngine with each draft for each k in --compiled-ks and with
prompt lookup (--compiled-ks "" leaves them out). Rounds interleave the contestants in a rotating order so that
other processes' noise hits all alike. Per contestant: decode ms per token (wall clock after the first token, median
over prompts and rounds), CPU ms per generated token (the process's CPU time for the whole call; less disturbed by
other processes on a shared machine), the acceptance rate and tokens per target forward, the speed-up against eager
plain decoding on both and against compiled plain decoding (wall clock), and whether every prompt's tokens equal
plain decoding's. Results: a table and JSON (default benchmarks/results/speculative.json).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

TARGET_SHAPE = dict(dim=384, n_layers=8, n_heads=6, n_kv_heads=2, ffn_hidden_dim=1024)  # the 15m preset's
DRAFT_SHAPE = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=384)


def train_cached(name: str, shape: dict, budget_s: float, data: list[str], work: Path, tokenizer: Path | None
                 ) -> Path:
    """The newest checkpoint of work/NAME-dDIM-lLAYERS-BUDGETs, trained first if there is none (the recipe with
    `shape`, for budget_s, on the text files `data`: one source each, weighted by their sizes)."""
    from minillama.train import load_run_config, train
    from minillama.train.checkpointing import latest_checkpoint
    from minillama.train.config import CONFIG_DIR

    out = work / f"{name}-d{shape['dim']}-l{shape['n_layers']}-{budget_s:g}s"
    done = latest_checkpoint(out) if out.is_dir() else None
    if done is not None:
        print(f"{name}: cached {done}", flush=True)
        return done
    overrides = [f"model.{key}={value}" for key, value in shape.items()] + [
        f"train.time_budget_s={budget_s}", "train.max_steps=100000", "train.save_every=100000",
        "train.eval_every=100000", "train.sample_tokens=0"]
    if tokenizer is not None:
        overrides.append(f"tokenizer.path={tokenizer}")
    run = load_run_config(CONFIG_DIR / "shakespeare.toml", overrides, data_paths=data)
    print(f"{name}: training for {budget_s:.0f} s ({shape})", flush=True)
    result = train(run, out, show_progress=False)
    print(f"{name}: step {result.step}, validation loss {result.val_loss}", flush=True)
    return result.checkpoint


def scene_prompts(text: str, count: int, split: str = "validation") -> list[str]:
    """The first two lines (speaker and line) of `count` scenes of dialogue, spread over the validation tenth
    (or over the training nine tenths: split="train")."""
    from minillama.data.prepare import split_tail

    train, val = split_tail(text, 0.1)
    part = val if split == "validation" else train
    blocks = [b.strip() for b in part.split("\n\n") if b.strip().count("\n") >= 1]
    step = max(1, len(blocks) // count)
    return ["\n".join(b.splitlines()[:2]) + "\n" for b in blocks[::step][:count]]


def distillation_text(target_path: Path, text: str, work: Path, prompts: int, new_tokens: int) -> Path:
    """What the target writes, as a text file for the draft to learn from (sequence-level distillation: Kim and
    Rush 2016; DistillSpec, Zhou et al. 2023, for speculative decoding): its greedy continuations of `prompts`
    scene openings from the training split (none from the validation tenth the measured prompts come from), by
    the batched Engine. Cached in work/."""
    import torch

    from minillama.files import atomic_write_text
    from minillama.infer import Engine, SamplingParams
    from minillama.infer.generate import load_for_inference

    out = work / f"distill-{target_path.parent.name}-{target_path.name}-{prompts}x{new_tokens}.txt"
    if out.exists():
        print(f"distillation text: cached {out}", flush=True)
        return out
    model, tokenizer = load_for_inference(target_path, device="cpu", dtype="fp32")
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    openings = scene_prompts(text, prompts, split="train")
    completions = Engine(model, tokenizer, max_batch=32).generate(
        openings,
        SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True))
    torch.set_num_threads(threads)
    tokens = sum(len(c.token_ids) for c in completions)
    print(f"distillation text: {len(completions)} greedy continuations, {tokens} tokens in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    atomic_write_text(out, "\n\n".join(o + c.text for o, c in zip(openings, completions)) + "\n")
    return out


def run_contestant(engine_factory, prompts: list[str], params) -> list[dict]:
    rows = []
    for prompt in prompts:
        engine = engine_factory()
        cpu = time.process_time()
        completion = engine.generate([prompt], params)[0]
        cpu = time.process_time() - cpu
        decode_s = completion.total_s - completion.time_to_first_token_s
        speculation = getattr(completion, "speculation", None)
        rows.append(dict(token_ids=completion.token_ids, decode_ms_per_token=1000 * decode_s /
                         max(1, len(completion.token_ids) - 1),
                         cpu_ms_per_token=1000 * cpu / len(completion.token_ids),
                         drafted=speculation.drafted_tokens if speculation else 0,
                         accepted=speculation.accepted_tokens if speculation else 0,
                         steps=speculation.verify_steps if speculation else len(completion.token_ids) - 1))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", default=str(DEFAULT_TEXT))
    parser.add_argument("--target", help="target checkpoint (default: train one, cached in --work)")
    parser.add_argument("--draft", help="draft checkpoint with the target's tokenizer (default: train one)")
    parser.add_argument("--target-budget-s", type=float, default=1200.0)
    parser.add_argument("--draft-budget-s", type=float, default=300.0)
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / "out" / "speculative"))
    parser.add_argument("--ks", default="2,3,4,5,6", help="draft tokens per step to try")
    parser.add_argument("--lookup-ngram", type=int, default=3)
    parser.add_argument("--lookup-k", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="the target's")
    parser.add_argument("--draft-dtype", default="fp32", choices=["auto", "fp32", "bf16"],
                        help="the draft's (default fp32: on a CPU a model this small is faster in fp32)")
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest on a busy machine (engine.py)")
    parser.add_argument("--compiled-plain", action=argparse.BooleanOptionalAction, default=True,
                        help="also plain decoding with the compiled step (`minillama generate --compile`; on by "
                             "default), the fastest plain decoding")
    parser.add_argument("--compiled-ks", default="2,3,4",
                        help="draft tokens per step to try compiled, and prompt lookup compiled at --lookup-k "
                             "(\"\": none)")
    parser.add_argument("--distill-prompts", type=int, default=2048,
                        help="also a distilled draft: the draft's shape trained on the text plus the target's greedy "
                             "continuations of this many openings from the training split (0: none)")
    parser.add_argument("--distill-new-tokens", type=int, default=200)
    parser.add_argument("--distilled-draft", help="a distilled draft checkpoint (default: train one, cached)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speculative.json"))
    args = parser.parse_args()

    import torch

    from minillama.files import atomic_write_json
    from minillama.infer import Engine, SamplingParams
    from minillama.infer.generate import load_for_inference
    from minillama.infer.speculative import SpeculativeEngine, load_draft

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    os.environ.setdefault("MINILLAMA_CACHE", str(work / "cache"))
    text = Path(args.text).read_text(encoding="utf-8")
    target_path = Path(args.target) if args.target else train_cached("target", TARGET_SHAPE, args.target_budget_s,
                                                                     [args.text], work, None)
    draft_path = Path(args.draft) if args.draft else train_cached("draft", DRAFT_SHAPE, args.draft_budget_s,
                                                                  [args.text], work, target_path)
    distilled_path = Path(args.distilled_draft) if args.distilled_draft else None
    if distilled_path is None and args.distill_prompts:
        corpus = distillation_text(target_path, text, work, args.distill_prompts, args.distill_new_tokens)
        distilled_path = train_cached(f"distilled{args.distill_prompts}", DRAFT_SHAPE, args.draft_budget_s,
                                      [args.text, str(corpus)], work, target_path)
    target, tokenizer = load_for_inference(target_path, device="cpu", dtype=args.dtype)
    drafts = {"draft": load_draft(draft_path, target, tokenizer, device="cpu", dtype=args.draft_dtype)}
    if distilled_path is not None:
        drafts["distilled"] = load_draft(distilled_path, target, tokenizer, device="cpu", dtype=args.draft_dtype)
    draft = drafts["draft"][0]
    dtype = str(target.tok_embeddings.weight.dtype).removeprefix("torch.")
    draft_dtype = str(draft.tok_embeddings.weight.dtype).removeprefix("torch.")
    prompts = scene_prompts(text, args.prompts)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)

    contestants = {"plain": lambda: Engine(target, tokenizer, max_batch=1)}
    if args.compiled_plain:  # one engine, compiled and warmed up once, reused for every prompt
        compiled = Engine(target, tokenizer, max_batch=1, compile=True)
        print(f"plain compiled: warm-up (compiling) took {compiled.warm_up():.0f} s", flush=True)
        contestants["plain compiled"] = lambda: compiled
    for k in [int(k) for k in args.ks.split(",") if k.strip()]:
        for kind, (model, model_tokenizer) in drafts.items():
            contestants[f"{kind} k={k}"] = (lambda k=k, model=model, model_tokenizer=model_tokenizer:
                                            SpeculativeEngine(target, tokenizer, draft=model,
                                                              draft_tokenizer=model_tokenizer, draft_tokens=k,
                                                              max_batch=1))
    contestants[f"lookup n<={args.lookup_ngram} k={args.lookup_k}"] = lambda: SpeculativeEngine(
        target, tokenizer, prompt_lookup=args.lookup_ngram, draft_tokens=args.lookup_k, max_batch=1)

    def compiled_engine(**options):  # compiled and warmed up once, reused for every prompt
        engine = SpeculativeEngine(target, tokenizer, max_batch=1, compile=True, **options)
        print(f"compiled speculation k={options.get('draft_tokens')}: warm-up took {engine.warm_up():.0f} s",
              flush=True)
        return lambda: engine

    compiled_ks = [int(k) for k in args.compiled_ks.split(",") if k.strip()]
    for k in compiled_ks:
        for kind, (model, model_tokenizer) in drafts.items():
            contestants[f"{kind} k={k} compiled"] = compiled_engine(draft=model, draft_tokenizer=model_tokenizer,
                                                                    draft_tokens=k)
    if compiled_ks:
        contestants[f"lookup n<={args.lookup_ngram} k={args.lookup_k} compiled"] = compiled_engine(
            prompt_lookup=args.lookup_ngram, draft_tokens=args.lookup_k)
    names = list(contestants)
    run_contestant(contestants["plain"], prompts[:1], SamplingParams(max_new_tokens=8, temperature=0))  # warm-up
    results: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            results[name] += run_contestant(contestants[name], prompts, params)
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    plain_ids = [row["token_ids"] for row in results["plain"][:len(prompts)]]
    plain_decode = statistics.median(row["decode_ms_per_token"] for row in results["plain"])
    plain_cpu = statistics.median(row["cpu_ms_per_token"] for row in results["plain"])
    compiled_decode = (statistics.median(row["decode_ms_per_token"] for row in results["plain compiled"])
                       if "plain compiled" in results else None)
    table = []
    for name in names:
        rows = results[name]
        decode = statistics.median(row["decode_ms_per_token"] for row in rows)
        cpu = statistics.median(row["cpu_ms_per_token"] for row in rows)
        drafted, accepted, steps = (sum(row[key] for row in rows) for key in ("drafted", "accepted", "steps"))
        same = sum(row["token_ids"] == plain_ids[i % len(prompts)] for i, row in enumerate(rows))
        table.append(dict(contestant=name, decode_ms_per_token=round(decode, 2), cpu_ms_per_token=round(cpu, 2),
                          speedup_wall=round(plain_decode / decode, 2), speedup_cpu=round(plain_cpu / cpu, 2),
                          speedup_vs_compiled_plain=round(compiled_decode / decode, 2) if compiled_decode else None,
                          acceptance_rate=round(accepted / drafted, 3) if drafted else None,
                          tokens_per_target_forward=round((accepted + steps) / steps, 2) if steps else None,
                          identical_text=f"{same}/{len(rows)}"))

    columns = ["contestant", "decode_ms_per_token", "cpu_ms_per_token", "speedup_wall", "speedup_cpu",
               "speedup_vs_compiled_plain", "acceptance_rate", "tokens_per_target_forward", "identical_text"]
    print(f"\ntarget {target_path} ({target.num_params() / 1e6:.1f}M), draft {draft_path} "
          f"({draft.num_params() / 1e6:.1f}M), {dtype} (draft {draft_dtype}), {args.threads} thread(s), "
          f"{len(prompts)} prompts x "
          f"{args.new_tokens} tokens x {args.rounds} rounds, greedy")
    print("".join(f"{c:>27}" if i else f"{c:<28}" for i, c in enumerate(columns)))
    for row in table:
        print("".join(f"{row[c]!s:>27}" if i else f"{row[c]!s:<28}" for i, c in enumerate(columns)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, dict(
        rows=table, target=str(target_path), draft=str(draft_path),
        distilled_draft=str(distilled_path) if distilled_path else None, target_params=target.num_params(),
        draft_params=draft.num_params(), target_shape=TARGET_SHAPE if not args.target else None,
        draft_shape=DRAFT_SHAPE if not args.draft else None, dtype=dtype, draft_dtype=draft_dtype,
        threads=args.threads,
        prompts=prompts, new_tokens=args.new_tokens, rounds=args.rounds, torch=torch.__version__,
        sample_text=tokenizer.decode(plain_ids[0])))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
