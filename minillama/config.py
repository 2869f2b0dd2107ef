"""Model configuration, the table of presets, and the TOML + `--set` machinery every run config uses.

A `ModelConfig` holds the handful of numbers that define a LLaMA-family network. Presets are data: a table of
named field overrides, so adding a model is adding a row. The loaders at the bottom map a TOML table onto any
dataclass and fail with the key's full name on an unknown key or a wrong type.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from minillama.errors import MinillamaError


@dataclass
class RopeScaling:
    """Llama 3.1 frequency scaling of RoPE (HF `rope_type: "llama3"`).

    Wavelengths longer than original_max_position_embeddings / low_freq_factor are divided by `factor`, those
    shorter than original_max_position_embeddings / high_freq_factor are kept, and the band between is blended.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: equal to n_heads (multi-head attention)
    vocab_size: int = 32000
    # SwiGLU hidden size: either `ffn_hidden_dim` explicitly, or LLaMA's rule from multiple_of/ffn_dim_multiplier.
    ffn_hidden_dim: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    head_dim: int | None = None  # None: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = build_dataclass(RopeScaling, self.rope_scaling, "rope_scaling")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.n_heads <= 0 or self.dim % self.n_heads != 0:
                raise MinillamaError(
                    f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}; "
                    "choose n_heads that divides dim or set model.head_dim explicitly"
                )
            self.head_dim = self.dim // self.n_heads
        if self.ffn_hidden_dim is None:
            self.ffn_hidden_dim = swiglu_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        self.validate()

    def validate(self) -> None:
        positive = ["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim", "head_dim",
                    "max_seq_len", "multiple_of"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise MinillamaError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads != 0:
            raise MinillamaError(
                f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads} "
                "(grouped-query attention shares each key/value head among an equal number of query heads)"
            )
        if self.head_dim % 2 != 0:
            raise MinillamaError(f"model.head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise MinillamaError("model.rope_theta and model.norm_eps must be positive")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise MinillamaError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return build_dataclass(cls, {**PRESETS[name], **overrides}, "model")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def swiglu_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """LLaMA's SwiGLU width: 2/3 of 4*dim (keeps FLOPs equal to a 4*dim GELU MLP), optionally scaled, rounded
    up to a multiple of `multiple_of` (Meta's llama/model.py, FeedForward.__init__)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


# --------------------------------------------------------------------------------------------------------------
# Presets. Meta's models from their params.json files (LLaMA 1 paper Table 2; Llama 2 paper Table 1; Llama 3 "Herd
# of Models" Table 3; Llama 3.2 model cards). Our own ladder below is sized for CPUs and single GPUs.
# --------------------------------------------------------------------------------------------------------------
_LLAMA1 = dict(vocab_size=32000, multiple_of=256, norm_eps=1e-6, max_seq_len=2048)
_LLAMA2 = dict(vocab_size=32000, multiple_of=256, norm_eps=1e-5, max_seq_len=4096)
_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, norm_eps=1e-5, max_seq_len=8192, bos_id=128000,
               eos_id=128001)
_LLAMA31_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
_LLAMA32_ROPE = dict(_LLAMA31_ROPE, factor=32.0)

PRESETS: dict[str, dict[str, Any]] = {
    "llama1-7b": dict(_LLAMA1, dim=4096, n_layers=32, n_heads=32),
    "llama1-13b": dict(_LLAMA1, dim=5120, n_layers=40, n_heads=40),
    "llama1-33b": dict(_LLAMA1, dim=6656, n_layers=60, n_heads=52),
    "llama1-65b": dict(_LLAMA1, dim=8192, n_layers=80, n_heads=64),
    "llama2-7b": dict(_LLAMA2, dim=4096, n_layers=32, n_heads=32),
    "llama2-13b": dict(_LLAMA2, dim=5120, n_layers=40, n_heads=40),
    "llama2-70b": dict(_LLAMA2, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                       multiple_of=4096),
    "llama3-8b": dict(_LLAMA3, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3,
                      multiple_of=1024),
    "llama3-70b": dict(_LLAMA3, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                       multiple_of=4096),
    "llama3.1-8b": dict(_LLAMA3, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3,
                        multiple_of=1024, max_seq_len=131072, rope_scaling=_LLAMA31_ROPE),
    "llama3.1-70b": dict(_LLAMA3, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                         multiple_of=4096, max_seq_len=131072, rope_scaling=_LLAMA31_ROPE),
    "llama3.1-405b": dict(_LLAMA3, dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim_multiplier=1.2,
                          multiple_of=4096, max_seq_len=131072, rope_scaling=_LLAMA31_ROPE),
    "llama3.2-1b": dict(_LLAMA3, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden_dim=8192,
                        tie_embeddings=True, max_seq_len=131072, rope_scaling=_LLAMA32_ROPE),
    "llama3.2-3b": dict(_LLAMA3, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_hidden_dim=8192,
                        tie_embeddings=True, max_seq_len=131072, rope_scaling=_LLAMA32_ROPE),
    # Our ladder. Head dim 32-64 on the small ones (CPU-friendly matmuls), GQA from 15m up, vocabularies our own
    # BPE trains quickly for the small ones and the Llama 2 size from 125m up; small models tie embeddings
    # because an untied vocabulary matrix would be most of their parameters.
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden_dim=384, vocab_size=2048,
                 tie_embeddings=True, max_seq_len=256, bos_id=1, eos_id=2),
    "15m": dict(dim=384, n_layers=8, n_heads=6, n_kv_heads=2, ffn_hidden_dim=1024, vocab_size=8192,
                tie_embeddings=True, max_seq_len=512),
    "50m": dict(dim=512, n_layers=10, n_heads=8, n_kv_heads=4, ffn_hidden_dim=1536, vocab_size=32000,
                tie_embeddings=True, max_seq_len=1024),
    "125m": dict(dim=768, n_layers=16, n_heads=12, n_kv_heads=4, ffn_hidden_dim=2048, vocab_size=32000,
                 tie_embeddings=True, max_seq_len=2048),
    "350m": dict(dim=1024, n_layers=24, n_heads=16, n_kv_heads=8, ffn_hidden_dim=3072, vocab_size=32000,
                 tie_embeddings=True, max_seq_len=2048),
    # TinyLlama-1.1B's shape (Zhang et al. 2024): 22 layers, d 2048, 32 heads, 4 KV heads, 5632 SwiGLU.
    "1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_hidden_dim=5632, vocab_size=32000,
               max_seq_len=2048),
}


# --------------------------------------------------------------------------------------------------------------
# TOML onto dataclasses, with `--set section.key=value` overrides. Errors name the key in full.
# --------------------------------------------------------------------------------------------------------------
def coerce_value(value: Any, hint: Any, key: str) -> Any:
    """`value` checked against a type hint (int, float, str, bool, Optional, list, nested dataclass) and
    converted where lossless (an integral float to int, an int to float). `key` names the value in the error,
    e.g. "train.lr" or "config.json: hidden_size". The one place minillama checks a value read from a file."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce_value(value, arg, key)
            except MinillamaError as exc:
                errors.append(str(exc))
        raise MinillamaError(errors[0] if errors else f"{key}: unexpected value {value!r}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise MinillamaError(f"{key} must be a table, got {value!r}")
        return build_dataclass(hint, value, key)
    if origin in (list, tuple):
        (item_hint, *_) = typing.get_args(hint) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise MinillamaError(f"{key} must be a list, got {value!r}")
        return [coerce_value(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise MinillamaError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise MinillamaError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise MinillamaError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise MinillamaError(f"{key} must be a string, got {value!r}")
    return value


def build_dataclass(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys and wrong types with the key's full name."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.init}
    for key in values:
        if key not in known:
            raise MinillamaError(f"unknown key {prefix}.{key}; known keys: {', '.join(sorted(known))}")
    kwargs = {k: coerce_value(v, hints[k], f"{prefix}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (["train", "lr"], 0.0003). The value is read as TOML, falling back to a bare string."""
    if "=" not in text:
        raise MinillamaError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise MinillamaError(f"--set {text!r}: empty key name")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def apply_overrides(table: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set a.b=value` strings to a nested dict (in place; also returned)."""
    for text in overrides:
        path, value = parse_override(text)
        node = table
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MinillamaError(f"--set {text!r}: {part} is not a table")
        node[path[-1]] = value
    return table


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise MinillamaError(f"config file not found: {path}") from None
    except OSError as exc:  # a directory, no permission, ...
        raise MinillamaError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise MinillamaError(f"{path}: invalid TOML: {exc}") from None


def model_config_from_table(table: dict[str, Any], prefix: str = "model") -> ModelConfig:
    """A `[model]` table: `preset = "125m"` plus any field overrides, or every field given explicitly."""
    table = dict(table)
    preset = table.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise MinillamaError(f"unknown preset {prefix}.preset={preset!r}; known presets: {', '.join(PRESETS)}")
        table = {**PRESETS[preset], **table}
    return build_dataclass(ModelConfig, table, prefix)


__all__ = ["ModelConfig", "RopeScaling", "PRESETS", "swiglu_hidden_dim", "build_dataclass", "coerce_value",
           "apply_overrides",
           "parse_override", "read_toml", "model_config_from_table"]
