"""Training throughput: minillama's full training step against Hugging Face's LlamaForCausalLM.

    python benchmarks/train_throughput.py                          # CPU: 15m (8 x 256) and 125m (4 x 256)
    python benchmarks/train_throughput.py --device cuda --batch-size 16 --seq-len 2048

One step is everything a trainer does per batch: forward, fp32 cross-entropy, backward, gradient clipping at 1.0
and AdamW (lr 3e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices only), bf16 autocast over fp32
weights. The contestants share the config (dims, GQA, tied embeddings, vocabulary), the initial weights and the
batch, so their first losses agree (printed as a check):

- `minillama`: what `minillama train` runs with train.compile = true: `parallelize` with the default
  train.fast_path (train/fast.py), `TrainStep`, `build_optimizer` (fused AdamW).
- `minillama-eager`: the same with train.compile = false.
- `minillama-plain` (only when asked for with --contestants): train.fast_path = false, compiled: model.py's own
  forward under torch.compile, what the fast path is measured against.
- `hf-eager`: LlamaForCausalLM, attn_implementation="sdpa", loss from `labels`, torch.optim.AdamW(fused=True)
  (what HF's Trainer picks on torch >= 2.8) over the same parameter groups, clip_grad_norm_(1.0).
- `hf-compiled`: the same model under torch.compile, as Trainer(torch_compile=True) does.

Each contestant lives in its own worker process, so process-wide settings stay its own: ours keeps freed memory
in glibc's heap as `minillama train` does (train/fast.py, `retain_freed_memory`); the HF workers run with the
defaults an HF user has. After warm-up (compilation) the rounds interleave: each round runs one step of every
contestant, in an order that rotates, so noise from other processes hits all of them. Tokens/s is the median
over rounds and each ratio the median of the per-round ratios. On Linux each step also records the CPU time other
processes took while it ran; "quiet" columns use only rounds where that stayed under 10% of every step.

Results: a table on stdout and JSON in benchmarks/out/train_throughput.json (the path is printed).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONTESTANTS = ["minillama", "minillama-eager", "hf-eager", "hf-compiled"]
OPTIONAL_CONTESTANTS = ["minillama-plain"]
DEFAULT_BATCH = {"15m": 8, "125m": 4}  # sequences per step when --batch-size is not given (else 8)
LR, BETAS, EPS, WEIGHT_DECAY, GRAD_CLIP = 3e-4, (0.9, 0.95), 1e-8, 0.1, 1.0


# --------------------------------------------------------------------------------------------------------------
# Workers: one process per contestant; "step" runs one training step, answered by (wall s, loss, others' CPU s).
# --------------------------------------------------------------------------------------------------------------
def build_minillama_step(cfg, inputs, targets, device: str, compile: bool, fast_path: bool | None = None):
    """train()'s setup: seeded model, build_optimizer, parallelize with the run's train.* settings, TrainStep."""
    import torch

    from minillama.model import Transformer
    from minillama.train.config import OptimConfig, TrainConfig
    from minillama.train.optim import build_optimizer
    from minillama.train.parallelize import DistributedContext, parallelize
    from minillama.train.trainer import TrainStep

    tcfg = TrainConfig(compile=compile)
    if fast_path is None:
        fast_path = tcfg.fast_path  # the trainer's default
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    optimizer = build_optimizer(model, OptimConfig(lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                                                   weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP))
    train_model = parallelize(model, DistributedContext(device=torch.device(device)), compile=tcfg.compile,
                              activation_checkpointing=tcfg.activation_checkpointing, fast_path=fast_path)
    step = TrainStep(train_model, model, optimizer, micro_batch_size=inputs.shape[0], grad_clip=GRAD_CLIP,
                     dtype="bf16")
    return lambda: step(inputs, targets)[0]


def build_hf_step(cfg, inputs, targets, device: str, compile: bool):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from minillama.interop.hf import config_to_hf, hf_state_dict
    from minillama.model import Transformer

    torch.manual_seed(0)
    ours = Transformer(cfg)  # the minillama workers' initial weights, under HF names
    hf_cfg = LlamaConfig(**{k: v for k, v in config_to_hf(cfg).items() if k != "architectures"},
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(hf_cfg)
    missing, unexpected = model.load_state_dict(hf_state_dict(ours), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights do not map onto LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    del ours
    model.to(device).train()
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([dict(params=matrices, weight_decay=WEIGHT_DECAY),
                                   dict(params=vectors, weight_decay=0.0)], lr=LR, betas=BETAS, eps=EPS, fused=True)
    forward = torch.compile(model) if compile else model

    def step() -> float:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            # shift_labels: the targets are already the next tokens, so HF scores the same T positions we do.
            loss = forward(input_ids=inputs, labels=targets, shift_labels=targets).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def _busy_cpu_s() -> float | None:
    """CPU seconds all processes have used since boot (Linux /proc/stat), None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return sum(int(fields[i]) for i in (1, 2, 3, 6, 7)) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _own_cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(conn, contestant: str, preset: str, batch_size: int, seq_len: int, device: str) -> None:
    import torch

    from minillama.config import ModelConfig

    cfg = ModelConfig.from_preset(preset)
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(1))
    inputs, targets = tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)
    compile = not contestant.endswith("eager")
    if contestant.startswith("hf"):
        step = build_hf_step(cfg, inputs, targets, device, compile)
    else:
        step = build_minillama_step(cfg, inputs, targets, device, compile,
                                    fast_path=False if contestant == "minillama-plain" else None)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    conn.send("ready")
    while conn.recv() == "step":
        sync()
        busy, own, start = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()
        loss = step()
        sync()
        wall_s = time.perf_counter() - start
        others_s = None if busy is None else max(0.0, (_busy_cpu_s() - busy) - (_own_cpu_s() - own))
        conn.send((wall_s, loss, others_s))
    conn.close()


# --------------------------------------------------------------------------------------------------------------
# The coordinator
# --------------------------------------------------------------------------------------------------------------
def run_config(preset: str, batch_size: int, seq_len: int, device: str, rounds: int, warmup: int,
               contestants: list[str]) -> dict:
    from minillama.config import ModelConfig
    from minillama.model import count_parameters

    ctx = mp.get_context("spawn")
    workers = {}
    for name in contestants:  # started and warmed up one at a time: compilation wants the whole machine
        conn, child = ctx.Pipe()
        process = ctx.Process(target=worker, args=(child, name, preset, batch_size, seq_len, device), daemon=True)
        process.start()
        child.close()  # so that a worker that dies reads as EOF here instead of a wait forever
        try:
            conn.recv()
            start, warm_losses = time.perf_counter(), []
            for _ in range(warmup):
                conn.send("step")
                warm_losses.append(conn.recv()[1])
        except EOFError:
            raise RuntimeError(f"the {name} worker for {preset} died (its traceback is above)") from None
        warm_s = time.perf_counter() - start
        print(f"  {preset} {name}: {warmup} warm-up steps in {warm_s:.1f} s, first loss {warm_losses[0]:.4f}",
              flush=True)
        workers[name] = (process, conn, warm_losses, warm_s)

    steps: dict[str, list[tuple]] = {name: [] for name in contestants}
    for r in range(rounds):
        for name in contestants[r % len(contestants):] + contestants[:r % len(contestants)]:
            workers[name][1].send("step")
            steps[name].append(workers[name][1].recv())
    for process, conn, _, _ in workers.values():
        conn.send("stop")
        process.join(timeout=60)

    tokens = batch_size * seq_len
    quiet = [r for r in range(rounds) if all(steps[n][r][2] is not None and steps[n][r][2] < 0.1 * steps[n][r][0]
                                             for n in contestants)]
    result = dict(preset=preset, params=count_parameters(ModelConfig.from_preset(preset)), batch_size=batch_size,
                  seq_len=seq_len, tokens_per_step=tokens, quiet_rounds=quiet, contestants={})
    for name in contestants:
        walls = [s[0] for s in steps[name]]
        entry = dict(step_s=walls, loss=[s[1] for s in steps[name]], others_cpu_s=[s[2] for s in steps[name]],
                     first_loss=workers[name][2][0], warmup_s=workers[name][3],
                     tokens_per_s=tokens / statistics.median(walls),
                     tokens_per_s_quiet=tokens / statistics.median([walls[r] for r in quiet]) if quiet else None)
        for base in ("hf-eager", "hf-compiled"):
            if base in contestants:
                per_round = [steps[base][r][0] / walls[r] for r in range(rounds)]
                entry[f"vs_{base}"] = statistics.median(per_round)
                entry[f"vs_{base}_quiet"] = statistics.median([per_round[r] for r in quiet]) if quiet else None
        result["contestants"][name] = entry
    return result


def print_table(results: list[dict]) -> None:
    def fmt(value, pattern: str) -> str:
        return "-" if value is None else pattern.format(value)

    print("\n| config | batch | contestant | tokens/s | step ms | first loss | vs HF eager | vs HF compiled | "
          "quiet rounds: tokens/s, vs eager, vs compiled |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for res in results:
        for name, c in res["contestants"].items():
            quiet = (f"{fmt(c['tokens_per_s_quiet'], '{:,.0f}')}, {fmt(c.get('vs_hf-eager_quiet'), '{:.2f}x')}, "
                     f"{fmt(c.get('vs_hf-compiled_quiet'), '{:.2f}x')}")
            print(f"| {res['preset']} ({res['params'] / 1e6:.0f}M) | {res['batch_size']}x{res['seq_len']} | {name} "
                  f"| {c['tokens_per_s']:,.0f} | {1000 * statistics.median(c['step_s']):,.0f} | "
                  f"{c['first_loss']:.4f} | {fmt(c.get('vs_hf-eager'), '{:.2f}x')} | "
                  f"{fmt(c.get('vs_hf-compiled'), '{:.2f}x')} | {quiet} |")
    for res in results:
        rounds = len(next(iter(res["contestants"].values()))["step_s"])
        print(f"{res['preset']}: {len(res['quiet_rounds'])} of {rounds} rounds quiet (other processes took under "
              "10% of each step's time)")


def _device_name(device: str) -> str:
    import torch

    from minillama.plan.hardware import cpu_model_name

    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return cpu_model_name()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="15m,125m", help="comma-separated presets (default 15m,125m)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"sequences per step (default per config {DEFAULT_BATCH}, else 8)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=8, help="measured steps per contestant, interleaved")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured first steps (compilation)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--contestants", default=",".join(CONTESTANTS),
                        help=f"comma-separated, from {CONTESTANTS + OPTIONAL_CONTESTANTS}")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "train_throughput.json"))
    args = parser.parse_args(argv)

    import torch
    import transformers

    contestants = [c for c in args.contestants.split(",") if c]
    unknown = set(contestants) - set(CONTESTANTS + OPTIONAL_CONTESTANTS)
    if unknown:
        parser.error(f"unknown contestants {sorted(unknown)}; known: {CONTESTANTS + OPTIONAL_CONTESTANTS}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    from minillama.config import ModelConfig

    presets = [c for c in args.configs.split(",") if c]
    for preset in presets:
        if args.seq_len > ModelConfig.from_preset(preset).max_seq_len:
            parser.error(f"--seq-len {args.seq_len} exceeds the {preset} preset's max_seq_len "
                         f"{ModelConfig.from_preset(preset).max_seq_len}; run that config with a shorter --seq-len")
    device_name = _device_name(args.device)
    print(f"device {args.device} ({device_name}), torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {torch.get_num_threads()} CPU threads", flush=True)
    results = []
    for preset in presets:
        batch = args.batch_size or DEFAULT_BATCH.get(preset, 8)
        results.append(run_config(preset, batch, args.seq_len, args.device, args.rounds, args.warmup, contestants))
    print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(device=args.device, device_name=device_name, torch=torch.__version__,
                                   transformers=transformers.__version__, cpu_threads=torch.get_num_threads(),
                                   python=platform.python_version(), rounds=args.rounds, warmup=args.warmup,
                                   results=results), indent=1))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
