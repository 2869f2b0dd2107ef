"""Training: the run config, the LLaMA optimizer recipe, the loop with exact resume, and what it reports."""

from minillama.train.config import OptimConfig, RunConfig, TokenizerSpec, TrainConfig, load_run_config
from minillama.train.trainer import TrainResult, train

__all__ = ["OptimConfig", "RunConfig", "TokenizerSpec", "TrainConfig", "load_run_config", "TrainResult", "train"]
