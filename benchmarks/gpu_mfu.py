"""Tokens/s, MFU and peak memory of minillama's training step on one GPU, against the planner's memory.

    python benchmarks/gpu_mfu.py                                        # CUDA: 125m, 350m, 1b x none/selective/full
    python benchmarks/gpu_mfu.py --presets 1b,125m --checkpointing none  # the two rows with targets
    python benchmarks/gpu_mfu.py --device cpu --preset tiny --seq-len 128 --steps 2   # the form CI runs

One step is what `minillama train` runs per batch (bf16 autocast over fp32 weights where bf16 is native, fp32 on a
CPU that emulates it: runtime.autocast_dtype; each block and the loss head
compiled, the trainer's `TrainStep`: forward, fp32 cross-entropy, backward, clipping at 1.0, fused AdamW), built
by the trainer's own `build_parallel_model`, on one micro-batch of random tokens at sequence 2,048. The
micro-batch is the largest power of two up to --max-micro-batch whose planned peak fits in 80% of the device's
memory (`minillama.plan.memory.training_memory`), unless --micro-batch names one.

tokens/s: micro-batch x sequence over the mean wall time of --steps steps after --warmup steps (compilation),
synchronised. MFU = tokens/s x model FLOPs per token (`minillama.plan.flops.flops_per_token`: 6 x matmul weights +
causal attention, recomputation not counted) / the device's dense peak in that precision
(`minillama.plan.hardware`: H100/H200 SXM 989 TFLOP/s in bf16). Memory: torch.cuda.max_memory_allocated over the
timed steps against the planner's total (CUDA); on the CPU, the peak of live tensor bytes over one more step
(benchmarks/plan_vs_measured.py `TensorBytes`: RSS would read the heap that `minillama train` keeps for reuse)
against the planner's total less the weights and AdamW state that exist before it.

Targets (checked and printed on a GPU): 1b >= 60,000 tokens/s and >= 45% MFU; 125m >= 35% MFU (AC none).
Each configuration runs in a fresh subprocess, so one row's memory never counts in another's. Results: a table
on stdout and JSON in benchmarks/results/gpu_mfu.json (--out to name another).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PRESETS = ["125m", "350m", "1b"]
CHECKPOINTING = ["none", "selective", "full"]
# (preset, activation checkpointing) -> (min tokens/s, min MFU)
TARGETS = {("1b", "none"): (60_000, 0.45), ("125m", "none"): (None, 0.35)}


def pick_micro_batch(cfg, seq_len: int, checkpointing: str, attention: str, memory_bytes: float, limit: int,
                     precision: str) -> int:
    """The largest power of two <= limit whose planned training peak fits in 80% of `memory_bytes`."""
    from minillama.plan.memory import training_memory
    from minillama.plan.planner import parameter_counts

    params = parameter_counts(cfg)[0]
    micro = 1
    while micro * 2 <= limit and training_memory(
            cfg, params, micro_batch=micro * 2, seq_len=seq_len, precision=precision,
            activation_checkpointing=checkpointing, attention=attention)["total"] <= 0.8 * memory_bytes:
        micro *= 2
    return micro


def measure(preset: str, seq_len: int, checkpointing: str, device: str, micro_batch: int, max_micro_batch: int,
            warmup: int, steps: int, compile: bool) -> dict:
    """One configuration in this process."""
    import torch
    from plan_vs_measured import TensorBytes, attention_kernel

    from minillama.config import ModelConfig
    from minillama.plan.flops import flops_per_token
    from minillama.plan.hardware import device_peak_flops
    from minillama.plan.memory import training_memory
    from minillama.plan.planner import parameter_counts
    from minillama.runtime import autocast_dtype
    from minillama.train.config import OptimConfig, TrainConfig
    from minillama.train.optim import build_optimizer
    from minillama.train.parallelize import DistributedContext
    from minillama.train.trainer import TrainStep, build_parallel_model

    cfg = ModelConfig.from_preset(preset, max_seq_len=max(seq_len, ModelConfig.from_preset(preset).max_seq_len))
    dev = torch.device(device)
    kernel = attention_kernel(device, seq_len)
    precision = autocast_dtype("auto", dev)  # as `minillama train` decides it: fp32 where bf16 is emulated
    if device == "cpu":
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        memory_bytes = torch.cuda.get_device_properties(dev).total_memory
    micro = micro_batch or pick_micro_batch(cfg, seq_len, checkpointing, kernel, memory_bytes, max_micro_batch,
                                            precision)
    tcfg = TrainConfig(seq_len=seq_len, batch_tokens=micro * seq_len, micro_batch_size=micro, dtype=precision,
                       compile=compile, activation_checkpointing=checkpointing)
    model, train_model = build_parallel_model(cfg, tcfg, DistributedContext(device=dev))
    optimizer = build_optimizer(model, OptimConfig())
    step = TrainStep(train_model, model, optimizer, micro_batch_size=micro, grad_clip=1.0, dtype=precision)
    data = torch.randint(0, cfg.vocab_size, (micro, seq_len + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = data[:, :-1].to(dev), data[:, 1:].to(dev)

    def synchronize() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    losses = [step(inputs, targets)[0] for _ in range(warmup)]  # compiles
    synchronize()
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    for _ in range(steps):
        losses.append(step(inputs, targets)[0])
    synchronize()
    seconds_per_step = (time.perf_counter() - start) / steps
    params = parameter_counts(cfg)[0]
    plan = training_memory(cfg, params, micro_batch=micro, seq_len=seq_len, precision=precision,
                           activation_checkpointing=checkpointing, attention=kernel)
    if dev.type == "cuda":
        measured, planned, what = torch.cuda.max_memory_allocated(dev), plan["total"], "max_memory_allocated"
        hardware = torch.cuda.get_device_name(dev)
    else:
        optimizer_state = [t for per_param in optimizer.state.values() for t in per_param.values()]
        resident = TensorBytes.storage_ptrs([*model.parameters(), *model.buffers(), *optimizer_state])
        with TensorBytes(resident) as tracker:
            step(inputs, targets)
        measured, planned = tracker.peak, plan["total"] - plan["weights"] - plan["optimizer"]
        what = "peak of live tensor bytes over one step vs planned total - weights - optimizer"
        hardware = f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    tokens_per_s = micro * seq_len / seconds_per_step
    peak = device_peak_flops(dev, precision)
    flops = flops_per_token(cfg, seq_len, training=True)
    return dict(preset=preset, params=params, seq_len=seq_len, activation_checkpointing=checkpointing,
                micro_batch=micro, compile=compile, attention=kernel, precision=precision, device=device,
                hardware=hardware,
                steps=steps, warmup=warmup, seconds_per_step=seconds_per_step, tokens_per_s=tokens_per_s,
                flops_per_token=flops, peak_flops=peak, mfu=tokens_per_s * flops / peak if peak else None,
                measured_memory_bytes=measured, planned_memory_bytes=planned, memory_ratio=measured / planned,
                memory_what=what, planned_peak_phase=plan["peak_phase"], losses=losses, torch=torch.__version__)


def run_subprocess(options: dict) -> dict:
    """`measure` in a fresh Python process (its JSON is the last line of stdout)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(options)], env=env, capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {options} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def target_verdict(row: dict) -> str:
    """'met', 'missed (...)' or '' for a row without targets (or not on a GPU)."""
    target = TARGETS.get((row["preset"], row["activation_checkpointing"]))
    if target is None or row["device"] == "cpu" or row["mfu"] is None:
        return ""
    min_tokens, min_mfu = target
    misses = []
    if min_tokens is not None and row["tokens_per_s"] < min_tokens:
        misses.append(f"tokens/s < {min_tokens:,}")
    if row["mfu"] < min_mfu:
        misses.append(f"MFU < {min_mfu:.0%}")
    return "met" if not misses else "missed (" + ", ".join(misses) + ")"


def print_table(rows: list[dict]) -> None:
    header = ["preset", "AC", "micro", "tokens/s", "MFU", "peak GB", "planned GB", "ratio", "s/step", "target"]
    cells = [[r["preset"], r["activation_checkpointing"], f"{r['micro_batch']}x{r['seq_len']}",
              f"{r['tokens_per_s']:,.0f}", "-" if r["mfu"] is None else f"{r['mfu']:.1%}",
              f"{r['measured_memory_bytes'] / 1e9:,.2f}", f"{r['planned_memory_bytes'] / 1e9:,.2f}",
              f"{r['memory_ratio']:.3f}", f"{r['seconds_per_step']:.3f}", target_verdict(r)] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--presets", "--preset", default=",".join(PRESETS), help="comma-separated presets")
    parser.add_argument("--checkpointing", default=",".join(CHECKPOINTING), help="comma-separated AC modes")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=0, help="sequences per step (default: the largest "
                                                                     "power of two that the planner fits)")
    parser.add_argument("--max-micro-batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile each block and the head (default: on CUDA yes, on the CPU no)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_mfu.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(**json.loads(args.worker))))
        return 0

    compile = args.compile if args.compile is not None else args.device.startswith("cuda")
    rows = []
    for preset in args.presets.split(","):
        for checkpointing in args.checkpointing.split(","):
            row = run_subprocess(dict(preset=preset, seq_len=args.seq_len, checkpointing=checkpointing,
                                      device=args.device, micro_batch=args.micro_batch,
                                      max_micro_batch=args.max_micro_batch, warmup=args.warmup, steps=args.steps,
                                      compile=compile))
            rows.append(row)
            mfu = "" if row["mfu"] is None else f", MFU {row['mfu']:.1%}"
            print(f"{preset} AC {checkpointing} {row['micro_batch']}x{args.seq_len}: {row['tokens_per_s']:,.0f} "
                  f"tokens/s{mfu}, memory {row['measured_memory_bytes'] / 1e9:,.2f} GB (planned "
                  f"{row['planned_memory_bytes'] / 1e9:,.2f}) {target_verdict(row)}", flush=True)
    print()
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(rows=rows, targets={f"{p} AC {a}": dict(tokens_per_s=t, mfu=m)
                                                       for (p, a), (t, m) in TARGETS.items()}), indent=2))
    print(f"wrote {out}")
    return 0 if all(target_verdict(r) in ("", "met") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
