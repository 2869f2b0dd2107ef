"""Held-out perplexity of bf16 vs weight-only int8 / int4 on models trained with the repo's own recipes.

    python benchmarks/quantize_quality.py [--budget-s 180] [--recipes shakespeare default]
                                          [--checkpoint shakespeare=DIR] [--checkpoint default=DIR]

Recipes (each trained for --budget-s seconds of wall-clock with `train.time_budget_s`, unless --checkpoint names
a checkpoint it wrote before):
- shakespeare: configs/shakespeare.toml on tinyshakespeare; held out: the last 10% of the text (the recipe's own
  validation split), scored as text.
- default: the embedded default recipe (this Python's docs and standard library) with the 15m preset at the
  recipe's 2048-token vocabulary; held out: the prepared data's validation split (up to --eval-tokens tokens).
Every variant loads the checkpoint in bf16 and quantizes it (`minillama.quantize.quantize`): int8, int4 at
group sizes 32 / 64 / 128, and int8 / int4 with the output head left in bf16 (`quantize_output=False`), to show
what quantizing the head costs. The gates: int8 within +1% and int4 (default group size) within +5% of bf16.
Prints a table; writes benchmarks/results/quantize_quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
# (label, method, group size, quantize the head)
VARIANTS = [("bf16", None, None, True), ("int8", "int8", None, True), ("int8 head-bf16", "int8", None, False),
            ("int4 g32", "int4", 32, True), ("int4 g64", "int4", 64, True), ("int4 g128", "int4", 128, True),
            ("int4 g32 head-bf16", "int4", 32, False)]
GATES = {"int8": 0.01, "int4 g32": 0.05}  # relative perplexity increase allowed (g32 is DEFAULT_GROUP_SIZE)


def run_config(recipe: str, text: str, budget_s: float | None, extra: list[str]):
    from minillama.train import load_run_config
    from minillama.train.config import CONFIG_DIR

    overrides = list(extra)
    if budget_s is not None:
        overrides += [f"train.time_budget_s={budget_s}", "train.max_steps=100000", "train.save_every=100000",
                      "train.eval_every=100000"]
    if recipe == "shakespeare":
        return load_run_config(CONFIG_DIR / "shakespeare.toml", overrides, data_paths=[text])
    return load_run_config(None, ["model.preset=15m", "model.vocab_size=2048", *overrides])


def scorer(recipe: str, run, out: Path, text: str, eval_tokens: int):
    """A function model -> EvalResult on the recipe's held-out text."""
    from minillama.data.prepare import split_tail
    from minillama.eval import evaluate_prepared, evaluate_text
    from minillama.train.setup import prepare_run

    tokenizer, data_dir, _ = prepare_run(run, out, show_progress=False)  # cached after the first time
    if recipe == "shakespeare":
        _, held_out = split_tail(Path(text).read_text(encoding="utf-8"), run.data.val_fraction)
        return lambda model: evaluate_text(model, tokenizer, held_out, seq_len=run.train.seq_len)
    return lambda model: evaluate_prepared(model, data_dir, seq_len=run.train.seq_len, max_tokens=eval_tokens)


def evaluate_variants(checkpoint: Path, score) -> list[dict]:
    from minillama.checkpoint import load
    from minillama.quantize import quantize, weight_bytes

    rows = []
    for label, method, group_size, quantize_output in VARIANTS:
        model, _ = load(checkpoint, dtype=torch.bfloat16)
        if method is not None:
            quantize(model, method, group_size, quantize_output=quantize_output)
        start = time.perf_counter()
        result = score(model)
        rows.append(dict(variant=label, perplexity=round(result.perplexity, 4), loss=round(result.loss, 5),
                         bits_per_byte=round(result.bits_per_byte, 5), model_bytes=weight_bytes(model),
                         tokens=result.tokens, eval_s=round(time.perf_counter() - start, 1)))
    base = rows[0]["perplexity"]
    for row in rows:
        row["perplexity_change"] = round(row["perplexity"] / base - 1, 5)
        if row["variant"] in GATES:
            row["gate"] = GATES[row["variant"]]
            row["met"] = row["perplexity_change"] <= GATES[row["variant"]]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["shakespeare", "default"], choices=["shakespeare", "default"])
    parser.add_argument("--checkpoint", action="append", default=[], metavar="RECIPE=DIR",
                        help="score this checkpoint instead of training one")
    parser.add_argument("--budget-s", type=float, default=180.0, help="wall-clock training budget per recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config overrides")
    parser.add_argument("--text", default=str(DEFAULT_TEXT), help="the Shakespeare text")
    parser.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens of the default recipe")
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / "out" / "quantize_quality"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quantize_quality.json"))
    args = parser.parse_args()

    from minillama.train import train

    given = dict(item.split("=", 1) for item in args.checkpoint)
    work = Path(args.work)
    os.environ.setdefault("MINILLAMA_CACHE", str(work / "cache"))
    report = {}
    for recipe in args.recipes:
        out = work / recipe
        if recipe in given:
            run, trained = run_config(recipe, args.text, None, args.overrides), None
            checkpoint = Path(given[recipe])
        else:
            run = run_config(recipe, args.text, args.budget_s, args.overrides)
            start = time.perf_counter()
            result = train(run, out / "run", show_progress=False)
            trained = dict(steps=result.step, wall_s=round(time.perf_counter() - start, 1),
                           tokens=result.step * run.train.batch_tokens, budget_s=args.budget_s)
            checkpoint = result.checkpoint
        rows = evaluate_variants(checkpoint, scorer(recipe, run, out, args.text, args.eval_tokens))
        report[recipe] = dict(checkpoint=str(checkpoint), trained=trained, overrides=args.overrides, rows=rows)

        print(f"\n{recipe}: {checkpoint}" + (f"  ({trained['steps']} steps, {trained['wall_s']} s)" if trained else ""))
        print(f"{'variant':<20}{'perplexity':>12}{'change':>9}{'bits/byte':>11}{'MB':>8}{'gate':>7}")
        for r in rows:
            gate = "" if "gate" not in r else ("ok" if r["met"] else "FAIL")
            print(f"{r['variant']:<20}{r['perplexity']:>12.4f}{r['perplexity_change']:>+9.2%}"
                  f"{r['bits_per_byte']:>11.4f}{r['model_bytes'] / 1e6:>8.2f}{gate:>7}")
    out_file = Path(args.out)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(dict(threads=torch.get_num_threads(), torch=torch.__version__, recipes=report),
                                   indent=2) + "\n")
    print(f"\nwrote {out_file}")


if __name__ == "__main__":
    main()
