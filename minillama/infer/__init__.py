"""Inference: the continuous-batching engine (and its speculative variant), sampling, streaming text, and one-call
conveniences."""

from minillama.infer.engine import Completion, Engine, EngineStats, StepOutput
from minillama.infer.generate import generate, sample_checkpoint
from minillama.infer.sampling import SamplingParams, TokenLogprob
from minillama.infer.speculative import SpeculativeCompletion, SpeculativeEngine
from minillama.infer.streaming import TextStream

__all__ = ["Engine", "StepOutput", "Completion", "EngineStats", "SamplingParams", "TokenLogprob", "TextStream",
           "generate", "sample_checkpoint", "SpeculativeEngine", "SpeculativeCompletion"]
