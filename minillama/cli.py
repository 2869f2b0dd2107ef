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
    from minillama.config import PRESETS, ModelConfig
    from minillama.model import count_parameters

    rows = []
    for name in PRESETS:
        cfg = ModelConfig.from_preset(name)
        rows.append(dict(name=name, params=count_parameters(cfg), layers=cfg.n_layers, dim=cfg.dim,
                         heads=cfg.n_heads, kv_heads=cfg.n_kv_heads, ffn=cfg.ffn_hidden_dim, vocab=cfg.vocab_size,
                         context=cfg.max_seq_len))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    columns = ["name", "params", "layers", "dim", "heads", "kv_heads", "ffn", "vocab", "context"]
    cells = [[f"{r[c]:,}" if c == "params" else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths))))
    for row in cells:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))


# --------------------------------------------------------------------------------------------------------------
# tokenizer  (owned by minillama/tokenizer.py)
# --------------------------------------------------------------------------------------------------------------
def add_tokenizer_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train, or encode and decode with, a tokenizer")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    # TOKENIZER-CLI: filled in by the tokenizer work


# --------------------------------------------------------------------------------------------------------------
# data  (owned by minillama/data/)
# --------------------------------------------------------------------------------------------------------------
def add_data_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare a tokenized data mixture, or inspect what a batch holds")
    dsub = p.add_subparsers(dest="data_command", required=True)
    # DATA-CLI: filled in by the data work


# --------------------------------------------------------------------------------------------------------------
# train, eval, generate  (owned by minillama/train/, minillama/eval.py, minillama/infer/)
# --------------------------------------------------------------------------------------------------------------
def add_train_commands(sub: argparse._SubParsersAction) -> None:
    pass  # TRAIN-CLI: filled in by the training work


# --------------------------------------------------------------------------------------------------------------
# plan  (owned by minillama/plan/)
# --------------------------------------------------------------------------------------------------------------
def add_plan_commands(sub: argparse._SubParsersAction) -> None:
    pass  # PLAN-CLI: filled in by the planner work


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
