"""What a run reports: `metrics.jsonl` (one JSON object per logged step), TensorBoard scalars, a progress bar,
and `loss.png` at the end. Throughput is honest: tokens per second of wall-clock time between log steps,
data loading and optimizer included."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one JSON line per logged step to OUT/metrics.jsonl and mirrors scalars to TensorBoard.

    On resume the lines after the checkpoint's step are dropped first, so the file reads as one run.
    `first_record` holds fields written once, into the first record this log writes (e.g. the peak FLOP/s that
    MFU divides by, and where it comes from).
    """

    def __init__(self, out_dir: Path, resume_step: int | None = None, tensorboard: bool = True,
                 first_record: dict[str, Any] | None = None) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.first_record = dict(first_record or {})
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.file = open(self.path, "a")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=resume_step)
            except ImportError:  # tensorboard is a dependency, but keep training if it is broken
                self.writer = None

    def log(self, record: dict[str, Any]) -> None:
        record, self.first_record = {**record, **self.first_record}, {}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


class Throughput:
    """Tokens per second of the whole job and MFU over the wall-clock interval since the last call.

    MFU = tokens/s x model FLOPs per token / (peak FLOP/s per device x devices) (PaLM appendix B): the model's
    own FLOPs, not those of recomputation, over the dense peak of every device taking part."""

    def __init__(self, flops_per_token: float, peak_flops: float | None, devices: int = 1) -> None:
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops * devices if peak_flops else None  # of all the devices together
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def measure(self) -> tuple[float, float | None]:
        elapsed = time.perf_counter() - self.start
        tokens_per_s = self.tokens / elapsed if elapsed > 0 else 0.0
        mfu = tokens_per_s * self.flops_per_token / self.peak_flops if self.peak_flops else None
        self.reset()
        return tokens_per_s, mfu


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Train and validation loss against tokens seen, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["tokens"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["tokens"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
