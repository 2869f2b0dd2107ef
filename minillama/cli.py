"""`minillama` on the command line. Argument parsing only: every command calls a library function.

Each command group has one `add_*_commands(subparsers)` function below that declares its arguments and sets
`handler`, a function taking the parsed namespace. Bad input raises MinillamaError, which becomes one line on
stderr and exit code 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import typing

from minillama.errors import MinillamaError


# --------------------------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------------------------
def add_presets_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the model presets with their exact parameter counts")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(handler=run_presets)


def run_presets(args: argparse.Namespace) -> None:
    from minillama.plan.presets import format_preset_table, preset_table

    rows = preset_table()
    print(json.dumps(rows, indent=2) if args.json else format_preset_table(rows))


# --------------------------------------------------------------------------------------------------------------
# tokenizer  (owned by minillama/tokenizer.py)
# --------------------------------------------------------------------------------------------------------------
def add_tokenizer_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train, or encode and decode with, a tokenizer")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)

    t = tsub.add_parser("train", help="train a byte-level BPE tokenizer (digits split, byte fallback) on text files")
    t.add_argument("--input", nargs="+", required=True, metavar="PATH", help="UTF-8 text files")
    t.add_argument("--vocab-size", type=int, required=True, metavar="N", help="vocabulary size, specials included")
    t.add_argument("--out", required=True, metavar="DIR", help="directory for tokenizer.json + tokenizer_config.json")
    t.add_argument("--min-frequency", type=int, default=2, metavar="N", help="merge only pairs seen N times")
    t.set_defaults(handler=run_tokenizer_train)

    e = tsub.add_parser("encode", help="print the token ids of a text")
    e.add_argument("--tokenizer", required=True, metavar="PATH", help="tokenizer directory or file")
    e.add_argument("text", metavar="TEXT", help="the text; '-' reads standard input")
    e.add_argument("--bos", action="store_true", help="prepend the bos token")
    e.add_argument("--eos", action="store_true", help="append the eos token")
    e.add_argument("--json", action="store_true", help='print {"ids": [...]}')
    e.set_defaults(handler=run_tokenizer_encode)

    d = tsub.add_parser("decode", help="print the text of token ids")
    d.add_argument("--tokenizer", required=True, metavar="PATH", help="tokenizer directory or file")
    d.add_argument("ids", nargs="+", type=int, metavar="IDS", help="token ids")
    d.set_defaults(handler=run_tokenizer_decode)


def run_tokenizer_train(args: argparse.Namespace) -> None:
    from minillama.tokenizer import train_bpe

    tok = train_bpe(args.input, args.vocab_size, args.out, min_frequency=args.min_frequency)
    print(f"trained {tok.vocab_size} tokens (bos={tok.bos_id}, eos={tok.eos_id}) -> {args.out}  "
          f"fingerprint {tok.fingerprint}")


def run_tokenizer_encode(args: argparse.Namespace) -> None:
    from minillama.tokenizer import load_tokenizer

    text = sys.stdin.read() if args.text == "-" else args.text
    ids = load_tokenizer(args.tokenizer).encode(text, bos=args.bos, eos=args.eos)
    print(json.dumps({"ids": ids}) if args.json else " ".join(map(str, ids)))


def run_tokenizer_decode(args: argparse.Namespace) -> None:
    from minillama.tokenizer import load_tokenizer

    print(load_tokenizer(args.tokenizer).decode(args.ids))


# --------------------------------------------------------------------------------------------------------------
# data  (owned by minillama/data/)
# --------------------------------------------------------------------------------------------------------------
def add_data_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare a tokenized data mixture, or inspect what a batch holds")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("prepare", help="tokenize sources into shards + manifest.json (cached when unchanged)")
    q.add_argument("--config", help="TOML file with a [data] table of [[data.sources]]")
    q.add_argument("--input", nargs="+", metavar="PATH",
                   help="file, directory, glob, python:docs or python:source; one source each (replaces --config's)")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--tokenizer", required=True, help="tokenizer directory or file")
    q.add_argument("--val-fraction", type=float, help="held-out share of each source (data.val_fraction)")
    q.add_argument("--seed", type=int, help="seed of the validation hold-out (data.seed)")
    q.add_argument("--train-tokens", type=int, help="planned training tokens, to report the epochs they imply")
    q.add_argument("--workers", type=int, help="tokenizer processes (default: all usable cores)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(handler=run_data_prepare)
    q = dsub.add_parser("inspect", help="show what batch N holds: source, epoch, window, decoded start")
    q.add_argument("dir", help="prepared data directory, or a training run's --out directory (its run.json "
                               "names the data and the run's seq_len, batch size and seed)")
    q.add_argument("--step", type=int, required=True, help="training step (0-based: the batch of update N+1)")
    q.add_argument("--seq-len", type=int, help="sequence length of the run (default: the run's, else 256)")
    q.add_argument("--batch-size", type=int, help="per-rank batch size of the run (default: the run's, else 8)")
    q.add_argument("--seed", type=int, help="data seed of the run (default: the run's, else 0)")
    q.add_argument("--rank", type=int, default=0)
    q.add_argument("--world-size", type=int, default=1)
    q.add_argument("--tokenizer", help="tokenizer to decode with (default: the copy stored with the data)")
    q.add_argument("--verify", action="store_true", help="check every shard's sha256 first")
    q.add_argument("--json", action="store_true", help="print JSON rows instead of text")
    q.set_defaults(handler=run_data_inspect)


def run_data_prepare(args: argparse.Namespace) -> None:
    import dataclasses
    import warnings

    from minillama.data import DataWarning, data_config_from_paths, load_data_config, prepare_data
    from minillama.data.inspect import format_manifest

    if args.config is None and args.input is None:
        raise MinillamaError("data prepare needs --config FILE or --input PATH...")
    cfg = load_data_config(args.config) if args.config else data_config_from_paths(args.input)
    changes = {k: getattr(args, k) for k in ("val_fraction", "seed", "train_tokens") if getattr(args, k) is not None}
    if args.config and args.input:
        changes["sources"] = data_config_from_paths(args.input).sources
    cfg = dataclasses.replace(cfg, **changes)  # validates again
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        manifest = prepare_data(cfg, args.tokenizer, args.out, workers=args.workers, progress=not args.no_progress)
    for w in caught:
        print(f"minillama: warning: {w.message}", file=sys.stderr)
    print(("cached, nothing to tokenize: " if manifest["cache_hit"] else "prepared ") + str(args.out))
    print(format_manifest(manifest))


def run_data_inspect(args: argparse.Namespace) -> None:
    from minillama.data import MixtureLoader
    from minillama.data.inspect import format_inspection, inspect_batch, load_data_tokenizer, loader_settings

    settings = loader_settings(args.dir, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)
    loader = MixtureLoader(**settings, rank=args.rank, world_size=args.world_size, verify=args.verify)
    tokenizer = load_data_tokenizer(settings["data_dir"], args.tokenizer)
    rows = inspect_batch(loader, args.step, tokenizer)
    print(json.dumps(rows, indent=1) if args.json else format_inspection(loader, args.step, rows))


# --------------------------------------------------------------------------------------------------------------
# train, eval, generate, quantize  (owned by minillama/train/, minillama/eval.py, minillama/infer/)
# --------------------------------------------------------------------------------------------------------------
def add_train_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain a model (no --config: the embedded default recipe)")
    p.add_argument("--config", help="run TOML file (default: the embedded default recipe)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config field, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--data", nargs="+", metavar="PATH", help="text source(s) replacing the recipe's sources")
    p.add_argument("--max-steps", type=int, help="optimizer steps (train.max_steps)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (train.save_every)")
    p.add_argument("--seed", type=int, help="seed for init and data order (train.seed)")
    p.add_argument("--out", default="runs/default", help="output directory (default: runs/default)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--allow-change", dest="allow_changes", action="append", default=[], metavar="KEY",
                   help="with --resume: accept this config key (or table, e.g. optim) differing from the "
                        "checkpoint's; recorded in OUT/run.json (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_train)

    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of a checkpoint (--data), or its accuracy "
                                     "on a multiple-choice task (--task)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (Hugging Face format)")
    p.add_argument("--data", help="a text file, or a prepared data directory (its validation split)")
    p.add_argument("--task", metavar="FILE.jsonl", help="a multiple-choice task file (docs/evaluation.md), or the "
                                                        "name of a shipped one (arithmetic, python_expressions, ...)")
    p.add_argument("--seq-len", type=int, help="context per window (default: the model's max_seq_len)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="bf16 autocast or fp32 (auto: bf16 where its matmuls are native, fp32 elsewhere)")
    p.add_argument("--shots", type=int, default=0, help="--task: solved examples before each item (default 0)")
    p.add_argument("--limit", type=int, help="--task: score only the first N items")
    p.add_argument("--seed", type=int, default=1234, help="--task: seed of the shots' draw (default 1234, lm-eval's)")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    add_quantize_arguments(p)
    p.set_defaults(handler=run_eval)

    # lm_eval's own argument parser reads everything after `lm-eval`; prefix_chars that no argument starts with
    # keep this parser from taking --model and the rest as its own options.
    p = sub.add_parser("lm-eval", help="lm-evaluation-harness's CLI with --model minillama available "
                                       "(needs the eval extra)", add_help=False, prefix_chars="\0")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    p.set_defaults(handler=run_lm_eval)

    add_generate_command(sub)

    p = sub.add_parser("quantize", help="write a weight-only int8 or int4 copy of a checkpoint")
    p.add_argument("checkpoint", help="checkpoint directory (Hugging Face format, not yet quantized)")
    p.add_argument("--to", required=True, metavar="int8|int4", help="int8: per output channel; int4: per group")
    p.add_argument("--group-size", type=int, metavar="G", help="int4 inputs per scale: 32, 64, 128 or 256 "
                                                                "(default 32)")
    p.add_argument("--keep-output", action="store_true", help="leave the output head in bf16")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the quantized checkpoint")
    p.set_defaults(handler=run_quantize)


def add_generate_command(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`minillama generate`. Returned so that options which transform the model or the engine (a draft model,
    prompt lookup, quantization) can be added beside these; `run_generate` builds the engine in one place."""
    p = sub.add_parser("generate", help="continue prompts with a checkpoint (several prompts run as one batch)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (Hugging Face format)")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="text to continue (repeatable)")
    p.add_argument("--prompt-file", metavar="PATH", help="UTF-8 file of prompts, one a line")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    s.add_argument("--top-k", type=int, default=200, help="keep the k most likely tokens (default 200; 0: all)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1] (default 1: off)")
    s.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top one's probability")
    s.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL's, over prompt and output (1: off)")
    s.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2]")
    s.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2]")
    s.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    s.add_argument("--seed", type=int, default=None, help="seed of each prompt's sampler (default: a fresh one)")
    o = p.add_argument_group("output and hardware")
    o.add_argument("--stream", action="store_true", help="print text as it is generated")
    o.add_argument("--json", action="store_true", help="print only JSON: per prompt its text, token ids, finish "
                                                       "reason and timings")
    o.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    o.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="weights and KV cache (auto: bf16 on CUDA and on CPUs with native bf16, else fp32)")
    o.add_argument("--max-batch", type=int, default=16, help="prompts decoded together at most (default 16)")
    o.add_argument("--compile", action="store_true", default=None,
                   help="compile the decode step (default on CUDA; on CPU 2-3x faster a token, 1-3 min to compile)")
    o.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); 1 is fastest on a busy machine")
    add_quantize_arguments(p)
    d = p.add_argument_group("speculative decoding (the same text greedily; the same distribution when sampling)")
    d.add_argument("--draft", metavar="CKPT", help="a smaller checkpoint with the same tokenizer drafts tokens that "
                                                   "the model verifies several at a time")
    d.add_argument("--prompt-lookup", type=int, metavar="N", help="draft by looking up the sequence's last n tokens "
                                                                  "(n <= N) earlier in its prompt and output")
    d.add_argument("--draft-tokens", type=int, metavar="K", help="tokens drafted per step (default 4)")
    p.set_defaults(handler=run_generate)
    return p


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", metavar="int8|int4", help="quantize the weights at load time (weight-only)")
    p.add_argument("--group-size", type=int, metavar="G", help="int4 inputs per scale (default 32)")


def run_train(args: argparse.Namespace) -> None:
    from minillama.infer import sample_checkpoint
    from minillama.train import load_run_config, train

    overrides = list(args.overrides)
    for flag, key in (("max_steps", "train.max_steps"), ("save_every", "train.save_every"), ("seed", "train.seed")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    run = load_run_config(args.config, overrides, data_paths=args.data)
    if args.allow_changes and not args.resume:
        raise MinillamaError("--allow-change is for --resume: a new run has no checkpoint to differ from")
    result = train(run, args.out, resume=args.resume, show_progress=not args.no_progress,
                   allow_changes=tuple(args.allow_changes))
    if result.rank != 0:  # under torchrun rank 0 speaks for the job
        return
    summary = f"step {result.step}: train loss {result.last_loss:.4f}" if result.last_loss is not None else \
        f"step {result.step}"
    if result.val_loss is not None:
        summary += f", validation loss {result.val_loss:.4f}, {result.val_bpb:.4f} bits per byte"
    print(summary)
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint}")
        if not result.stopped_by_signal and run.train.sample_tokens:
            print("sample:")
            print(sample_checkpoint(result.checkpoint, run.train.sample_prompt, run.train.sample_tokens,
                                    seed=run.train.seed))


def run_eval(args: argparse.Namespace) -> None:
    from minillama.eval import evaluate_path

    if (args.data is None) == (args.task is None):
        raise MinillamaError("eval needs one of --data PATH (bits per byte) or --task FILE.jsonl (accuracy)")
    if args.task is not None:
        run_eval_task(args)
        return
    result = evaluate_path(args.checkpoint, args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                           dtype=args.dtype, quantize=args.quantize, group_size=args.group_size)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"loss {result.loss:.4f} nats/token  perplexity {result.perplexity:.2f}  "
              f"{result.bits_per_byte:.4f} bits/byte  ({result.tokens:,} tokens, {result.bytes:,} bytes)")


def run_eval_task(args: argparse.Namespace) -> None:
    from minillama.tasks import evaluate_task_path

    result = evaluate_task_path(args.checkpoint, args.task, shots=args.shots, seed=args.seed, limit=args.limit,
                                batch_size=args.batch_size, max_len=args.seq_len, dtype=args.dtype)
    if args.json:
        print(json.dumps(result.to_dict()))
        return
    spread = lambda e: "" if e is None else f" ± {e:.4f}"
    print(f"{result.task}: acc {result.acc:.4f}{spread(result.acc_stderr)}  acc_norm {result.acc_norm:.4f}"
          f"{spread(result.acc_norm_stderr)}  chance {result.chance:.4f}  ({result.items} items, {result.shots}-shot)")


def run_lm_eval(args: argparse.Namespace) -> None:
    try:
        from minillama.interop.lm_eval import run_cli
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "lm_eval":
            raise
        raise MinillamaError("lm-eval is not installed: pip install 'minillama[eval]'") from None
    run_cli(args.lm_eval_args)


def run_generate(args: argparse.Namespace) -> None:
    from minillama.infer import SamplingParams
    from minillama.infer.generate import (
        completion_record,
        engine_for_prompts,
        load_inference_setup,
        read_prompts,
        set_threads,
        stream_in_order,
    )

    prompts = read_prompts(args.prompt, args.prompt_file)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k or None, top_p=args.top_p, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                            presence_penalty=args.presence_penalty, stop=tuple(args.stop), seed=args.seed)
    if args.stream and args.json:
        raise MinillamaError("--stream and --json exclude each other (--json prints one document at the end)")
    if args.max_batch < 1 or (args.threads is not None and args.threads < 1):
        raise MinillamaError(f"--max-batch and --threads must be >= 1, got {args.max_batch} and {args.threads}")
    set_threads(args.threads)
    setup = load_inference_setup(args.checkpoint, device=args.device, dtype=args.dtype, quantize=args.quantize,
                                 group_size=args.group_size, draft=args.draft, prompt_lookup=args.prompt_lookup,
                                 draft_tokens=args.draft_tokens)
    model, tokenizer = setup.model, setup.tokenizer
    engine, ids = engine_for_prompts(model, tokenizer, prompts, params, max_batch=args.max_batch,
                                     compile=args.compile, engine_class=setup.engine_class, **setup.engine_options)
    if engine.compiled:  # before the clock starts: --json's timings are the decoding's, not the compiler's
        print(f"compiling the decode step for batch sizes up to {engine.max_batch}...", file=sys.stderr, flush=True)
        print(f"compiled in {engine.warm_up():.0f} s", file=sys.stderr, flush=True)
    if args.json:
        completions = engine.generate(ids, params)
        print(json.dumps([completion_record(p, c) for p, c in zip(prompts, completions)], indent=1))
        return
    started = -1  # the prompt being printed; stream_in_order gives them one after another
    for i, text, completion in stream_in_order(engine, ids, params):
        if args.stream:
            if i != started:
                print(prompts[i], end="", flush=True)
                started = i
            print(text, end="\n" if completion is not None else "", flush=True)
        elif completion is not None:
            print(prompts[i] + completion.text)


# --------------------------------------------------------------------------------------------------------------
# serve  (owned by minillama/serve/)
# --------------------------------------------------------------------------------------------------------------
def add_serve_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching) for a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (Hugging Face format)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1/ routes "
                                                     "(default: $MINILLAMA_API_KEY; neither: no key)")
    p.add_argument("--served-model-name", metavar="NAME", help="the model name clients use (default: --checkpoint "
                                                                "as given, as vLLM does)")
    e = p.add_argument_group("engine")
    e.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (default 32)")
    e.add_argument("--max-queue", type=int, default=256, help="sequences waiting for a slot before new requests "
                                                              "get 429 (default 256)")
    e.add_argument("--max-context", type=int, metavar="N", help="positions per sequence, prompt + output "
                                                                "(default: the model's max_seq_len)")
    e.add_argument("--max-cached-tokens", type=int, metavar="N", help="KV admission budget: tokens that admitted "
                                                                      "sequences may reserve (default: all the cache)")
    e.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens prefilled per step (default 512)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    e.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="weights and KV cache")
    e.add_argument("--threads", type=int, help="CPU threads of the engine (torch.set_num_threads)")
    e.add_argument("--compile", action="store_true", default=None, help="compile the decode step (default on CUDA)")
    add_quantize_arguments(e)
    e.add_argument("--draft", metavar="CKPT", help="speculative decoding with this smaller checkpoint")
    e.add_argument("--draft-tokens", type=int, metavar="K", help="tokens drafted per step (default 4)")
    e.add_argument("--engine-in-process", action="store_true", help="run the engine on a thread of the server's "
                                                                     "process, not in a child process (slower under "
                                                                     "load: the two share the GIL)")
    h = p.add_argument_group("limits")
    h.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413 (default 1 MiB)")
    h.add_argument("--grace", type=float, default=30.0, metavar="S", help="on SIGTERM, seconds running requests "
                                                                          "may take to finish (default 30)")
    p.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> None:
    from minillama.serve.server import ServeConfig, api_key_from, serve

    serve(ServeConfig(checkpoint=args.checkpoint, host=args.host, port=args.port, api_key=api_key_from(args.api_key),
                      served_model_name=args.served_model_name, max_batch=args.max_batch, max_queue=args.max_queue,
                      max_context=args.max_context, max_cached_tokens=args.max_cached_tokens,
                      prefill_chunk=args.prefill_chunk, quantize=args.quantize, group_size=args.group_size,
                      draft=args.draft, draft_tokens=args.draft_tokens, device=args.device, dtype=args.dtype,
                      threads=args.threads, compile=args.compile, max_body_bytes=args.max_body_bytes,
                      grace_s=args.grace, engine_in_process=args.engine_in_process))


# --------------------------------------------------------------------------------------------------------------
# export, convert  (owned by minillama/interop/)
# --------------------------------------------------------------------------------------------------------------
def add_interop_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a checkpoint in another program's format")
    group = p.add_subparsers(dest="export_format", required=True)
    q = group.add_parser("gguf", help="a GGUF file for llama.cpp (llama architecture, with the tokenizer)")
    q.add_argument("checkpoint", help="checkpoint directory (Hugging Face format, with tokenizer files)")
    q.add_argument("--out", required=True, help="the .gguf file to write")
    q.add_argument("--dtype", default="f16", help="weights: f32, f16 (default) or q8_0; norms stay f32")
    q.set_defaults(handler=run_export_gguf)

    p = sub.add_parser("convert", help="read a checkpoint in another format into a Hugging Face-format directory")
    group = p.add_subparsers(dest="convert_format", required=True)
    q = group.add_parser("meta", help="Meta's original format: params.json, consolidated.NN.pth, tokenizer.model")
    q.add_argument("directory", help="the Meta checkpoint directory")
    q.add_argument("--out", required=True, help="output checkpoint directory (replaced atomically)")
    q.add_argument("--max-seq-len", type=int, help="context length (default: the model family's)")
    q.set_defaults(handler=run_convert_meta)


def run_export_gguf(args: argparse.Namespace) -> None:
    from minillama.interop.gguf import export_gguf

    print(export_gguf(args.checkpoint, args.out, args.dtype))


def run_convert_meta(args: argparse.Namespace) -> None:
    from minillama.interop.meta import convert_meta

    print(convert_meta(args.directory, args.out, max_seq_len=args.max_seq_len))


def run_quantize(args: argparse.Namespace) -> None:
    from minillama.quantize import quantize_checkpoint

    spec = quantize_checkpoint(args.checkpoint, args.out, args.to, args.group_size,
                               quantize_output=not args.keep_output)
    group = f", group size {spec.group_size}" if spec.group_size else ""
    print(f"{spec.method} weight-only{group}{'' if spec.quantize_output else ', output head in bf16'} -> {args.out}")


# --------------------------------------------------------------------------------------------------------------
# plan  (owned by minillama/plan/)
# --------------------------------------------------------------------------------------------------------------
def add_plan_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="what a training or serving run costs: FLOPs, memory, GPUs, days, $, energy",
                       description="Counts such as --tokens take 1.4e12, 1.4T or 1,400,000,000,000. Sources of "
                                   "every formula: docs/plan.md and the table's footnotes.")
    model = p.add_argument_group("model (one of)")
    model.add_argument("--model", metavar="PRESET", help="a preset (see `minillama presets`)")
    model.add_argument("--config", metavar="FILE", help="a run TOML: its [model] table, and [train] defaults")
    model.add_argument("--params", metavar="N", help="a bare parameter count (quick sums; no attention/KV terms)")
    train = p.add_argument_group("training")
    train.add_argument("--tokens", metavar="D", help="training tokens (default: 20 per parameter)")
    train.add_argument("--gpu", default="h100-sxm", help="hardware: a table entry, or cpu (measured once)")
    train.add_argument("--gpus", metavar="N", help="GPU count (default: dp x tp x pp, else 1)")
    train.add_argument("--mfu", help="model FLOPs utilisation in (0, 1] (default 0.4)")
    train.add_argument("--tokens-per-s-per-gpu", metavar="R", help="throughput instead of --mfu")
    train.add_argument("--flops-per-s-per-gpu", metavar="F", help="achieved model FLOP/s per GPU instead of --mfu")
    train.add_argument("--flops-basis", choices=["counted", "6nd"], default="counted",
                       help="FLOPs per token that --mfu/--flops-per-s-per-gpu refer to (default: counted, as the "
                            "trainer's MFU; 6nd as papers quoting C = 6ND)")
    train.add_argument("--gpu-hours", metavar="H", help="GPU-hours spent (instead of computing them)")
    train.add_argument("--price-per-gpu-hour", metavar="USD", help="dollars per GPU-hour")
    train.add_argument("--power-w", metavar="W", help="power per GPU (default: the chip's TDP)")
    train.add_argument("--pue", default="1.1", help="data-centre power usage effectiveness (default 1.1)")
    train.add_argument("--grid-kgco2-per-kwh", default="0.385", help="grid carbon intensity (default 0.385)")
    train.add_argument("--seq-len", metavar="T", help="training sequence length (default: the model's)")
    train.add_argument("--batch-tokens", metavar="B", help="global batch in tokens (default: one micro-batch per GPU)")
    train.add_argument("--micro-batch", metavar="S", help="sequences per GPU per forward pass (default 1)")
    train.add_argument("--dp", metavar="N", help="data-parallel ranks")
    train.add_argument("--tp", metavar="N", help="tensor-parallel ranks (default 1)")
    train.add_argument("--pp", metavar="N", help="pipeline stages (default 1)")
    train.add_argument("--zero", choices=["0", "1", "2", "3", "fsdp"], default="0",
                       help="ZeRO stage over dp: 1 optimizer, 2 + gradients, 3 (= fsdp) + weights")
    train.add_argument("--activation-checkpointing", choices=["none", "selective", "full"])
    train.add_argument("--precision", choices=["bf16", "fp32", "mixed", "pure-bf16"],
                       help="bf16: autocast over fp32 weights (our trainer; default); mixed: 16-bit weights and "
                            "gradients + fp32 master in the optimizer (ZeRO paper); pure-bf16: everything bf16")
    infer = p.add_argument_group("inference")
    infer.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "int8", "int4"], default="bf16",
                       help="weight dtype")
    infer.add_argument("--context", metavar="T", help="tokens per sequence in the KV cache (default: --seq-len)")
    infer.add_argument("--batch", default="1", metavar="N", help="concurrent sequences (default 1)")
    budget = p.add_argument_group("budget mode and projection")
    budget.add_argument("--budget-gpu-hours", metavar="H")
    budget.add_argument("--budget-dollars", metavar="USD")
    budget.add_argument("--budget-flops", metavar="C")
    budget.add_argument("--year", metavar="Y", help="project the cost to year Y")
    budget.add_argument("--doubling-years", default="2.5",
                        help="FLOP/s-per-dollar doubling time (Epoch AI: 2.5; 'halving every two years': 2)")
    budget.add_argument("--base-year", metavar="Y", help="the year the price holds (default: this year)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (stable keys)")
    p.add_argument("--explain", action="store_true", help="print each formula with its numbers substituted")
    p.set_defaults(handler=run_plan)


def run_plan(args: argparse.Namespace) -> None:
    from minillama.plan import PlanOptions, format_explain, format_plan, make_plan, plan_json

    names = ["model", "config", "params", "tokens", "gpu", "gpus", "mfu", "tokens_per_s_per_gpu",
             "flops_per_s_per_gpu", "flops_basis", "gpu_hours", "price_per_gpu_hour", "power_w", "pue",
             "grid_kgco2_per_kwh", "seq_len", "batch_tokens", "micro_batch", "dp", "tp", "pp", "zero",
             "activation_checkpointing", "precision", "dtype", "context", "batch", "budget_gpu_hours",
             "budget_dollars", "budget_flops", "year", "doubling_years", "base_year"]
    plan = make_plan(PlanOptions(**{name: getattr(args, name) for name in names}))
    if args.json:
        print(plan_json(plan, explain=args.explain))
        return
    print(format_plan(plan))
    if args.explain:
        print()
        print(format_explain(plan))


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors in minillama's form: one line on stderr, exit code 2. argparse would print the
    usage first and name the sub-command instead of `minillama:`; the usage is one `--help` away, named in the
    line. Sub-parsers are made of the same class (add_subparsers' default parser_class)."""

    def error(self, message: str) -> typing.NoReturn:
        command = self.prog.removeprefix("minillama").strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"minillama: error: {where}{message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="minillama", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command")
    for add in (add_presets_commands, add_tokenizer_commands, add_data_commands, add_train_commands,
                add_serve_commands, add_plan_commands, add_interop_commands):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a parse error (2, reported above): a return value, as for the rest
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 0
    try:
        args.handler(args)
    except MinillamaError as exc:
        if args.debug:
            raise
        print(f"minillama: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minillama: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
