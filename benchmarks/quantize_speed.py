"""Batch-1 decode speed of bf16 vs weight-only int8 / int4 at a preset's shapes (default 350m), on this machine.

    python benchmarks/quantize_speed.py [--preset 350m] [--threads 2] [--methods bf16 int8 int4:32 int4:128]
    python benchmarks/quantize_speed.py --preset 15m --base-dtype fp32 \
        --methods fp32 int8@fp32 int8 int4:32@fp32 int4:32

A method is `bf16`/`fp32` (the unquantized model, in --base-dtype), `int8` or `int4:GROUP`, optionally with
`@fp32` or `@bf16`: the dtype of the scales, which the matmuls run in (default: minillama.quantize's choice).

Decoding one sequence reads every weight once per token and does 2 FLOPs per weight read, far below what the
cores could compute from it: its speed is memory bandwidth / bytes per token. Two measurements per method:
- matmuls: one pass through the model's projections in order (every layer's wq, wk, wv, wo, w1, w3, w2, then the
  head), each a distinct matrix so that none is served from cache, with an input of one row (M = 1); reported per
  shape (us per call, GB/s of weights read) and as passes per second ("matmul tokens/s");
- decode: the whole Transformer, one token per forward with the KV cache after a short prompt (tokens/s).
The bandwidth limit is bytes read per token / this machine's copy bandwidth (minillama.plan.hardware's probe: a
large tensor copy, counted here as bytes copied per second, i.e. its read stream). Weights are random: speed
does not depend on their values. Prints a table; writes benchmarks/results/quantize_speed_*.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from minillama import ModelConfig, Transformer
from minillama.infer.generate import DTYPES
from minillama.model import KVCache
from minillama.plan.hardware import cpu_model_name, measured_cpu
from minillama.quantize import quantize, weight_bytes

ROOT = Path(__file__).resolve().parents[1]


def parse_method(text: str) -> tuple[str, int | None, torch.dtype | None]:
    """'int4:32@fp32' -> ('int4', 32, torch.float32)."""
    text, _, scales = text.partition("@")
    method, _, group = text.partition(":")
    return method, int(group) if group else None, DTYPES[scales] if scales else None


def build_model(preset: str, dtype: torch.dtype = torch.bfloat16) -> Transformer:
    cfg = ModelConfig.from_preset(preset)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    model = model.to(dtype).eval()
    model.reset_buffers()  # RoPE frequencies in fp32, as a loaded checkpoint has them
    return model


def projections(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's projections in the order a forward calls them (layer by layer, the head last)."""
    order = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w3",
             "feed_forward.w2")
    named = [(f"layers.{i}.{n}", model.get_submodule(f"layers.{i}.{n}")) for i in range(len(model.layers))
             for n in order]
    return named + [("output", model.output)]


def read_bytes(module: nn.Module) -> int:
    """Bytes one call reads: the module's tensors (a float Linear's weight, or quantized weights + scales)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@torch.no_grad()
def time_matmuls(model: nn.Module, passes: int) -> dict:
    """Each projection's best time over `passes` passes through all of them (the best filters out the moments
    another process holds the core; the pass order keeps every matrix out of cache until its turn)."""
    layers = projections(model)
    dtype = model.norm.weight.dtype  # the activations' (the model's own floating-point dtype)
    inputs = {k: torch.randn(1, k, dtype=dtype) for k in {m.in_features for _, m in layers}}
    best = [float("inf")] * len(layers)
    for _ in range(passes + 1):  # the first pass warms up (thread pool, packing buffers)
        for i, (_, module) in enumerate(layers):
            x = inputs[module.in_features]
            start = time.perf_counter()
            module(x)
            best[i] = min(best[i], time.perf_counter() - start)
    shape_time: dict[str, list[float]] = {}
    for (name, _), seconds in zip(layers, best):
        shape_time.setdefault("output" if name == "output" else name.split(".", 2)[2], []).append(seconds)
    rows = {}
    for key, times in shape_time.items():
        module = model.output if key == "output" else model.get_submodule(f"layers.0.{key}")
        us = sum(times) / len(times) * 1e6
        rows[key] = dict(shape=[module.out_features, module.in_features], us_per_call=round(us, 1),
                         gb_per_s=round(read_bytes(module) / (us * 1e-6) / 1e9, 2))
    total_bytes = sum(read_bytes(m) for _, m in layers)
    return dict(per_shape=rows, pass_s=sum(best), matmul_tokens_per_s=1 / sum(best), bytes_per_pass=total_bytes)


@torch.no_grad()
def time_decode(model: Transformer, prompt_len: int, steps: int) -> tuple[float, float]:
    """(tokens/s of the median step, of the best step) over `steps` greedy decode steps after a prompt."""
    cfg = model.cfg
    cache = KVCache.empty(cfg, batch_size=1, max_len=prompt_len + steps + 1, dtype=torch.bfloat16)
    logits = model(torch.randint(0, cfg.vocab_size, (1, prompt_len)), cache=cache, logits_index=-1)
    token = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
    step_s = []
    for _ in range(steps):
        start = time.perf_counter()
        token = model(token, cache=cache)[:, -1].argmax(-1, keepdim=True)
        step_s.append(time.perf_counter() - start)
    return 1 / statistics.median(step_s), 1 / min(step_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="350m")
    parser.add_argument("--methods", nargs="+", default=["bf16", "int8", "int4:32", "int4:128"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--base-dtype", choices=sorted(DTYPES), default="bf16", help="the model's own dtype")
    parser.add_argument("--passes", type=int, default=5, help="matmul passes (the best is kept)")
    parser.add_argument("--steps", type=int, default=32, help="decode steps (the median and the best are kept)")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--out", help="JSON file (default: benchmarks/results/quantize_speed_PRESET_Nthreads.json)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    copy_bytes_per_s = measured_cpu().bandwidth_bytes_per_s / 2  # the (cached) probe counts read + write
    base = build_model(args.preset, DTYPES[args.base_dtype])
    results = []
    for text in args.methods:
        method, group, scale_dtype = parse_method(text)
        if method in DTYPES and method != args.base_dtype:
            raise SystemExit(f"method {method}: the unquantized model is in --base-dtype {args.base_dtype}")
        model = base if method == args.base_dtype else quantize(copy.deepcopy(base), method, group,
                                                                 scale_dtype=scale_dtype)
        matmuls = time_matmuls(model, args.passes)
        decode_tokens_per_s, decode_best_tokens_per_s = time_decode(model, args.prompt, args.steps)
        bytes_per_token = matmuls["bytes_per_pass"]  # the embedding row and the KV cache are small beside it
        limit = copy_bytes_per_s / bytes_per_token
        results.append(dict(method=text, model_bytes=weight_bytes(model), bytes_per_token=bytes_per_token,
                            matmul_tokens_per_s=round(matmuls["matmul_tokens_per_s"], 2),
                            decode_tokens_per_s=round(decode_tokens_per_s, 2),
                            decode_best_step_tokens_per_s=round(decode_best_tokens_per_s, 2),
                            bandwidth_limit_tokens_per_s=round(limit, 2),
                            matmul_fraction_of_limit=round(matmuls["matmul_tokens_per_s"] / limit, 3),
                            decode_fraction_of_limit=round(decode_tokens_per_s / limit, 3),
                            decode_best_step_fraction_of_limit=round(decode_best_tokens_per_s / limit, 3),
                            per_shape=matmuls["per_shape"]))
        if model is not base:
            del model
    unquantized = next((r for r in results if r["method"] == args.base_dtype), None)
    for row in results:  # the keys say bf16, the default base; with --base-dtype fp32 they are against fp32
        if unquantized is not None:
            row["decode_speedup_vs_bf16"] = round(row["decode_tokens_per_s"] / unquantized["decode_tokens_per_s"], 2)
            row["matmul_speedup_vs_bf16"] = round(row["matmul_tokens_per_s"] / unquantized["matmul_tokens_per_s"], 2)

    print(f"{args.preset}, {torch.get_num_threads()} threads, {cpu_model_name()}, copy bandwidth "
          f"{copy_bytes_per_s / 1e9:.1f} GB/s")
    print("tokens/s: matmul = one pass over the projections (best call each); decode = median (best) step")
    print(f"{'method':<10}{'MB/token':>10}{'limit':>8}{'matmul':>8}{'of limit':>10}{'decode':>16}{'of limit':>13}"
          f"{'speedup':>9}")
    for r in results:
        decode = f"{r['decode_tokens_per_s']:.2f} ({r['decode_best_step_tokens_per_s']:.2f})"
        decode_share = f"{r['decode_fraction_of_limit']:.2f} ({r['decode_best_step_fraction_of_limit']:.2f})"
        print(f"{r['method']:<10}{r['bytes_per_token'] / 1e6:>10.1f}{r['bandwidth_limit_tokens_per_s']:>8.2f}"
              f"{r['matmul_tokens_per_s']:>8.2f}{r['matmul_fraction_of_limit']:>10.2f}{decode:>16}{decode_share:>13}"
              f"{r.get('decode_speedup_vs_bf16', float('nan')):>9.2f}")
    print()
    shapes = list(results[0]["per_shape"])
    print(f"{'us per call (GB/s)':<20}" + "".join(f"{k:>22}" for k in shapes))
    for r in results:
        cells = [f"{r['per_shape'][k]['us_per_call']:.0f} ({r['per_shape'][k]['gb_per_s']:.1f})" for k in shapes]
        print(f"{r['method']:<20}" + "".join(f"{c:>22}" for c in cells))
    out = Path(args.out or ROOT / "benchmarks" / "results" /
               f"quantize_speed_{args.preset}_{torch.get_num_threads()}threads.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(preset=args.preset, threads=torch.get_num_threads(), cpu=cpu_model_name(),
                                   torch=torch.__version__, copy_bytes_per_s=copy_bytes_per_s, results=results),
                              indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
