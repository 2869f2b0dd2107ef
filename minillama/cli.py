"""`minillama` on the command line. Argument parsing only: every command calls a library function.

Each command group has one `add_*_commands(subparsers)` function below that declares its arguments and sets
`handler`, a function taking the parsed namespace. Bad input raises MinillamaError, which becomes one line on
stderr and exit code 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys

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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_train)

    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (Hugging Face format)")
    p.add_argument("--data", required=True, help="a text file, or a prepared data directory (its validation split)")
    p.add_argument("--seq-len", type=int, help="context per window (default: the model's max_seq_len)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    add_quantize_arguments(p)
    p.set_defaults(handler=run_eval)

    p = sub.add_parser("generate", help="continue a prompt with a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (Hugging Face format)")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    add_quantize_arguments(p)
    p.set_defaults(handler=run_generate)

    p = sub.add_parser("quantize", help="write a weight-only int8 or int4 copy of a checkpoint")
    p.add_argument("checkpoint", help="checkpoint directory (Hugging Face format, not yet quantized)")
    p.add_argument("--to", required=True, metavar="int8|int4", help="int8: per output channel; int4: per group")
    p.add_argument("--group-size", type=int, metavar="G", help="int4 inputs per scale: 32, 64, 128 or 256 "
                                                                "(default 32)")
    p.add_argument("--keep-output", action="store_true", help="leave the output head in bf16")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the quantized checkpoint")
    p.set_defaults(handler=run_quantize)


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
    result = train(run, args.out, resume=args.resume, show_progress=not args.no_progress)
    summary = f"step {result.step}: train loss {result.last_loss:.4f}" if result.last_loss is not None else \
        f"step {result.step}"
    if result.val_loss is not None:
        summary += f", validation loss {result.val_loss:.4f}, {result.val_bpb:.4f} bits per byte"
    print(summary)
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint}")
        if not result.stopped_by_signal:
            print("sample:")
            print(sample_checkpoint(result.checkpoint, run.train.sample_prompt, run.train.sample_tokens,
                                    seed=run.train.seed))


def run_eval(args: argparse.Namespace) -> None:
    from minillama.eval import evaluate_path

    result = evaluate_path(args.checkpoint, args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                           dtype=args.dtype, quantize=args.quantize, group_size=args.group_size)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"loss {result.loss:.4f} nats/token  perplexity {result.perplexity:.2f}  "
              f"{result.bits_per_byte:.4f} bits/byte  ({result.tokens:,} tokens, {result.bytes:,} bytes)")


def run_generate(args: argparse.Namespace) -> None:
    from minillama.checkpoint import load
    from minillama.infer import generate

    model, tokenizer = load(args.checkpoint, quantize=args.quantize, group_size=args.group_size)
    if tokenizer is None:
        raise MinillamaError(f"checkpoint {args.checkpoint} has no tokenizer files")
    text = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(args.prompt + text)


def run_quantize(args: argparse.Namespace) -> None:
    from minillama.infer.quantize import quantize_checkpoint

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minillama", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command")
    for add in (add_presets_commands, add_tokenizer_commands, add_data_commands, add_train_commands,
                add_plan_commands):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
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
