"""How fast this machine's bf16 matrix products can go, at square sizes and at the training step's shapes: the
ceiling under issue 14's training-speed targets, where both we and Hugging Face spend ~80% of a step in `aten::mm`.

    python benchmarks/matmul_peak.py [--threads 2] [--reps 10]

The shapes are the 125m preset's matmuls at 4 x 256 tokens (dim 768, hidden 3072 (w1/w3 out, w2 in), the 32,000
head), forward as (tokens, in) @ (in, out) and one of the backward's transposed forms. Prints best and median
GFLOP/s per shape; writes benchmarks/results/matmul_peak-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(2048, 2048, 2048), (4096, 4096, 4096), (1024, 768, 768), (1024, 768, 3072), (1024, 3072, 768),
          (768, 1024, 3072), (1024, 768, 32000)]


def gflops(m: int, k: int, n: int, reps: int) -> list[float]:
    a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(reps):
        started = time.perf_counter()
        a @ b
        rates.append(2 * m * k * n / (time.perf_counter() - started) / 1e9)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print("| (M, K, N) | best GFLOP/s | median GFLOP/s |\n| --- | ---: | ---: |")
    for m, k, n in SHAPES:
        rates = gflops(m, k, n, args.reps)
        rows.append(dict(m=m, k=k, n=n, best_gflops=max(rates), median_gflops=statistics.median(rates)))
        print(f"| ({m}, {k}, {n}) | {max(rates):.0f} | {statistics.median(rates):.0f} |")
    out = ROOT / "benchmarks" / "results" / f"matmul_peak-{time.strftime('%Y-%m-%d')}.json"
    out.write_text(json.dumps(dict(threads=args.threads, torch=torch.__version__, rows=rows), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
