"""Where a training step's peak memory goes: phase by phase, and on CUDA tensor by tensor.

    python benchmarks/cuda_memory_probe.py                  # 125m 8x2048 and 1b 4x2048, full checkpointing, CUDA
    python benchmarks/cuda_memory_probe.py --old-census \\
        --configs 125m:8x2048:none,125m:8x2048:full,1b:4x2048:none,1b:4x2048:full    # the old benchmark, replayed
    python benchmarks/cuda_memory_probe.py --device cpu --configs tiny:4x128:full  # smoke test (RSS, no tensors)

The configurations run one after another in this process, in the order given, as the CUDA benchmark used to run
its rows. Each is measured the way `plan_vs_measured.py` measures it (its `build_training`: the trainer's
`TrainStep`; a warm-up step on a throwaway model, then a new model and `--steps` steps) and reports:

  * the memory the process held before the configuration began: anything an earlier one left behind;
  * the peak against the planner's total and phase;
  * a timeline of the last step: memory allocated at the end of each interval and the peak inside it. Interval
    boundaries are hooks: each block's forward, the final norm (head forward + loss + the loss's backward up to
    the gradient of the logits), the gradient of the logits (output head backward), the gradient of each block's
    output (that block's recompute + backward), AdamW's step;
  * on CUDA, the tensors alive at the peak, replayed from torch.cuda.memory._record_memory_history over the
    measured steps: the largest blocks and the largest allocation sites, frames trimmed to minillama / autograd
    node / aten op names. What was allocated before recording began (weights, leftovers) is one "untracked" line.

`--old-census` runs, after each configuration, the census of saved tensors the benchmark used to take (its
saved_tensors_hooks pack hook returned the tensor itself, which leaks the census models and graphs) to reproduce
the old benchmark's numbers. `--snapshot-dir DIR` also writes each configuration's snapshot for
https://pytorch.org/memory_viz.
"""

from __future__ import annotations

import argparse
import gc
import pickle
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MB = 1e6


# --------------------------------------------------------------------------------------------------------------
# Memory counters: CUDA allocator statistics, or (CPU smoke test) the process's resident set.
# --------------------------------------------------------------------------------------------------------------
class CudaMemory:
    def __init__(self):
        import torch

        self.torch = torch

    def allocated(self) -> int:
        return self.torch.cuda.memory_allocated()

    def peak(self) -> int:
        return self.torch.cuda.max_memory_allocated()

    def reset_peak(self) -> None:
        self.torch.cuda.reset_peak_memory_stats()

    def sync(self) -> None:
        self.torch.cuda.synchronize()


class RssMemory:
    """VmRSS and VmHWM (reset through /proc/self/clear_refs): with MALLOC_MMAP_THRESHOLD_ set low, close to the
    bytes of live tensors plus the process's own footprint."""

    @staticmethod
    def _kib(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise RuntimeError(field)

    def allocated(self) -> int:
        return self._kib("VmRSS") * 1024

    def peak(self) -> int:
        return self._kib("VmHWM") * 1024

    def reset_peak(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def sync(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------------------
# The phase timeline
# --------------------------------------------------------------------------------------------------------------
class Timeline:
    """`mark(label)` closes the running interval (recording its peak and the memory at its end) and opens one
    called `label`. Hooks call it from the autograd thread too; the allocator's counters are thread-safe."""

    def __init__(self, mem):
        self.mem, self.label, self.intervals, self.on = mem, None, [], False

    def start(self, label: str) -> None:
        self.mem.sync()
        self.mem.reset_peak()
        self.label, self.on = label, True

    def mark(self, label: str) -> None:
        if not self.on:
            return
        now, peak = self.mem.allocated(), self.mem.peak()
        self.intervals.append((self.label, max(peak, now), now))
        self.mem.reset_peak()
        self.label = label

    def stop(self) -> None:
        self.mem.sync()
        self.mark(None)
        self.on = False


def instrument(model, timeline: Timeline, step_label, recompute: bool) -> list:
    """Hooks that mark the timeline's intervals; returns the handles."""
    import torch

    n = len(model.layers)
    handles = []
    backward = "recompute + backward" if recompute else "backward"

    def in_forward() -> bool:
        return torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1

    def block_pre(i):
        def hook(module, args):
            if not in_forward():
                return
            timeline.mark(f"{step_label()}forward block {i}")
            x = args[0]
            if x.requires_grad:  # the gradient of block i's input: block i's backward is done
                after = f"block {i - 1} {backward}" if i > 0 else "embedding backward, autocast exit, clip"
                x.register_hook(lambda grad: timeline.mark(f"{step_label()}{after}"))
        return hook

    for i, block in enumerate(model.layers):
        handles.append(block.register_forward_pre_hook(block_pre(i)))

    def norm_pre(module, args):
        if not in_forward():
            return
        timeline.mark(f"{step_label()}head forward, loss, loss backward")
        if args[0].requires_grad:
            args[0].register_hook(lambda grad: timeline.mark(f"{step_label()}block {n - 1} {backward}"))

    def output_post(module, args, out):
        if in_forward() and out.requires_grad:
            out.register_hook(lambda grad: timeline.mark(f"{step_label()}output head backward"))

    handles.append(model.norm.register_forward_pre_hook(norm_pre))
    handles.append(model.output.register_forward_hook(output_post))
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    handles.append(register_optimizer_step_pre_hook(lambda opt, args, kwargs: timeline.mark(f"{step_label()}AdamW")))
    handles.append(register_optimizer_step_post_hook(
        lambda opt, args, kwargs: timeline.mark(f"{step_label()}zero_grad, end of step")))
    return handles


# --------------------------------------------------------------------------------------------------------------
# Tensors alive at the peak, from the allocator's trace
# --------------------------------------------------------------------------------------------------------------
_NODE = re.compile(r"autograd::(?:generated::)?(\w+)::apply")
_OP = re.compile(r"at::_ops::(\w+)::")


def site(frames: list[dict]) -> str:
    """A short name for where a block was allocated: the aten op, the autograd node that ran it (backward), and
    the innermost minillama/benchmark Python frame; "(recompute)" inside checkpoint's recomputation."""
    names = [f.get("name", "") for f in frames]
    files = [f.get("filename", "") for f in frames]
    op = next((m.group(1) for m in map(_OP.search, names) if m), None)
    node = next((m.group(1) for m in map(_NODE.search, names) if m), None)
    py = next((f"{Path(fn).name}:{f.get('line')} {f.get('name')}" for fn, f in zip(files, frames)
               if fn.endswith(".py") and ("minillama" in fn or "benchmarks" in fn)), None)
    torch_py = next((f"{Path(fn).name}:{f.get('name')}" for fn, f in zip(files, frames)
                     if fn.endswith(".py") and "/torch/" in fn and "checkpoint.py" not in fn), None)
    recompute = any(fn.endswith("checkpoint.py") for fn in files)
    parts = [op or "?"]
    if node:
        parts.append(f"in {node}")
    parts.append(f"@ {py}" if py else (f"@ {torch_py}" if torch_py else ""))
    if recompute:
        parts.append("(recompute)")
    return " ".join(p for p in parts if p)


def replay(trace: list[dict], untracked: int) -> tuple[int, dict, int]:
    """The peak of (untracked + allocated since recording began), the blocks alive then, and how much of the
    untracked memory had been freed by then."""
    def frees(ev):
        return ev["action"] in ("free_requested", "free")

    live, current, freed_untracked, peak, peak_at = {}, 0, 0, untracked, -1
    for k, ev in enumerate(trace):
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev["size"]
            current += ev["size"]
        elif frees(ev):
            if live.pop(ev["addr"], None) is None:
                freed_untracked += ev["size"]
            else:
                current -= ev["size"]
        total = untracked - freed_untracked + current
        if total > peak:
            peak, peak_at = total, k
    alive: dict = {}
    freed_untracked = 0
    for ev in trace[:peak_at + 1]:
        if ev["action"] == "alloc":
            alive[ev["addr"]] = ev
        elif frees(ev) and alive.pop(ev["addr"], None) is None:
            freed_untracked += ev["size"]
    return peak, alive, freed_untracked


def print_tensors_at_peak(snapshot: dict, untracked: int, top: int, device_index: int = 0) -> None:
    traces = snapshot.get("device_traces") or []
    trace = traces[device_index] if device_index < len(traces) else []
    if not trace:
        print("  (no allocator trace recorded)")
        return
    peak, alive, freed_untracked = replay(trace, untracked)
    print(f"  tensors alive at the peak ({peak / MB:,.1f} MB by the trace):")
    print(f"    {(untracked - freed_untracked) / MB:12,.1f} MB  untracked: allocated before recording began "
          "(weights, anything left behind)")
    blocks = sorted(alive.values(), key=lambda ev: -ev["size"])
    for ev in blocks[:top]:
        print(f"    {ev['size'] / MB:12,.1f} MB  {site(ev.get('frames', []))}")
    rest = blocks[top:]
    if rest:
        print(f"    {sum(ev['size'] for ev in rest) / MB:12,.1f} MB  {len(rest)} smaller blocks")
    by_site: dict[str, list[int]] = {}
    for ev in blocks:
        entry = by_site.setdefault(site(ev.get("frames", [])), [0, 0])
        entry[0] += ev["size"]
        entry[1] += 1
    print("  by allocation site:")
    for name, (size, count) in sorted(by_site.items(), key=lambda item: -item[1][0])[:top]:
        print(f"    {size / MB:12,.1f} MB  x{count:<4d} {name}")


# --------------------------------------------------------------------------------------------------------------
# The census the benchmark used to take (it leaks: kept only to reproduce the old numbers)
# --------------------------------------------------------------------------------------------------------------
def leaky_census(cfg, device: str, dtype: str, tokens: int = 256) -> None:
    """The old `saved_bytes_per_layer`: its pack hook returned the tensor itself. For a tensor saved by the op
    that made it that is a cycle through autograd's C++ node that gc cannot break, so both census models, their
    graphs and autocast's bf16 weight copies stay allocated for the rest of the process."""
    import dataclasses

    import torch
    import torch.nn.functional as F

    from minillama.model import Transformer

    for n_layers in (2, 1):
        torch.manual_seed(0)
        model = Transformer(dataclasses.replace(cfg, n_layers=n_layers)).to(device)
        seq = min(tokens, cfg.max_seq_len)
        x = torch.randint(0, cfg.vocab_size, (max(1, tokens // seq), seq), device=device)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                F.cross_entropy(model(x).float().flatten(0, 1), x.flatten())


# --------------------------------------------------------------------------------------------------------------
def probe(preset: str, micro_batch: int, seq_len: int, ac: str, dtype: str, device: str, steps: int, top: int,
          old_census: bool, snapshot_dir: Path | None, stacks: str = "all") -> None:
    import torch
    from plan_vs_measured import build_training, planned

    from minillama.config import ModelConfig

    mem = CudaMemory() if device == "cuda" else RssMemory()
    cfg = ModelConfig.from_preset(preset)
    print(f"== {preset} {micro_batch}x{seq_len} AC {ac} ({dtype}, {device}) ==")
    before = mem.allocated()
    print(f"  allocated before this configuration: {before / MB:,.1f} MB"
          + ("" if device == "cuda" else " (RSS of the process)"))
    plan = planned(cfg, micro_batch, seq_len, dtype, 1, ac)
    parts = ", ".join(f"{k} {plan[k] / MB:,.1f}" for k in ("weights", "optimizer", "working_weights", "gradients",
                                                           "activations"))
    print(f"  planned: {plan['total'] / MB:,.1f} MB at {plan['peak_phase']} ({parts})")

    torch.manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len + 1))
    inputs, targets = data[:, :-1].to(device), data[:, 1:].to(device)
    warm_model, warm_step, _ = build_training(cfg, device, dtype, micro_batch, ac)
    warm_step(inputs, targets)
    del warm_model, warm_step
    gc.collect()
    model, step, _ = build_training(cfg, device, dtype, micro_batch, ac)
    gc.collect()
    timeline = Timeline(mem)
    current = {"step": 0}
    handles = instrument(model, timeline, lambda: f"step {current['step']}: ", recompute=ac != "none")
    untracked = mem.allocated()
    if device == "cuda":
        print(f"  allocated with the model built: {untracked / MB:,.1f} MB (planned weights "
              f"{plan['weights'] / MB:,.1f}; the rest was left behind by earlier work: "
              f"{(untracked - plan['weights']) / MB:,.1f})")
    recording = device == "cuda"
    if recording:
        try:
            torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks=stacks,
                                                     max_entries=2_000_000)
        except TypeError:
            torch.cuda.memory._record_memory_history(True, max_entries=2_000_000)
    start = time.perf_counter()
    timeline.start("step 1: embedding forward")
    for k in range(1, steps + 1):
        current["step"] = k
        if k > 1:
            timeline.mark(f"step {k}: embedding forward")
        step(inputs, targets)
    timeline.stop()
    seconds = time.perf_counter() - start
    snapshot = None
    if recording:
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
    for handle in handles:
        handle.remove()

    label, peak, _ = max(timeline.intervals, key=lambda item: item[1])
    if device == "cuda":
        print(f"  measured: peak {peak / MB:,.1f} MB, ratio to planned {peak / plan['total']:.3f}, in '{label}'"
              f" ({seconds / steps:.2f} s/step)")
    else:
        print(f"  measured: peak RSS {peak / MB:,.1f} MB, growth above the built model {(peak - untracked) / MB:,.1f}"
              f" MB vs planned total - weights {(plan['total'] - plan['weights']) / MB:,.1f} MB, in '{label}'")
    last = f"step {steps}: "
    print(f"  timeline of step {steps} (MB allocated at the end of each interval | peak inside it):")
    for name, interval_peak, end in timeline.intervals:
        if name and name.startswith(last):
            print(f"    {end / MB:12,.1f} | {interval_peak / MB:12,.1f}  {name[len(last):]}")
    print("  largest interval peaks over all measured steps:")
    for name, interval_peak, _end in sorted(timeline.intervals, key=lambda item: -item[1])[:5]:
        print(f"    {interval_peak / MB:12,.1f}  {name}")
    if snapshot is not None:
        print_tensors_at_peak(snapshot, untracked, top, torch.cuda.current_device())
        if snapshot_dir is not None:
            snapshot_dir.mkdir(parents=True, exist_ok=True)
            path = snapshot_dir / f"memory_{preset}_{micro_batch}x{seq_len}_{ac}.pickle"
            with open(path, "wb") as f:
                pickle.dump(snapshot, f)
            print(f"  wrote {path} (open it at https://pytorch.org/memory_viz)")
    del model, step, snapshot
    gc.collect()
    if old_census:
        leaky_census(cfg, device, dtype)
        gc.collect()
        print(f"  after the old census: {mem.allocated() / MB:,.1f} MB allocated (was {before / MB:,.1f} before"
              " this configuration)")
    if device == "cuda":
        torch.cuda.empty_cache()
    print()


def parse_config(text: str) -> tuple[str, int, int, str]:
    """'1b:4x2048:full' -> ('1b', 4, 2048, 'full')."""
    preset, shape, ac = text.split(":")
    micro, seq = shape.split("x")
    return preset, int(micro), int(seq), ac


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="125m:8x2048:full,1b:4x2048:full",
                        help="comma-separated preset:MICROxSEQ:AC (AC none or full), run in this order")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=12, help="tensors and sites listed at the peak")
    parser.add_argument("--old-census", action="store_true",
                        help="after each configuration, run the benchmark's former (leaking) census")
    parser.add_argument("--snapshot-dir", type=Path, default=None)
    parser.add_argument("--stacks", choices=["all", "python"], default="all",
                        help="frames recorded per allocation: all (C++ too: names autograd nodes and aten ops; "
                             "slower) or python")
    args = parser.parse_args()
    import torch

    print(f"torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ", cpu"))
    for text in args.configs.split(","):
        preset, micro, seq, ac = parse_config(text)
        probe(preset, micro, seq, ac, args.dtype, args.device, args.steps, args.top, args.old_census,
              args.snapshot_dir, args.stacks)


if __name__ == "__main__":
    main()
