"""The training loop: the LLaMA recipe, exact resume, honest metrics.

One optimizer step = `accumulation` micro-batches forward and backward (bf16 autocast over fp32 master weights),
gradient clipping at 1.0, then AdamW at the scheduled rate. The batch at step s is a pure function of
(seed, s, rank, world size) and everything else that changes is in the checkpoint, so a run killed at any
instant and resumed logs exactly the same losses as one that never stopped.

The same loop runs on one process or on N ranks under torchrun (train/parallelize.py: DDP or FSDP2). The ranks of
one step together read the same global batch whatever N is, the weights start from the same seeded
initialisation, and checkpoints load at any world size, so a run can move between 1 process, N CPU processes and
N GPUs and continue its loss curve.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from minillama.config import ModelConfig
from minillama.errors import MinillamaError
from minillama.files import make_dir
from minillama.model import Transformer
from minillama.runtime import autocast_context, autocast_dtype, native_bf16, retain_freed_memory, warn
from minillama.train import checkpointing
from minillama.train.config import RunConfig
from minillama.train.metrics import MetricsLog, Throughput, plot_losses
from minillama.train.optim import build_optimizer, learning_rate
from minillama.train.parallelize import DistributedContext


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    last_loss: float | None
    val_loss: float | None
    val_bpb: float | None
    checkpoint: Path | None
    stopped_by_signal: bool
    rank: int = 0  # this process's rank: under torchrun only rank 0 reports


class TrainStep:
    """One optimizer step: forward and backward over the micro-batches of a batch (gradients accumulate, the
    loss of each scaled by 1/accumulation so the sum is the batch mean), clip, then AdamW unless the loss or
    the gradient norm is not finite, in which case the update is skipped. Returns (loss, grad_norm, finite).

    `train_model` is what runs forward (the model itself, or DDP's wrapper of it) and returns the loss;
    `model` owns the parameters."""

    def __init__(self, train_model: torch.nn.Module, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 micro_batch_size: int, grad_clip: float, dtype: str, dist: DistributedContext | None = None):
        self.train_model, self.model, self.optimizer = train_model, model, optimizer
        self.micro_batch_size, self.grad_clip, self.dtype = micro_batch_size, grad_clip, dtype
        self.dist = dist or DistributedContext()
        self.device = next(model.parameters()).device

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, bool]:
        micro = self.micro_batch_size
        accumulation = inputs.shape[0] // micro
        loss_sum = torch.zeros((), device=self.device)
        for i in range(accumulation):
            x = inputs[i * micro:(i + 1) * micro].to(self.device, non_blocking=True)  # (micro, T)
            y = targets[i * micro:(i + 1) * micro].to(self.device, non_blocking=True)
            with self.dist.no_sync_unless(self.train_model, last=i == accumulation - 1), \
                    autocast_context(self.device, self.dtype):
                loss = self.train_model(x, y)
                (loss / accumulation).backward()
            loss_sum += loss.detach()
        step_loss = self.dist.mean(loss_sum / accumulation).item()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        # Under FSDP the norm is a DTensor: the whole gradient's norm, replicated; read it as a plain tensor.
        grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
        finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss, grad_norm, finite


class TimeBudget:
    """Fits a run's length to a wall-clock budget (`train.time_budget_s`).

    From the end of its first steady steps (the first two pay for compilation and warm caches) it re-estimates
    the run's total steps after every step: the time left, less the evaluations still to come, over the upper
    quartile of the recent step times. The cosine schedule follows that estimate, which moves by a step or two when the
    machine speeds up or slows down (a single estimate made early overran a 300 s budget by 44 s when other work
    slowed the steps by 15%). The estimate in force is checkpointed, and a resumed run keeps it."""

    SKIP, FIRST_TIMED, WINDOW = 2, 8, 20  # steps not timed (compilation); timed steps before the first estimate;
    # the recent steps whose median is the step time
    # What follows the last step besides the final evaluation: the last checkpoint (as long as the longest save so
    # far), then metrics and loss.png (0.7-1.8 s on a busy 2-core machine, mostly matplotlib's import), plus 1%.
    TAIL_S, TAIL_FRACTION = 2.0, 0.01

    def __init__(self, budget_s: float, started: float, max_steps: int, warmup_steps: int, eval_every: int,
                 eval_cost_steps: float):
        self.budget_s, self.started, self.max_steps = budget_s, started, max_steps
        self.decide_at = max(1, min(warmup_steps, self.SKIP + self.FIRST_TIMED))
        self.eval_every, self.eval_cost_steps = eval_every, eval_cost_steps
        self.step_seconds: deque[float] = deque(maxlen=self.WINDOW)
        self.save_s = 0.0

    def note_save(self, seconds: float) -> None:
        """A checkpoint took `seconds`: the last one, after the final step, will take about as long."""
        self.save_s = max(self.save_s, seconds)

    def observe(self, step: int, seconds: float) -> int | None:
        """Record the time of the step that ends at `step`; returns the run's total steps from `decide_at` on
        (never fewer than `step`: at `step` itself the time is up), and before it only when the time is up
        already (a machine so slow that the budget ends before the first estimate)."""
        if step > self.SKIP:
            self.step_seconds.append(seconds)
        ordered = sorted(self.step_seconds) or [seconds]
        step_s = ordered[(3 * len(ordered)) // 4]  # the upper quartile: on a steady machine about the median,
        # on a busy one (steps varying 0.3-3 s) it keeps the last steps inside the budget
        tail_s = self.TAIL_S + self.TAIL_FRACTION * self.budget_s + self.save_s
        remaining_s = self.budget_s - tail_s - (time.perf_counter() - self.started)
        eval_s = self.eval_cost_steps * step_s
        more = int((remaining_s - eval_s) / (step_s + eval_s / self.eval_every))
        if step < self.decide_at:  # only steady steps (not the compiling ones) can say the time is up
            return step if self.step_seconds and more <= 0 else None
        return max(step, min(self.max_steps, step + more))


class GracefulStop:
    """Ctrl-C or SIGTERM asks the loop to save a checkpoint and exit after the current step. A second Ctrl-C
    stops at once; a repeated SIGTERM does not, since launchers and schedulers may send it more than once
    (SLURM signals every process of a job step, torchrun forwards its own to the ranks): the save goes on."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = {}

    def __enter__(self) -> GracefulStop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def micro_batch_size_that_fits(cfg: ModelConfig, per_rank_batch: int, seq_len: int, device: torch.device,
                               dtype: str, activation_checkpointing: str, attention: str = "auto") -> int:
    """The largest divisor of the per-rank batch whose activations fit in half the free memory, by the
    planner's activation estimate for the attention kernel that will run (the formula `minillama plan` reports)."""
    from minillama.kernels import use_blocked_attention
    from minillama.plan.memory import activation_bytes_per_sequence

    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
    else:
        free_bytes = _available_ram_bytes()
    kernel = "blocked" if use_blocked_attention(attention, device, seq_len) else "sdpa"
    per_sequence = activation_bytes_per_sequence(cfg, seq_len, dtype=dtype, attention=kernel,
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


@dataclass
class RunState:
    """What the loop changes as a run goes. `step`, `max_steps`, `length_decided` and the bad-step counters are
    checkpointed (a resumed run continues from them); the rest is what the run reports at the end."""

    step: int = 0
    max_steps: int = 0
    length_decided: bool = True  # False until a time budget's first estimate of the run's length
    bad_in_a_row: int = 0
    bad_total: int = 0
    last_loss: float | None = None
    val_loss: float | None = None
    val_bpb: float | None = None
    saved: Path | None = None
    stopped_by_signal: bool = False

    @classmethod
    def start(cls, tcfg, saved: dict | None) -> RunState:
        """A fresh run's state, or a resumed one's from its checkpoint. A resumed time-budgeted run keeps the
        length it had decided; otherwise the configured max_steps holds (--max-steps on resume may extend a run)."""
        if saved is None:
            return cls(max_steps=tcfg.max_steps, length_decided=tcfg.time_budget_s <= 0)
        decided_before = bool(saved.get("length_decided")) and tcfg.time_budget_s > 0
        return cls(step=saved["step"], max_steps=saved["max_steps"] if decided_before else tcfg.max_steps,
                   length_decided=decided_before or tcfg.time_budget_s <= 0,
                   bad_in_a_row=saved["bad_in_a_row"], bad_total=saved["bad_total"])


def build_model(model_cfg: ModelConfig, tcfg, device: torch.device) -> Transformer:
    """The model built on the meta device, initialised on the CPU from the run's seed and moved to `device`.

    On the CPU always, so that the initial weights are a function of the seed alone: a GPU's generator draws other
    numbers than the CPU's, and a sharded (FSDP) run fills its shards from this same CPU initialisation."""
    torch.manual_seed(tcfg.seed)
    with torch.device("meta"):
        model = Transformer(model_cfg, attention=tcfg.attention, dropout=tcfg.dropout)
    model.to_empty(device="cpu")
    model.init_weights()
    if device.type != "cpu":
        model.to(device)
        if model_cfg.tie_embeddings:
            model.output.weight = model.tok_embeddings.weight
        model.reset_buffers()
    return model


def build_parallel_model(model_cfg: ModelConfig, tcfg, dist: DistributedContext) -> tuple[Transformer, torch.nn.Module]:
    """(the Transformer, the module to train), with activation checkpointing, compilation and DDP or FSDP
    applied (train/parallelize.py). Under FSDP the model is sharded on the meta device, then each rank
    materialises its shards from rank 0's `build_model` on the CPU; every other case builds the whole model
    on every rank from the same seed."""
    from minillama.train.parallelize import load_full_state, parallelize

    options = dict(compile=tcfg.compile, activation_checkpointing=tcfg.activation_checkpointing,
                   parallel=tcfg.parallel, dtype=tcfg.dtype)
    if tcfg.parallel != "fsdp" or dist.world_size == 1:
        model = build_model(model_cfg, tcfg, dist.device)
        return model, parallelize(model, dist, **options)
    torch.manual_seed(tcfg.seed)
    with torch.device("meta"):
        model = Transformer(model_cfg, attention=tcfg.attention, dropout=tcfg.dropout)
    train_model = parallelize(model, dist, **options)
    full_state = build_model(model_cfg, tcfg, torch.device("cpu")).state_dict() if dist.is_main else {}
    load_full_state(model, full_state, dist.device)
    return model, train_model


def train(run: RunConfig, out_dir: str | Path, resume: bool = False, show_progress: bool = True,
          allow_changes: tuple[str, ...] = ()) -> TrainResult:
    """Train `run` into `out_dir` (checkpoints, metrics.jsonl, tensorboard/, loss.png). With `resume`, continue
    from the newest checkpoint there; a config that differs from the checkpoint's in anything that decides what
    is trained is refused unless `allow_changes` names the keys (recorded in OUT/run.json)."""
    from minillama.data import MixtureLoader
    from minillama.eval import evaluate_loss
    from minillama.plan.flops import flops_per_token
    from minillama.plan.hardware import device_peak
    from minillama.train.setup import prepare_run, write_run_record

    started = time.perf_counter()
    out_dir = Path(out_dir)
    tcfg, ocfg = run.train, run.optim
    dist = DistributedContext.from_environment(tcfg.device)
    device = dist.device
    if tcfg.dtype == "bf16" and not native_bf16(device) and dist.is_main:
        warn(f"train.dtype = \"bf16\" on a {device.type} without native bf16 matmuls: they run emulated, far slower "
             f"than fp32 (train.dtype = \"auto\" picks fp32 here)")
    tcfg = dataclasses.replace(tcfg, dtype=autocast_dtype(tcfg.dtype, device))  # "auto" decided on this device
    saved = None
    if resume:
        latest = checkpointing.latest_checkpoint(out_dir)
        if latest is None:
            raise MinillamaError(f"--resume: no checkpoint in {out_dir} (looked for step-NNNNNNN directories)")
        saved = checkpointing.load_training_state(latest, run, allow_changes)
    make_dir(out_dir)  # a file in the way is one line of error, not a traceback

    # One process per node (local rank 0) trains the tokenizer and tokenizes the data into its cache first; the
    # node's other ranks then find it there. Every rank passes the one barrier once.
    if dist.local_rank != 0:
        dist.barrier()
    tokenizer, data_dir, model_cfg = prepare_run(run, out_dir, show_progress=show_progress and dist.is_main)
    if dist.local_rank == 0:
        dist.barrier()
    if tcfg.batch_size % dist.world_size:
        raise MinillamaError(f"train.batch_tokens/seq_len = {tcfg.batch_size} sequences is not divisible by "
                             f"the world size {dist.world_size}")
    per_rank_batch = tcfg.batch_size // dist.world_size
    micro = tcfg.micro_batch_size or micro_batch_size_that_fits(
        model_cfg, per_rank_batch, tcfg.seq_len, device, tcfg.dtype, tcfg.activation_checkpointing, tcfg.attention)
    if per_rank_batch % micro:
        raise MinillamaError(f"train.micro_batch_size={micro} does not divide the {per_rank_batch} sequences "
                             "per rank and step")
    if dist.is_main:
        write_run_record(out_dir, run, data_dir, per_rank_batch, dist.world_size,
                         resumed_at=saved["step"] if saved else None, changes=saved["changes"] if saved else None)
    train_data = MixtureLoader(data_dir, seq_len=tcfg.seq_len, batch_size=per_rank_batch, seed=tcfg.seed,
                               rank=dist.rank, world_size=dist.world_size, split="train",
                               tokenizer_fingerprint=tokenizer.fingerprint)
    val_data = MixtureLoader(data_dir, seq_len=tcfg.seq_len, batch_size=micro, seed=tcfg.seed, rank=dist.rank,
                             world_size=dist.world_size, split="val", tokenizer_fingerprint=tokenizer.fingerprint,
                             verify=False)
    eval_batches = max(1, math.ceil(tcfg.eval_tokens / (micro * tcfg.seq_len * dist.world_size)))

    if device.type == "cpu":
        retain_freed_memory()  # each step reuses the last one's freed memory instead of faulting in new pages
    model, train_model = build_parallel_model(model_cfg, tcfg, dist)
    optimizer = build_optimizer(model, ocfg)  # over the shards under FSDP
    if saved is not None:
        checkpointing.restore(saved, model, optimizer, dist)
    train_step = TrainStep(train_model, model, optimizer, micro_batch_size=micro, grad_clip=ocfg.grad_clip,
                           dtype=tcfg.dtype, dist=dist)
    peak, peak_source = device_peak(device, tcfg.dtype)  # None for a GPU missing from the table: no MFU then
    throughput = Throughput(flops_per_token(model_cfg, tcfg.seq_len, training=True), peak, devices=dist.world_size)
    log = MetricsLog(out_dir, resume_step=saved["step"] if saved else None,
                     first_record=dict(peak_flops=peak, peak_source=peak_source)) if dist.is_main else None
    tokens_per_step = tcfg.batch_size * tcfg.seq_len

    state = RunState.start(tcfg, saved)
    budget = None
    if not state.length_decided:
        eval_cost_steps = eval_batches * micro * tcfg.seq_len / tokens_per_step / 3  # forward only: ~1/3
        budget = TimeBudget(tcfg.time_budget_s, started, tcfg.max_steps, ocfg.warmup_steps, tcfg.eval_every,
                            eval_cost_steps)

    def save() -> Path:
        return checkpointing.save_training_checkpoint(
            out_dir, state.step, model, tokenizer, optimizer, run, bad_in_a_row=state.bad_in_a_row,
            bad_total=state.bad_total, max_steps=state.max_steps, length_decided=state.length_decided,
            keep_last=tcfg.keep_last, dist=dist)

    def validate() -> None:
        nats, count = evaluate_loss(model, val_data.val_batches(max_batches=eval_batches), device, tcfg.dtype)
        # Nats and tokens summed over ranks: the mean over every scored token, whatever the world size.
        nats, count = dist.sum(torch.tensor([nats, count], dtype=torch.float64, device=device)).tolist()
        state.val_loss = nats / max(1.0, count)
        # bits per byte: the validation split's UTF-8 bytes per token turn nats/token into bits/byte.
        state.val_bpb = state.val_loss / (math.log(2) * val_data.bytes_per_token["val"])

    progress = None
    if show_progress and dist.is_main:
        from tqdm.auto import tqdm

        progress = tqdm(total=state.max_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True)

    first_step = state.step + 1  # logged whatever log_every says, to show the run has started
    with GracefulStop() as stop:
        while state.step < state.max_steps:
            lr = learning_rate(state.step, state.max_steps, ocfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            inputs, targets = train_data.batch(state.step)
            step_started = time.perf_counter()
            loss, grad_norm, finite = train_step(inputs, targets)
            if budget is not None:
                estimate = budget.observe(state.step + 1, time.perf_counter() - step_started)
                # Rank 0's clock decides for all: ranks that stopped at different steps would wait forever.
                estimate = dist.broadcast_int(-1 if estimate is None else estimate)
                estimate = None if estimate < 0 else estimate
                if estimate is not None:
                    state.max_steps, state.length_decided = estimate, True
                    if progress is not None:
                        progress.total = state.max_steps
            state.bad_in_a_row = 0 if finite else state.bad_in_a_row + 1
            state.bad_total += 0 if finite else 1
            state.step += 1
            state.last_loss = loss
            throughput.add(tokens_per_step)

            step, record = state.step, None
            if not finite or step % tcfg.log_every == 0 or step in (state.max_steps, first_step):
                tokens_per_s, mfu = throughput.measure()
                record = dict(step=step, tokens=step * tokens_per_step, loss=loss, lr=lr, grad_norm=grad_norm,
                              tokens_per_s=round(tokens_per_s, 1), mfu=None if mfu is None else round(mfu, 5),
                              tokens_per_s_per_device=round(tokens_per_s / dist.world_size, 1),
                              devices=dist.world_size)
                if not finite:
                    record.update(skipped=True, bad_steps_total=state.bad_total)
            if step % tcfg.eval_every == 0 or step == state.max_steps:
                validate()
                record = record or dict(step=step, tokens=step * tokens_per_step, loss=loss, lr=lr,
                                        grad_norm=grad_norm, tokens_per_s=None, mfu=None,
                                        tokens_per_s_per_device=None, devices=dist.world_size)
                record.update(val_loss=state.val_loss, val_bpb=state.val_bpb)
                throughput.reset()  # evaluation time is not training throughput
            if record is not None and log is not None:
                log.log(record)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}", **({"val": f"{state.val_loss:.4f}"} if state.val_loss else {}))

            if state.bad_in_a_row >= tcfg.max_bad_steps:
                raise MinillamaError(f"stopping at step {step}: {state.bad_in_a_row} non-finite losses or gradients "
                                     f"in a row (last loss {loss}, grad norm {grad_norm}); lower optim.lr?")
            if dist.world_size > 1:  # a signal reaches the ranks at different steps: stop together
                stop.requested = dist.count(stop.requested) > 0
            if step % tcfg.save_every == 0 or step == state.max_steps or stop.requested:
                save_started = time.perf_counter()  # every rank saves its part
                state.saved = save()
                if budget is not None:
                    budget.note_save(time.perf_counter() - save_started)
            if stop.requested:
                state.stopped_by_signal = True
                break
    if progress is not None:
        progress.close()
    if log is not None:
        log.close()
        if log.path.exists() and log.path.stat().st_size:
            plot_losses(log.path, out_dir / "loss.png")
    dist.barrier()
    dist.close()
    return TrainResult(out_dir=out_dir, step=state.step, last_loss=state.last_loss, val_loss=state.val_loss,
                       val_bpb=state.val_bpb, checkpoint=state.saved, stopped_by_signal=state.stopped_by_signal,
                       rank=dist.rank)


__all__ = ["train", "TrainResult", "TrainStep", "RunState", "build_model", "build_parallel_model"]
