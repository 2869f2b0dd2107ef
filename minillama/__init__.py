"""minillama: the whole LLaMA recipe for one person, on PyTorch.

    cfg = minillama.ModelConfig.from_preset("llama3-8b")
    model = minillama.Transformer(cfg)
    model, tokenizer = minillama.load("path/to/checkpoint")
    minillama.save(model, tokenizer, "path/to/out")
"""

from minillama.checkpoint import load, save
from minillama.config import PRESETS, ModelConfig, RopeScaling
from minillama.errors import MinillamaError
from minillama.model import KVCache, Transformer, count_parameters
from minillama.tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = ["PRESETS", "ModelConfig", "RopeScaling", "MinillamaError", "KVCache", "Transformer", "count_parameters",
           "load", "save", "Tokenizer", "load_tokenizer"]
