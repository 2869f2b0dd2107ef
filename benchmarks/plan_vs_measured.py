"""The planner's training-memory estimate against what a real training step uses.

    python benchmarks/plan_vs_measured.py                 # CPU: tiny, 15m, 50m in bf16 autocast and fp32
    python benchmarks/plan_vs_measured.py --device cuda   # GPU: 125m and 1b (bf16)
    python benchmarks/plan_vs_measured.py --fsdp 2        # FSDP on 2 gloo ranks (CPU): 15m, per rank

Each configuration runs in a fresh subprocess, so nothing one configuration leaves behind (tensors, caches, a
leak) counts in another's peak. CPU: the worker builds the model, then reads the peak resident set size (VmHWM,
reset through /proc/self/clear_refs) over a few forward + backward + AdamW steps. The measured figure is the
growth of RSS above the process with the model built; the planned figure is the planner's peak less its weights
part. glibc is told to serve large blocks by mmap (MALLOC_MMAP_THRESHOLD_) so freed memory leaves the process and
RSS tracks live tensors.
CUDA: torch.cuda.max_memory_allocated over the same steps against the planner's total. The row also records what
the process held before the configuration began (`allocated_before_bytes`, 0 in a fresh process). Before each row
had its own process and the census below stopped leaking its models (see `saved_bytes_per_layer`), every CUDA row
after the first carried the censuses of the rows before it (509 MB per 125m row, 2,262 MB per 1b row): that is
what made 125m and 1b with full checkpointing read 1.067 and 1.168.

Each row also takes a census of the tensors autograd saves for one block (saved_tensors_hooks, deduplicated by
storage) and compares it with the planner's per-layer activation formula, so a mismatch can be traced to the
activation model (e.g. an attention kernel that keeps the T x T matrix) or to everything else.

FSDP (--fsdp N): torchrun starts N CPU ranks (gloo) that build the trainer's sharded model; each rank reports the
peak of the tensor bytes its steps create (`TensorBytes`, a census of every op's outputs, since RSS would mix in
gloo's buffers and the other rank's process), against the planner's per-GPU figure for dp = N, ZeRO-3 less the
sharded weights and AdamW state that exist before the measured steps.

The training step is the trainer's own (`minillama.train.trainer.TrainStep`: autocast, fp32 cross-entropy,
backward, clip, fused AdamW, zero_grad(set_to_none)). Results: a table on stdout and JSON in
benchmarks/results/plan_vs_measured_cpu.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CPU_RUNS = [  # (preset, micro-batch, seq_len, accumulation, activation checkpointing)
    ("tiny", 8, 256, 1, "none"), ("tiny", 4, 256, 2, "none"), ("15m", 4, 512, 1, "none"),
    ("15m", 4, 512, 1, "full"), ("50m", 2, 1024, 1, "none"),
]
FSDP_RUNS = [("15m", 4, 256, 1, "none"), ("15m", 4, 256, 1, "full")]  # --fsdp N: per rank, CPU, gloo
CUDA_RUNS = [("125m", 8, 2048, 1, "none"), ("125m", 8, 2048, 1, "full"), ("1b", 4, 2048, 1, "none"),
             ("1b", 4, 2048, 1, "full")]


# --------------------------------------------------------------------------------------------------------------
# The training step: the trainer's own.
# --------------------------------------------------------------------------------------------------------------
def build_training(cfg, device: str, dtype: str, micro_batch: int, activation_checkpointing: str):
    """The trainer's own model and step: `build_model` (meta -> device -> seeded init, train.attention = auto),
    `build_optimizer`, `parallelize` (activation checkpointing) and `TrainStep`. On CPU the attention kernel is
    the blocked one up to 1,024 positions, which keeps its softmax probabilities: the planner is asked for the
    same kernel."""
    import torch

    from minillama.train.config import OptimConfig, TrainConfig
    from minillama.train.optim import build_optimizer
    from minillama.train.parallelize import DistributedContext, parallelize
    from minillama.train.trainer import TrainStep, build_model

    model = build_model(cfg, TrainConfig(), torch.device(device))
    optimizer = build_optimizer(model, OptimConfig())
    train_model = parallelize(model, DistributedContext(device=torch.device(device)),
                              activation_checkpointing=activation_checkpointing)
    train_step = TrainStep(train_model, model, optimizer, micro_batch_size=micro_batch, grad_clip=1.0, dtype=dtype)
    return model, train_step, "minillama.train.trainer.TrainStep"


def attention_kernel(device: str, seq_len: int) -> str:
    """The kernel the trainer's default (train.attention = auto) runs at this length on this device."""
    import torch

    from minillama.kernels import use_blocked_attention

    return "blocked" if use_blocked_attention("auto", torch.device(device), seq_len) else "sdpa"


# --------------------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------------------
def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class TensorBytes:
    """Bytes of tensor storage created while it is active, alive now and at their peak: CUDA's
    memory_allocated / max_memory_allocated for any device, the CPU included, by watching every op's outputs.

    A TorchDispatchMode sees each op's output tensors; a storage first seen adds its bytes and a weakref
    finalizer takes them off when it is freed (a storage keeps its Python object while it lives, so the
    finalizer runs exactly then). Storages that existed before (`exclude`: the weights, buffers, AdamW state)
    are never counted, even when an in-place op returns them. DTensor outputs count their local shard. What
    allocates outside the dispatcher (gloo's buffers, the allocator's slack) is not seen: this counts tensors,
    which is what the planner counts."""

    def __init__(self, exclude: set[int] = frozenset()) -> None:
        self.exclude, self.live, self.now, self.peak = set(exclude), {}, 0, 0

    @staticmethod
    def storage_ptrs(tensors) -> set[int]:
        """Storage addresses of `tensors` (local shards of DTensors): what `exclude` takes."""
        return {_local(t).untyped_storage().data_ptr() for t in tensors}

    def _free(self, ptr: int) -> None:
        self.now -= self.live.pop(ptr)

    def _seen(self, tensor) -> None:
        import weakref

        storage = _local(tensor).untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in self.exclude and ptr not in self.live and tensor.device.type != "meta":
            self.live[ptr] = storage.nbytes()
            self.now += storage.nbytes()
            weakref.finalize(storage, self._free, ptr)
            self.peak = max(self.peak, self.now)

    def __enter__(self) -> TensorBytes:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for tensor in tree_flatten(out)[0]:
                    if isinstance(tensor, torch.Tensor):
                        tracker._seen(tensor)
                return out

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)


def _local(tensor):
    """A DTensor's local shard (the memory this rank holds), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def saved_bytes_per_layer(cfg, device: str, dtype: str, tokens: int = 256, seq_len: int | None = None) -> float:
    """Bytes per token autograd saves for one block, by census: (saved with 2 layers - saved with 1 layer),
    leaving out parameters and autocast's weight copies, divided by the tokens.

    The pack hook keeps each saved tensor in a list of its own (so storage addresses stay distinct while the census
    runs) and hands autograd a placeholder. Returning the tensor itself from the hook would make a reference cycle
    for every tensor saved by the op that produced it (tensor -> grad_fn -> saved slot -> tensor) that Python's gc
    cannot see into: the census models, their graphs and autocast's weight copies would then live for the rest of
    the process (509 MB for 125m, 2,262 MB for 1b) and count in every later CUDA row's max_memory_allocated."""
    import dataclasses

    import torch
    import torch.nn.functional as F

    from minillama.model import Transformer
    from minillama.plan.flops import layer_matmul_params

    seq = min(seq_len or tokens, cfg.max_seq_len)
    tokens = max(1, tokens // seq) * seq

    def census(n_layers: int) -> int:
        small = dataclasses.replace(cfg, n_layers=n_layers)
        torch.manual_seed(0)
        model = Transformer(small, attention=attention_kernel(device, seq)).to(device)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        kept: dict[int, int] = {}
        alive: list = []  # the saved tensors, held here rather than by the graph

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                kept[storage.data_ptr()] = storage.nbytes()
            alive.append(t)
            return None  # never unpacked: no backward runs

        x = torch.randint(0, cfg.vocab_size, (max(1, tokens // seq), seq), device=device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda packed: packed):
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                F.cross_entropy(model(x).float().flatten(0, 1), x.flatten())
        alive.clear()
        return sum(kept.values())

    weight_copies = 2 * sum(layer_matmul_params(cfg).values()) if dtype == "bf16" else 0
    return (census(2) - census(1) - weight_copies) / tokens


def planned(cfg, micro_batch: int, seq_len: int, dtype: str, accumulation: int, ac: str, device: str) -> dict:
    from minillama.plan.memory import layer_activation_bytes, training_memory
    from minillama.plan.planner import parameter_counts

    params = parameter_counts(cfg)[0]
    kernel = attention_kernel(device, seq_len)
    plan = training_memory(cfg, params, micro_batch=micro_batch, seq_len=seq_len, precision=dtype,
                           activation_checkpointing=ac, grad_accum=accumulation, attention=kernel)
    plan["layer_activation_bytes_per_token"] = layer_activation_bytes(cfg, dtype, "none", kernel, seq_len)
    plan["attention"] = kernel
    return plan


def measure(preset: str, micro_batch: int, seq_len: int, accumulation: int, ac: str, dtype: str, device: str,
            steps: int) -> dict:
    """One configuration in this process: the measured peak and the planner's figures."""
    import torch

    from minillama.config import ModelConfig

    cfg = ModelConfig.from_preset(preset)
    allocated_before = torch.cuda.memory_allocated() if device != "cpu" else None  # leftovers, if any
    torch.manual_seed(0)
    batch = micro_batch * accumulation
    data = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1))
    inputs, targets = data[:, :-1].to(device), data[:, 1:].to(device)
    plan = planned(cfg, micro_batch, seq_len, dtype, accumulation, ac, device)
    # Warm-up on a throwaway model of the same shape and batch: the first step pages in kernel code, starts
    # thread pools and JIT-compiles kernels for these shapes (oneDNN keeps them in its primitive cache). None of
    # that is training memory; all of it would count in RSS.
    warm_model, warm_step, _ = build_training(cfg, device, dtype, micro_batch, ac)
    warm_step(inputs, targets)
    del warm_model, warm_step
    gc.collect()
    if device == "cpu":
        rss_before_model_kib = proc_status_kib("VmRSS")
    model, step, step_name = build_training(cfg, device, dtype, micro_batch, ac)
    gc.collect()
    start = time.perf_counter()
    if device == "cpu":
        baseline = proc_status_kib("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        for _ in range(steps):
            step(inputs, targets)
        peak = proc_status_kib("VmHWM") * 1024
        measured = peak - baseline
        planned_figure = plan["total"] - plan["weights"]
        weights_measured = baseline - rss_before_model_kib * 1024
    else:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            step(inputs, targets)
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated()
        planned_figure = plan["total"]
        weights_measured = None
    seconds_per_step = (time.perf_counter() - start) / steps
    del model, step
    gc.collect()
    census = saved_bytes_per_layer(cfg, device, dtype, tokens=2 * seq_len, seq_len=seq_len)
    return dict(preset=preset, device=device, dtype=dtype, micro_batch=micro_batch, seq_len=seq_len,
                accumulation=accumulation, activation_checkpointing=ac, steps=steps, train_step=step_name,
                attention=plan["attention"],
                measured_bytes=measured, planned_bytes=planned_figure, ratio=measured / planned_figure,
                what=("RSS growth above the built model vs planned total - weights" if device == "cpu"
                      else "max_memory_allocated vs planned total"),
                weights_rss_bytes=weights_measured, planned_weights_bytes=plan["weights"],
                allocated_before_bytes=allocated_before,
                planned_parts={k: plan[k] for k in ("weights", "gradients", "optimizer", "activations",
                                                    "working_weights", "total")},
                planned_peak_phase=plan["peak_phase"], census_layer_bytes_per_token=census,
                planned_layer_bytes_per_token=plan["layer_activation_bytes_per_token"],
                seconds_per_step=seconds_per_step, torch=torch.__version__)


def measure_fsdp_rank(preset: str, micro_batch: int, seq_len: int, ac: str, dtype: str, steps: int) -> dict:
    """One rank of an FSDP job (started by torchrun, gloo on the CPU): the trainer's own sharded model
    (`build_parallel_model`), AdamW and `TrainStep`, and the peak of the tensor memory its steps create
    (`TensorBytes`: the sharded weights existed before and are left out; the gathered weights, activations,
    gradients and the AdamW state created in the first step are in), against the planner's per-GPU figure for
    dp = world size, ZeRO-3, less its (sharded) weights part."""
    import torch

    from minillama.config import ModelConfig
    from minillama.plan.memory import training_memory
    from minillama.plan.planner import parameter_counts
    from minillama.train.config import OptimConfig, TrainConfig
    from minillama.train.optim import build_optimizer
    from minillama.train.parallelize import DistributedContext
    from minillama.train.trainer import TrainStep, build_parallel_model

    dist = DistributedContext.from_environment("cpu")
    cfg = ModelConfig.from_preset(preset)
    tcfg = TrainConfig(parallel="fsdp", dtype=dtype, activation_checkpointing=ac, seq_len=seq_len,
                       batch_tokens=micro_batch * seq_len * dist.world_size, micro_batch_size=micro_batch)
    model, train_model = build_parallel_model(cfg, tcfg, dist)
    optimizer = build_optimizer(model, OptimConfig())
    step = TrainStep(train_model, model, optimizer, micro_batch_size=micro_batch, grad_clip=1.0, dtype=dtype,
                     dist=dist)
    data = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len + 1),
                         generator=torch.Generator().manual_seed(dist.rank))
    step(data[:, :-1], data[:, 1:])  # warm-up, outside the count: it makes the AdamW state, counted below
    gc.collect()
    optimizer_state = [t for per_param in optimizer.state.values() for t in per_param.values()]
    resident = TensorBytes.storage_ptrs([*model.parameters(), *model.buffers(), *optimizer_state])
    start = time.perf_counter()
    with TensorBytes(resident) as tracker:
        for _ in range(steps):
            step(data[:, :-1], data[:, 1:])
    seconds_per_step = (time.perf_counter() - start) / steps
    kernel = attention_kernel("cpu", seq_len)
    plan = training_memory(cfg, parameter_counts(cfg)[0], micro_batch=micro_batch, seq_len=seq_len,
                           precision=dtype, dp=dist.world_size, zero=3, activation_checkpointing=ac,
                           attention=kernel)
    planned_figure = plan["total"] - plan["weights"] - plan["optimizer"]
    dist.close()
    return dict(preset=preset, device="cpu", dtype=dtype, micro_batch=micro_batch, seq_len=seq_len,
                accumulation=1, activation_checkpointing=ac, steps=steps, train_step="fsdp", rank=dist.rank,
                world_size=dist.world_size, attention=kernel, measured_bytes=tracker.peak,
                planned_bytes=planned_figure, ratio=tracker.peak / planned_figure,
                what="per-rank peak of tensor bytes (TensorBytes) vs planned total - weights - optimizer "
                     "(dp = world size, ZeRO-3)",
                planned_parts={k: plan[k] for k in ("weights", "gradients", "optimizer", "activations",
                                                    "working_weights", "total")},
                planned_peak_phase=plan["peak_phase"], census_layer_bytes_per_token=float("nan"),
                planned_layer_bytes_per_token=float("nan"), seconds_per_step=seconds_per_step,
                torch=torch.__version__)


def run_fsdp(run: tuple, dtype: str, steps: int, ranks: int = 2) -> list[dict]:
    """`measure_fsdp_rank` on `ranks` CPU processes under torchrun (gloo, a free loopback port): one row per
    rank."""
    import socket
    import tempfile

    preset, micro, seq, _accumulation, ac = run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(ranks),
               "--master-addr", "127.0.0.1", "--master-port", str(port), __file__, "--fsdp-worker",
               json.dumps([preset, micro, seq, ac, dtype, steps, tmp])]
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        if sys.platform.startswith("linux"):  # gloo on loopback, whatever the hostname resolves to
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"FSDP worker {run} {dtype} failed:\n{out.stderr[-3000:]}")
        return [json.loads(Path(tmp, f"rank-{rank}.json").read_text()) for rank in range(ranks)]


def run_subprocess(run: tuple, dtype: str, steps: int, device: str = "cpu") -> dict:
    """`measure` for one configuration in a fresh Python process (its JSON is the last line of stdout)."""
    preset, micro, seq, accum, ac = run
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__, "--worker", json.dumps([preset, micro, seq, accum, ac, dtype, steps, device])]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {run} {dtype} on {device} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict]) -> None:
    header = ["preset", "dtype", "batch", "accum", "AC", "measured MB", "planned MB", "ratio", "peak phase",
              "layer B/tok census/plan", "s/step"]
    cells = [[r["preset"], r["dtype"], f"{r['micro_batch']}x{r['seq_len']}", str(r["accumulation"]),
              r["activation_checkpointing"], f"{r['measured_bytes'] / 1e6:,.1f}", f"{r['planned_bytes'] / 1e6:,.1f}",
              f"{r['ratio']:.3f}", r["planned_peak_phase"],
              f"{r['census_layer_bytes_per_token']:,.0f}/{r['planned_layer_bytes_per_token']:,.0f}",
              f"{r['seconds_per_step']:.2f}"] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtypes", default=None, help="comma-separated: bf16,fp32 (cpu default both; cuda bf16)")
    parser.add_argument("--presets", default=None, help="comma-separated subset of the runs' presets")
    parser.add_argument("--steps", type=int, default=2, help="training steps measured per configuration")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "plan_vs_measured_cpu.json"))
    parser.add_argument("--fsdp", type=int, default=0, metavar="N",
                        help="instead: FSDP on N gloo ranks (CPU), each rank's peak against the planner's dp=N ZeRO-3")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--fsdp-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        preset, micro, seq, accum, ac, dtype, steps, device = json.loads(args.worker)
        print(json.dumps(measure(preset, micro, seq, accum, ac, dtype, device, steps)))
        return
    if args.fsdp_worker:
        preset, micro, seq, ac, dtype, steps, out_dir = json.loads(args.fsdp_worker)
        row = measure_fsdp_rank(preset, micro, seq, ac, dtype, steps)
        Path(out_dir, f"rank-{row['rank']}.json").write_text(json.dumps(row))
        return

    runs = FSDP_RUNS if args.fsdp else CPU_RUNS if args.device == "cpu" else CUDA_RUNS
    if args.presets:
        runs = [r for r in runs if r[0] in args.presets.split(",")]
    dtypes = (args.dtypes or ("bf16,fp32" if args.device == "cpu" else "bf16")).split(",")
    rows = []
    for run in runs:
        for dtype in dtypes:
            if args.fsdp:
                ranks = run_fsdp(run, dtype, args.steps, args.fsdp)
                rows.extend(ranks)
                row = max(ranks, key=lambda r: abs(r["ratio"] - 1))
            else:
                row = run_subprocess(run, dtype, args.steps, args.device)
                rows.append(row)
            before = row.get("allocated_before_bytes")
            print(f"{row['preset']} {dtype} {run[1]}x{run[2]} accum {run[3]} AC {run[4]}: measured "
                  f"{row['measured_bytes'] / 1e6:,.1f} MB, planned {row['planned_bytes'] / 1e6:,.1f} MB, "
                  f"ratio {row['ratio']:.3f}" + ("" if before is None else
                                                 f", allocated before the row {before / 1e6:,.1f} MB"), flush=True)
    print()
    print_table(rows)
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"\nworst |ratio - 1| = {worst:.3f} (target <= 0.15)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(device=args.device, rows=rows, worst_abs_error=worst), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
