"""A/B of one setting of the compiled CPU decode step, interleaved rounds in one process (so machine noise hits
both sides alike).

    python benchmarks/decode_ab.py skip-guards --preset 15m --contestant minillama-bf16-compiled [--rounds 8]
    python benchmarks/decode_ab.py concat-linear --preset 15m --contestant minillama-bf16-compiled

- `skip-guards`: one warmed-up engine, its rounds alternating between checking only the guards that tell its
  graphs apart (what Engine does after warm_up()) and checking every guard (before it).
- `concat-linear`: two engines over the same weights, one compiled with inductor's
  `cpp.enable_concat_linear` (at freezing, the matmuls that share an input, wq/wk/wv and w1/w3, become one), the
  other with the engine's options. `cpp-wrapper`: the same with inductor's `cpp_wrapper` (the graph calls its
  kernels from C++ rather than Python).

A round is decode.py's: one 128-token prompt prefilled, 128 tokens decoded greedily, decode tokens/s. Prints the
medians and the median per-round ratio (B / A); writes benchmarks/results/decode_ab-<setting>-<preset>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode  # noqa: E402

import minillama.infer.engine as engine_module  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OPTION_SETTINGS = {"concat-linear": {"cpp.enable_concat_linear": True}, "cpp-wrapper": {"cpp_wrapper": True}}


def build(contestant: str, preset: str, prompt: list[int], new_tokens: int):
    """decode.py's minillama contestant: its round, and the Engine it built."""
    run, *_ = decode.build_minillama(decode.parse(contestant), preset, prompt, new_tokens, "cpu")
    return run, run.engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("setting", choices=["skip-guards", *OPTION_SETTINGS])
    parser.add_argument("--preset", default="15m")
    parser.add_argument("--contestant", default="minillama-bf16-compiled")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not decode.parse(args.contestant).get("compiled"):
        parser.error("the contestant must be a compiled one (…-compiled)")
    torch.set_num_threads(args.threads)
    prompt = [(7 * i) % 1000 + 3 for i in range(128)]
    sides = {}
    if args.setting == "skip-guards":
        run, engine = build(args.contestant, args.preset, prompt, 128)

        def with_guards(skip: bool):
            def round_() -> dict:
                engine.steps.graphs_built = skip
                return run()
            return round_

        sides = {"every guard": with_guards(False), "telling guards only": with_guards(True)}
    else:
        options, extra_options = dict(engine_module.CPU_COMPILE_OPTIONS), OPTION_SETTINGS[args.setting]
        for label, extra in (("engine's options", {}), (f"+ {extra_options}", extra_options)):
            engine_module.CPU_COMPILE_OPTIONS = dict(options, **extra)
            sides[label] = build(args.contestant, args.preset, prompt, 128)[0]
        engine_module.CPU_COMPILE_OPTIONS = options
    for side in sides.values():
        side()  # one unmeasured round each
    rounds: dict[str, list[float]] = {label: [] for label in sides}
    for _ in range(args.rounds):
        for label, side in sides.items():
            rounds[label].append(side()["decode_tokens_per_s"])
    (a, ra), (b, rb) = rounds.items()
    ratios = [y / x for x, y in zip(ra, rb)]
    for label, values in rounds.items():
        print(f"{args.preset} {args.contestant} {label}: median {statistics.median(values):.1f} tokens/s, rounds "
              f"{[round(v, 1) for v in values]}")
    print(f"{b} / {a}: median per-round ratio {statistics.median(ratios):.3f}")
    out = ROOT / "benchmarks" / "results" / f"decode_ab-{args.setting}-{args.preset}-{time.strftime('%Y-%m-%d')}.json"
    out.write_text(json.dumps(dict(setting=args.setting, preset=args.preset, contestant=args.contestant,
                                   threads=args.threads, torch=torch.__version__, rounds_tokens_per_s=rounds,
                                   ratio_b_over_a=ratios, median_ratio=statistics.median(ratios)), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
