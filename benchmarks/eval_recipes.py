"""The results table of docs/evaluation.md for any checkpoints: bits per byte on a held-out text, and acc, acc_norm
and chance on every task shipped in minillama/task_data.

    python benchmarks/eval_recipes.py CHECKPOINT [CHECKPOINT ...] [--text PATH] [--shots K] [--limit N]

The held-out text is the validation tail (last 10%) of ../shared/data/tinyshakespeare.txt unless --text names
another file; bits per byte does not depend on the tokenizer, so every model is charged for the same bytes.
Prints a Markdown table (paste it into docs/evaluation.md) and writes JSON to benchmarks/results/eval_recipes.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def evaluate_checkpoint(checkpoint: Path, text: str, shots: int, limit: int | None, dtype: str) -> dict:
    from minillama.checkpoint import load
    from minillama.errors import MinillamaError
    from minillama.eval import evaluate_text
    from minillama.tasks import score_task, shipped_tasks

    model, tokenizer = load(checkpoint)
    if tokenizer is None:
        raise MinillamaError(f"checkpoint {checkpoint} has no tokenizer files")
    started = time.perf_counter()
    text_result = evaluate_text(model, tokenizer, text, dtype=dtype)
    row = dict(checkpoint=str(checkpoint), params=model.num_params(), bits_per_byte=text_result.bits_per_byte,
               loss=text_result.loss, tasks={})
    for name in shipped_tasks():
        result = score_task(model, tokenizer, name, shots=shots, limit=limit, dtype=dtype)
        row["tasks"][name] = result.to_dict()
    row["seconds"] = time.perf_counter() - started
    return row


def markdown_table(rows: list[dict], text_name: str) -> str:
    tasks = list(rows[0]["tasks"])
    header = ["model", "params", f"bits/byte ({text_name})"] + [f"{t} acc / acc_norm" for t in tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["checkpoint"], f"{row['params']:,}", f"{row['bits_per_byte']:.4f}"]
        cells += [f"{row['tasks'][t]['acc']:.3f} / {row['tasks'][t]['acc_norm']:.3f}" for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    chance = [f"{rows[0]['tasks'][t]['chance']:.3f}" for t in tasks]
    items = [f"{rows[0]['tasks'][t]['items']} items" for t in tasks]
    lines.append("| chance | | | " + " | ".join(chance) + " |")
    lines.append("| (size) | | | " + " | ".join(items) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint directories")
    parser.add_argument("--text", type=Path, help="held-out text (default: tinyshakespeare's last 10%%)")
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--limit", type=int, help="score only each task's first N items")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eval_recipes.json")
    args = parser.parse_args()

    from minillama.data.prepare import split_tail

    if args.text is None:
        _, text = split_tail(DEFAULT_TEXT.read_text(encoding="utf-8"), 0.1)  # the recipe's validation split
        text_name = "tinyshakespeare val"
    else:
        text, text_name = args.text.read_text(encoding="utf-8"), args.text.name
    rows = [evaluate_checkpoint(path, text, args.shots, args.limit, args.dtype) for path in args.checkpoints]
    print(markdown_table(rows, text_name))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(text=text_name, shots=args.shots, limit=args.limit, dtype=args.dtype,
                                        rows=rows), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
