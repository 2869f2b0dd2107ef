"""Training throughput: minillama's full training step against Hugging Face's LlamaForCausalLM at its best.

    python benchmarks/train_throughput.py                          # CPU: 15m (8 x 256) and 125m (4 x 256)
    python benchmarks/train_throughput.py --baseline ../old-checkout --contestants minillama,minillama-baseline
    python benchmarks/train_throughput.py --device cuda --batch-size 16 --seq-len 2048

One step is everything a trainer does per batch: forward, fp32 cross-entropy, backward, gradient clipping at 1.0
and AdamW (lr 3e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices only), bf16 autocast over fp32
weights. The contestants share the config (dims, GQA, tied embeddings, vocabulary), the initial weights and the
batch, so their first losses must agree (checked: the run fails if any differs by more than 1e-3 relative):

- `minillama`: what `minillama train` runs with train.compile = true: `build_model` (train.attention = auto: the
  blocked kernel on CPU), `parallelize` (each block and the loss head compiled), `TrainStep`, fused AdamW.
- `minillama-eager`: the same with train.compile = false.
- `minillama-baseline` (with --baseline DIR): the `minillama` contestant as the code in DIR builds it (DIR's own
  benchmarks/train_throughput.py), e.g. a git worktree of an earlier commit, to measure a change side by side.
- `hf-sdpa-eager`, `hf-sdpa-compiled`: LlamaForCausalLM with attn_implementation="sdpa", loss from `labels`,
  torch.optim.AdamW(fused=True) over the same parameter groups, clip_grad_norm_(1.0); compiled as
  Trainer(torch_compile=True) does.
- `hf-matmul-eager`, `hf-matmul-compiled`: the same with attn_implementation="eager" (HF's plain matmul
  attention; on CPU its backward is much faster than the flash kernel sdpa picks, and compiled it is HF's best).

Process settings: every contestant keeps freed memory in glibc's heap (`minillama.runtime.retain_freed_memory`,
what `minillama train` does), so the heap is not part of the comparison. A `+system-heap` suffix on a contestant's
name (e.g. `minillama+system-heap`, `hf-matmul-compiled+system-heap`) runs it with glibc's defaults instead: the
ablation of what the heap setting is worth.

Each contestant lives in its own worker process. After warm-up (compilation) the rounds interleave: each round
runs one step of every contestant, in an order that rotates, so noise from other processes hits all of them.
Tokens/s is the median over rounds. Ratios are against Hugging Face's fastest eager and fastest compiled
contestants in this run (by median tokens/s), each the median of the per-round ratios. On Linux each step also
records the CPU time other processes took while it ran; "quiet" columns use only rounds where that stayed under
10% of every step.

Results: a table on stdout and JSON (default benchmarks/results/train_throughput.json; --out to name another).
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

CONTESTANTS = ["minillama", "minillama-eager", "hf-sdpa-eager", "hf-sdpa-compiled", "hf-matmul-eager",
               "hf-matmul-compiled"]
OPTIONAL_CONTESTANTS = ["minillama-baseline"]
SYSTEM_HEAP = "+system-heap"
FIRST_LOSS_RTOL = 1e-3
DEFAULT_BATCH = {"15m": 8, "125m": 4}  # sequences per step when --batch-size is not given (else 8)
LR, BETAS, EPS, WEIGHT_DECAY, GRAD_CLIP = 3e-4, (0.9, 0.95), 1e-8, 0.1, 1.0


# --------------------------------------------------------------------------------------------------------------
# Workers: one process per contestant; "step" runs one training step, answered by (wall s, loss, others' CPU s).
# --------------------------------------------------------------------------------------------------------------
def build_minillama_step(cfg, inputs, targets, device: str, compile: bool):
    """train()'s setup with the run's train.* defaults: the model (train.attention = auto), `build_optimizer`,
    `parallelize`, `TrainStep`. The weights are `initial_weights`, as every contestant's."""
    import torch

    from minillama.model import Transformer
    from minillama.train.config import OptimConfig, TrainConfig
    from minillama.train.optim import build_optimizer
    from minillama.train.parallelize import DistributedContext, parallelize
    from minillama.train.trainer import TrainStep

    tcfg = TrainConfig(compile=compile)
    model = Transformer(cfg, attention=tcfg.attention, dropout=tcfg.dropout).to(device)
    model.load_state_dict(initial_weights(cfg))
    optimizer = build_optimizer(model, OptimConfig(lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                                                   weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP))
    train_model = parallelize(model, DistributedContext(device=torch.device(device)), compile=tcfg.compile,
                              activation_checkpointing=tcfg.activation_checkpointing)
    step = TrainStep(train_model, model, optimizer, micro_batch_size=inputs.shape[0], grad_clip=GRAD_CLIP,
                     dtype="bf16")
    return lambda: step(inputs, targets)[0]


def initial_weights(cfg) -> dict:
    """The weights every contestant starts from: `Transformer(cfg)` built on the CPU after torch.manual_seed(0),
    as this script has always made them (so a baseline checkout's own contestant starts from the same)."""
    import torch

    from minillama.model import Transformer

    torch.manual_seed(0)
    return Transformer(cfg).state_dict()


def build_baseline_step(baseline: str, cfg, inputs, targets, device: str):
    """The `minillama` contestant as the checkout in `baseline` builds it (its own benchmark script)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_bench", Path(baseline) / "benchmarks" /
                                                  "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_minillama_step(cfg, inputs, targets, device, True)


def build_hf_step(cfg, inputs, targets, device: str, compile: bool, attention: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from minillama.interop.hf import config_to_hf, hf_state_dict
    from minillama.model import Transformer

    ours = Transformer(cfg)
    ours.load_state_dict(initial_weights(cfg))  # the minillama workers' initial weights
    hf_cfg = LlamaConfig(**{k: v for k, v in config_to_hf(cfg).items() if k != "architectures"},
                         attn_implementation=attention)
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


def worker(conn, contestant: str, preset: str, batch_size: int, seq_len: int, device: str,
           baseline: str | None) -> None:
    name, _, heap = contestant.partition("+")
    if name == "minillama-baseline":
        sys.path.insert(0, str(Path(baseline).resolve()))  # its minillama package, before ours
    import torch

    from minillama.config import ModelConfig

    if "+" + heap != SYSTEM_HEAP and name != "minillama-baseline":  # the baseline's parallelize sets it itself
        from minillama.runtime import retain_freed_memory

        retain_freed_memory()
    cfg = ModelConfig.from_preset(preset)
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(1))
    inputs, targets = tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)
    compile = not name.endswith("eager")
    if name.startswith("hf-"):
        step = build_hf_step(cfg, inputs, targets, device, compile, attention=name.split("-")[1].replace(
            "matmul", "eager"))
    elif name == "minillama-baseline":
        step = build_baseline_step(baseline, cfg, inputs, targets, device)
    else:
        step = build_minillama_step(cfg, inputs, targets, device, compile)
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
def fastest(result: dict, prefix: str, suffix: str) -> str | None:
    """The HF contestant with the highest median tokens/s among those named prefix...suffix."""
    names = [n for n in result["contestants"] if n.startswith(prefix) and n.endswith(suffix)]
    return max(names, key=lambda n: result["contestants"][n]["tokens_per_s"], default=None)


def run_config(preset: str, batch_size: int, seq_len: int, device: str, rounds: int, warmup: int,
               contestants: list[str], baseline: str | None = None) -> dict:
    from minillama.config import ModelConfig
    from minillama.model import count_parameters

    ctx = mp.get_context("spawn")
    workers = {}
    for name in contestants:  # started and warmed up one at a time: compilation wants the whole machine
        conn, child = ctx.Pipe()
        process = ctx.Process(target=worker, args=(child, name, preset, batch_size, seq_len, device, baseline),
                              daemon=True)
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
        result["contestants"][name] = dict(
            step_s=walls, loss=[s[1] for s in steps[name]], others_cpu_s=[s[2] for s in steps[name]],
            first_loss=workers[name][2][0], warmup_s=workers[name][3], tokens_per_s=tokens / statistics.median(walls),
            tokens_per_s_quiet=tokens / statistics.median([walls[r] for r in quiet]) if quiet else None)
    first = {name: c["first_loss"] for name, c in result["contestants"].items()}
    reference = next(iter(first.values()))
    disagree = {n: v for n, v in first.items() if abs(v - reference) > FIRST_LOSS_RTOL * abs(reference)}
    if disagree:
        raise RuntimeError(f"{preset}: the contestants' first losses disagree (same weights and batch): {first}")
    result["first_losses_agree"] = True
    # Against HF at its best: the fastest eager and the fastest compiled configuration of this run.
    for kind, base in (("eager", fastest(result, "hf-", "-eager")), ("compiled", fastest(result, "hf-", "-compiled"))):
        result[f"hf_fastest_{kind}"] = base
        if base is None:
            continue
        for name, entry in result["contestants"].items():
            per_round = [steps[base][r][0] / steps[name][r][0] for r in range(rounds)]
            entry[f"vs_hf_fastest_{kind}"] = statistics.median(per_round)
            entry[f"vs_hf_fastest_{kind}_quiet"] = statistics.median([per_round[r] for r in quiet]) if quiet else None
    if "minillama-baseline" in contestants:
        for name, entry in result["contestants"].items():
            per_round = [steps["minillama-baseline"][r][0] / steps[name][r][0] for r in range(rounds)]
            entry["vs_baseline"] = statistics.median(per_round)
            entry["vs_baseline_quiet"] = statistics.median([per_round[r] for r in quiet]) if quiet else None
    return result


def print_table(results: list[dict]) -> None:
    def fmt(value, pattern: str) -> str:
        return "-" if value is None else pattern.format(value)

    baseline = any("vs_baseline" in c for res in results for c in res["contestants"].values())
    print("\n| config | batch | contestant | tokens/s | step ms | first loss | vs HF fastest eager | "
          "vs HF fastest compiled |" + (" vs baseline |" if baseline else "") +
          " quiet rounds: tokens/s, vs eager, vs compiled |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if baseline else "") + " ---: |")
    for res in results:
        for name, c in res["contestants"].items():
            quiet = ", ".join([fmt(c["tokens_per_s_quiet"], "{:,.0f}"),
                               fmt(c.get("vs_hf_fastest_eager_quiet"), "{:.2f}x"),
                               fmt(c.get("vs_hf_fastest_compiled_quiet"), "{:.2f}x")])
            print(f"| {res['preset']} ({res['params'] / 1e6:.0f}M) | {res['batch_size']}x{res['seq_len']} | {name} "
                  f"| {c['tokens_per_s']:,.0f} | {1000 * statistics.median(c['step_s']):,.0f} | "
                  f"{c['first_loss']:.4f} | {fmt(c.get('vs_hf_fastest_eager'), '{:.2f}x')} | "
                  f"{fmt(c.get('vs_hf_fastest_compiled'), '{:.2f}x')} |" +
                  (f" {fmt(c.get('vs_baseline'), '{:.3f}x')} |" if baseline else "") + f" {quiet} |")
    for res in results:
        rounds = len(next(iter(res["contestants"].values()))["step_s"])
        print(f"{res['preset']}: HF fastest eager = {res['hf_fastest_eager']}, fastest compiled = "
              f"{res['hf_fastest_compiled']}; {len(res['quiet_rounds'])} of {rounds} rounds quiet (other processes "
              "took under 10% of each step's time); first losses agree to 1e-3")


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
    parser.add_argument("--baseline", help="a checkout (e.g. a git worktree of an earlier commit) for "
                                           "the minillama-baseline contestant")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_throughput.json"))
    args = parser.parse_args(argv)

    import torch
    import transformers

    contestants = [c for c in args.contestants.split(",") if c]
    unknown = {c.removesuffix(SYSTEM_HEAP) for c in contestants} - set(CONTESTANTS + OPTIONAL_CONTESTANTS)
    if unknown:
        parser.error(f"unknown contestants {sorted(unknown)}; known: {CONTESTANTS + OPTIONAL_CONTESTANTS}")
    if "minillama-baseline" in contestants and not (args.baseline and (Path(args.baseline) / "minillama").is_dir()):
        parser.error("minillama-baseline needs --baseline DIR, a checkout with a minillama/ package")
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
        results.append(run_config(preset, batch, args.seq_len, args.device, args.rounds, args.warmup, contestants,
                                  args.baseline))
    print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(device=args.device, device_name=device_name, torch=torch.__version__,
                                   transformers=transformers.__version__, cpu_threads=torch.get_num_threads(),
                                   python=platform.python_version(), rounds=args.rounds, warmup=args.warmup,
                                   baseline=args.baseline, argv=sys.argv[1:], results=results), indent=1))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
