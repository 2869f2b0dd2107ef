"""The training loop: the LLaMA recipe, exact resume, honest metrics.

One optimizer step = `accumulation` micro-batches forward and backward (bf16 autocast over fp32 master weights),
gradient clipping at 1.0, then AdamW at the scheduled rate. The batch at step s is a pure function of
(seed, s, rank, world size) and everything else that changes is in the checkpoint, so a run killed at any
instant and resumed logs exactly the same losses as one that never stopped.
"""

from __future__ import annotations

import math
import signal
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from minillama.config import ModelConfig
from minillama.data import IGNORE_INDEX
from minillama.errors import MinillamaError
from minillama.model import Transformer
from minillama.train import checkpointing
from minillama.train.config import RunConfig
from minillama.train.metrics import MetricsLog, Throughput, plot_losses
from minillama.train.optim import build_optimizer, learning_rate


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    last_loss: float | None
    val_loss: float | None
    val_bpb: float | None
    checkpoint: Path | None
    stopped_by_signal: bool


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MinillamaError(f"train.device={name!r} but no CUDA device is available")
    return torch.device(name)


def autocast_context(device: torch.device, dtype: str):
    """bf16 autocast for "bf16" (matmuls in bf16, master weights and optimizer in fp32); nothing for "fp32"."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token loss in fp32 (B, T, V) x (B, T) -> nats per token; IGNORE_INDEX targets are skipped."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction,
                           ignore_index=IGNORE_INDEX)


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches, device: torch.device, dtype: str) -> tuple[float, int]:
    """Total nats and scored-token count over (inputs, targets) batches; targets equal to IGNORE_INDEX
    (padding at the end of the validation split) are not scored."""
    was_training = model.training
    model.eval()
    total_nats, total_tokens = 0.0, 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast_context(device, dtype):
            logits = model(inputs)
        total_nats += cross_entropy_loss(logits, targets, reduction="sum").item()
        total_tokens += int((targets != IGNORE_INDEX).sum())  # padding positions carry no loss
    model.train(was_training)
    return total_nats, total_tokens


class TrainStep:
    """One optimizer step: forward and backward over the micro-batches of a batch (gradients accumulate, the
    loss of each scaled by 1/accumulation so the sum is the batch mean), clip, then AdamW unless the loss or
    the gradient norm is not finite, in which case the update is skipped. Returns (loss, grad_norm, finite).

    `train_model` is what runs forward (compiled, DDP-wrapped or plain); `model` owns the parameters."""

    def __init__(self, train_model: torch.nn.Module, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 micro_batch_size: int, grad_clip: float, dtype: str, dist=None):
        from minillama.train.parallelize import DistributedContext

        self.train_model, self.model, self.optimizer = train_model, model, optimizer
        self.micro_batch_size, self.grad_clip, self.dtype = micro_batch_size, grad_clip, dtype
        self.dist = dist or DistributedContext()
        self.device = next(model.parameters()).device
        # train/fast.py's TrainingLoss returns the loss itself (DDP keeps the module it wraps as .module).
        self.computes_loss = getattr(getattr(train_model, "module", train_model), "computes_loss", False)

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, bool]:
        micro = self.micro_batch_size
        accumulation = inputs.shape[0] // micro
        loss_sum = torch.zeros((), device=self.device)
        for i in range(accumulation):
            x = inputs[i * micro:(i + 1) * micro].to(self.device, non_blocking=True)  # (micro, T)
            y = targets[i * micro:(i + 1) * micro].to(self.device, non_blocking=True)
            with self.dist.no_sync_unless(self.train_model, last=i == accumulation - 1), \
                    autocast_context(self.device, self.dtype):
                loss = self.train_model(x, y) if self.computes_loss else cross_entropy_loss(self.train_model(x), y)
                (loss / accumulation).backward()
            loss_sum += loss.detach()
        step_loss = self.dist.mean(loss_sum / accumulation).item()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip).item()
        finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss, grad_norm, finite


class TimeBudget:
    """Fits a run's length to a wall-clock budget (`train.time_budget_s`).

    From the end of its first steady steps (the first two pay for compilation and warm caches) it re-estimates
    the run's total steps after every step: the time left, less the evaluations still to come, over the median
    of the recent step times. The cosine schedule follows that estimate, which moves by a step or two when the
    machine speeds up or slows down (a single estimate made early overran a 300 s budget by 44 s when other work
    slowed the steps by 15%). The estimate in force is checkpointed, and a resumed run keeps it."""

    SKIP, FIRST_TIMED, WINDOW = 2, 8, 20  # steps not timed (compilation); timed steps before the first estimate;
    # the recent steps whose median is the step time

    def __init__(self, budget_s: float, started: float, max_steps: int, warmup_steps: int, eval_every: int,
                 eval_cost_steps: float):
        self.budget_s, self.started, self.max_steps = budget_s, started, max_steps
        self.decide_at = max(1, min(warmup_steps, self.SKIP + self.FIRST_TIMED))
        self.eval_every, self.eval_cost_steps = eval_every, eval_cost_steps
        self.step_seconds: deque[float] = deque(maxlen=self.WINDOW)

    def observe(self, step: int, seconds: float) -> int | None:
        """Record the time of the step that ends at `step`; returns the run's total steps from `decide_at` on
        (never fewer than `step`: at `step` itself the time is up)."""
        if step > self.SKIP:
            self.step_seconds.append(seconds)
        if step < self.decide_at:
            return None
        ordered = sorted(self.step_seconds) or [seconds]
        step_s = ordered[len(ordered) // 2]
        # What follows the last step besides the final evaluation (checkpoint, metrics, loss.png) gets 2%.
        remaining_s = 0.98 * self.budget_s - (time.perf_counter() - self.started)
        eval_s = self.eval_cost_steps * step_s
        more = int((remaining_s - eval_s) / (step_s + eval_s / self.eval_every))
        return max(step, min(self.max_steps, step + more))


class GracefulStop:
    """Ctrl-C or SIGTERM asks the loop to save a checkpoint and exit after the current step."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = {}

    def __enter__(self) -> GracefulStop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def micro_batch_size_that_fits(cfg: ModelConfig, per_rank_batch: int, seq_len: int, device: torch.device,
                               dtype: str, activation_checkpointing: str) -> int:
    """The largest divisor of the per-rank batch whose activations fit in half the free memory, by the
    planner's activation estimate (the same formula `minillama plan` reports)."""
    from minillama.plan.memory import activation_bytes_per_sequence

    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
    else:
        free_bytes = _available_ram_bytes()
    per_sequence = activation_bytes_per_sequence(cfg, seq_len, dtype=dtype,
                                                 activation_checkpointing=activation_checkpointing)
    budget = max(1, int(0.5 * free_bytes // max(1, per_sequence)))
    for size in range(min(per_rank_batch, budget), 0, -1):
        if per_rank_batch % size == 0:
            return size
    return 1


def _available_ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def train(run: RunConfig, out_dir: str | Path, resume: bool = False, show_progress: bool = True) -> TrainResult:
    """Train `run` into `out_dir` (checkpoints, metrics.jsonl, tensorboard/, loss.png)."""
    from minillama.data import MixtureLoader
    from minillama.train.parallelize import DistributedContext, parallelize
    from minillama.train.setup import prepare_run, write_run_record

    started = time.perf_counter()
    out_dir = Path(out_dir)
    tcfg, ocfg = run.train, run.optim
    dist = DistributedContext.from_environment()
    device = resolve_device(tcfg.device) if dist.world_size == 1 else dist.device
    start_step, state = 0, None
    if resume:
        latest = checkpointing.latest_checkpoint(out_dir)
        if latest is None:
            raise MinillamaError(f"--resume: no checkpoint in {out_dir} (looked for step-NNNNNNN directories)")
        state = checkpointing.load_training_state(latest, run)
        start_step = state["step"]
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer, data_dir, model_cfg = prepare_run(run, out_dir, show_progress=show_progress and dist.is_main)
    if tcfg.batch_size % dist.world_size:
        raise MinillamaError(f"train.batch_tokens/seq_len = {tcfg.batch_size} sequences is not divisible by "
                             f"the world size {dist.world_size}")
    per_rank_batch = tcfg.batch_size // dist.world_size
    micro = tcfg.micro_batch_size or micro_batch_size_that_fits(
        model_cfg, per_rank_batch, tcfg.seq_len, device, tcfg.dtype, tcfg.activation_checkpointing)
    if per_rank_batch % micro:
        raise MinillamaError(f"train.micro_batch_size={micro} does not divide the {per_rank_batch} sequences "
                             "per rank and step")

    if dist.is_main:
        write_run_record(out_dir, run, data_dir, per_rank_batch, dist.world_size)
    train_data = MixtureLoader(data_dir, seq_len=tcfg.seq_len, batch_size=per_rank_batch, seed=tcfg.seed,
                               rank=dist.rank, world_size=dist.world_size, split="train",
                               tokenizer_fingerprint=tokenizer.fingerprint)
    val_data = MixtureLoader(data_dir, seq_len=tcfg.seq_len, batch_size=micro, seed=tcfg.seed, rank=dist.rank,
                             world_size=dist.world_size, split="val", tokenizer_fingerprint=tokenizer.fingerprint,
                             verify=False)
    eval_batches = max(1, math.ceil(tcfg.eval_tokens / (micro * tcfg.seq_len * dist.world_size)))

    # The model: built on meta, materialised on the device with a seeded init, wrapped from outside.
    torch.manual_seed(tcfg.seed)
    with torch.device("meta"):
        model = Transformer(model_cfg)
    model.to_empty(device=device)
    model.init_weights()
    optimizer = build_optimizer(model, ocfg)
    if state is not None:
        checkpointing.restore(state, model, optimizer)
    train_model = parallelize(model, dist, compile=tcfg.compile,
                              activation_checkpointing=tcfg.activation_checkpointing, fast_path=tcfg.fast_path,
                              dropout=tcfg.dropout)

    from minillama.plan.flops import flops_per_token
    from minillama.plan.hardware import device_peak_flops

    train_step = TrainStep(train_model, model, optimizer, micro_batch_size=micro, grad_clip=ocfg.grad_clip,
                           dtype=tcfg.dtype, dist=dist)
    peak = device_peak_flops(device, tcfg.dtype)  # None for a GPU missing from the table: no MFU then
    throughput = Throughput(flops_per_token(model_cfg, tcfg.seq_len, training=True) * dist.world_size,
                            peak * dist.world_size if peak else None)
    log = MetricsLog(out_dir, resume_step=start_step if resume else None) if dist.is_main else None
    bad_in_a_row = state["bad_in_a_row"] if state else 0
    bad_total = state["bad_total"] if state else 0
    tokens_per_step = tcfg.batch_size * tcfg.seq_len
    last_loss = val_loss = val_bpb = None
    saved: Path | None = None

    def save(step: int) -> Path:
        return checkpointing.save_training_checkpoint(out_dir, step, model, tokenizer, optimizer, run,
                                                      bad_in_a_row=bad_in_a_row, bad_total=bad_total,
                                                      max_steps=max_steps, length_decided=length_decided,
                                                      keep_last=tcfg.keep_last)

    # The run's length: max_steps, or what fits in time_budget_s (estimated from the end of warmup's first steps
    # on, and checkpointed). A resumed time-budgeted run keeps the length it had; otherwise --max-steps on resume
    # may extend a run.
    decided_before = bool(state and state.get("length_decided") and tcfg.time_budget_s > 0)
    max_steps = state["max_steps"] if decided_before else tcfg.max_steps
    budget, length_decided = None, True
    if tcfg.time_budget_s > 0 and not decided_before:
        length_decided = False  # until the budget's first estimate
        eval_cost_steps = eval_batches * micro * tcfg.seq_len / tokens_per_step / 3  # forward only: ~1/3
        budget = TimeBudget(tcfg.time_budget_s, started, tcfg.max_steps, ocfg.warmup_steps, tcfg.eval_every,
                            eval_cost_steps)

    progress = None
    if show_progress and dist.is_main:
        from tqdm.auto import tqdm

        progress = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    stopped_by_signal = False
    with GracefulStop() as stop:
        step = start_step
        while step < max_steps:
            lr = learning_rate(step, max_steps, ocfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            inputs, targets = train_data.batch(step)
            step_started = time.perf_counter()
            step_loss, grad_norm, finite = train_step(inputs, targets)
            if budget is not None:
                estimate = budget.observe(step + 1, time.perf_counter() - step_started)
                if estimate is not None:
                    max_steps, length_decided = estimate, True
                    if progress is not None:
                        progress.total = max_steps
            if finite:
                bad_in_a_row = 0
            else:
                bad_in_a_row += 1
                bad_total += 1
            step += 1
            throughput.add(tokens_per_step)
            last_loss = step_loss

            record = None
            if not finite or step % tcfg.log_every == 0 or step == max_steps or step == start_step + 1:
                tokens_per_s, mfu = throughput.measure()
                record = dict(step=step, tokens=step * tokens_per_step, loss=step_loss, lr=lr, grad_norm=grad_norm,
                              tokens_per_s=round(tokens_per_s, 1), mfu=None if mfu is None else round(mfu, 5))
                if not finite:
                    record.update(skipped=True, bad_steps_total=bad_total)
            if step % tcfg.eval_every == 0 or step == max_steps:
                nats, count = evaluate_loss(train_model, val_data.val_batches(max_batches=eval_batches),
                                            device, tcfg.dtype)
                val_loss = dist.mean(torch.tensor(nats / max(1, count))).item()
                # bits per byte: the validation split's UTF-8 bytes per token turn nats/token into bits/byte.
                val_bpb = val_loss / (math.log(2) * val_data.bytes_per_token["val"])
                record = record or dict(step=step, tokens=step * tokens_per_step, loss=step_loss, lr=lr,
                                        grad_norm=grad_norm, tokens_per_s=None, mfu=None)
                record.update(val_loss=val_loss, val_bpb=val_bpb)
                throughput.reset()  # evaluation time is not training throughput
            if record is not None and log is not None:
                log.log(record)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}", **({"val": f"{val_loss:.4f}"} if val_loss else {}))

            if bad_in_a_row >= tcfg.max_bad_steps:
                raise MinillamaError(f"stopping at step {step}: {bad_in_a_row} non-finite losses or gradients in a "
                                     f"row (last loss {step_loss}, grad norm {grad_norm}); lower optim.lr?")
            if dist.is_main and (step % tcfg.save_every == 0 or step == max_steps or stop.requested):
                saved = save(step)
            if stop.requested:
                stopped_by_signal = True
                break
    if progress is not None:
        progress.close()
    if log is not None:
        log.close()
        if log.path.exists() and log.path.stat().st_size:
            plot_losses(log.path, out_dir / "loss.png")
    dist.barrier()
    return TrainResult(out_dir=out_dir, step=step, last_loss=last_loss, val_loss=val_loss, val_bpb=val_bpb,
                       checkpoint=saved, stopped_by_signal=stopped_by_signal)


__all__ = ["train", "TrainResult", "evaluate_loss", "cross_entropy_loss", "autocast_context", "resolve_device"]
