"""Meta's original LLaMA checkpoints -> our Hugging Face-format directory, and the rotary layouts of the two.

A Meta checkpoint (LLaMA 1, Llama 2, Llama 3.x as downloaded from Meta) is a directory of

    params.json             dim, n_layers, n_heads, n_kv_heads, vocab_size, multiple_of, ffn_dim_multiplier,
                            norm_eps, rope_theta, use_scaled_rope (see `MetaParams`)
    consolidated.00.pth     one pickle of tensors per model-parallel rank (fairscale's layers, Meta's
    consolidated.01.pth     llama/model.py): 1 file for 7B/8B, 2 for 13B, 8 for 70B ...
    tokenizer.model         SentencePiece (LLaMA 1/2) or a tiktoken rank file (Llama 3)

Its parameter names are ours (model.py keeps Meta's), so the conversion is: merge the shards, turn the query and
key rows from Meta's interleaved rotary order into the "rotate half" order our model (and Hugging Face) uses, and
save with `minillama.checkpoint.save`.

    convert_meta("Llama-2-7b/", "llama2-7b-hf/")      # or: minillama convert meta Llama-2-7b --out llama2-7b-hf
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import torch

from minillama.checkpoint import save
from minillama.config import ModelConfig, RopeScaling, build_dataclass
from minillama.errors import MinillamaError
from minillama.model import Transformer
from minillama.tokenizer import Tokenizer, load_tokenizer

PARAMS_FILE = "params.json"
TOKENIZER_FILE = "tokenizer.model"
_SHARD_NAME = re.compile(r"consolidated\.(\d+)\.pth")


# --------------------------------------------------------------------------------------------------------------
# Rotary layouts. RoPE rotates pairs of coordinates of each head. Meta's reference code (llama/model.py,
# apply_rotary_emb) views a head as D/2 complex numbers, so pair i is coordinates (2i, 2i+1): "interleaved".
# Hugging Face's LlamaAttention (rotate_half) and our model.py pair coordinate i with i + D/2. The rotation angle
# of pair i is position * theta^(-2i/D) in both, so the two models are equal once the rows of wq and wk (which
# produce those coordinates) are reordered per head; wv, wo and everything else are untouched.
# --------------------------------------------------------------------------------------------------------------
def hf_to_meta_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a query/key projection (n_heads * D, C) from rotate-half order to Meta's interleaved order:
    per head, row i and row i + D/2 become rows 2i and 2i + 1."""
    rows, columns = weight.shape
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, columns).transpose(1, 2).reshape(rows, columns)


def meta_to_hf_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `hf_to_meta_rotary`: per head, rows 2i and 2i + 1 become rows i and i + D/2."""
    rows, columns = weight.shape
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, columns).transpose(1, 2).reshape(rows, columns)


# --------------------------------------------------------------------------------------------------------------
# params.json
# --------------------------------------------------------------------------------------------------------------
@dataclass
class MetaParams:
    """The fields of Meta's params.json (ModelArgs in Meta's llama/model.py and llama-models' llama3 args.py),
    with their defaults there."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # absent before Llama 2 70B: multi-head attention
    vocab_size: int = -1  # -1 in LLaMA 1: the tokenizer decides
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False  # Llama 3.1 and later
    # Unset: llama-models' apply_scaling defaults, scale_factor 8 and high_freq_factor 4 (Llama 3.1). Llama 3.2
    # 1B/3B were trained with factor 32 (their Hugging Face configs say so): a params.json of theirs that lacks
    # rope_scaling_factor needs "rope_scaling_factor": 32 added before converting.
    rope_scaling_factor: float | None = None
    rope_high_freq_factor: float | None = None
    max_seq_len: int | None = None  # a generation setting in ModelArgs, rarely in params.json
    max_batch_size: int | None = None  # likewise; ignored


_REQUIRED_PARAMS = [f.name for f in fields(MetaParams) if f.default is MISSING]


def read_params(directory: Path) -> MetaParams:
    path = directory / PARAMS_FILE
    if not path.is_file():
        raise MinillamaError(f"{directory}: no {PARAMS_FILE}; a Meta checkpoint directory holds params.json, "
                             "consolidated.NN.pth and tokenizer.model")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MinillamaError(f"{path}: cannot read as JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise MinillamaError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    missing = [key for key in _REQUIRED_PARAMS if key not in raw]
    if missing:
        raise MinillamaError(f"{path}: missing required key {missing[0]!r}")
    try:
        params = build_dataclass(MetaParams, raw, "params")
    except MinillamaError as exc:
        raise MinillamaError(f"{path}: {exc}") from None
    if params.vocab_size == 0 or params.vocab_size < -1:
        raise MinillamaError(f"{path}: vocab_size={params.vocab_size}; expected a positive count or -1 (the "
                             "tokenizer's)")
    for name in ("rope_scaling_factor", "rope_high_freq_factor"):
        if getattr(params, name) is not None and getattr(params, name) <= 0:
            raise MinillamaError(f"{path}: {name}={getattr(params, name)} must be positive")
    return params


def _default_max_seq_len(params: MetaParams) -> int:
    """The context each family was trained for, since params.json does not say: Llama 3.1+ (scaled RoPE) 128K,
    Llama 3 (theta 500000) 8K, Llama 2 (GQA or eps 1e-5) 4K, LLaMA 1 2K. It bounds generation only."""
    if params.use_scaled_rope:
        return 131072
    if params.rope_theta >= 500000:
        return 8192
    if params.n_kv_heads is not None or params.norm_eps >= 1e-5:
        return 4096
    return 2048


def model_config(params: MetaParams, vocab_size: int, bos_id: int | None, eos_id: int | None,
                 tie_embeddings: bool, max_seq_len: int | None = None, source: str = PARAMS_FILE) -> ModelConfig:
    """Our ModelConfig for a params.json; `vocab_size` is used when params.json says -1."""
    scaling = None
    if params.use_scaled_rope:
        scaling = RopeScaling(factor=params.rope_scaling_factor or 8.0, low_freq_factor=1.0,
                              high_freq_factor=params.rope_high_freq_factor or 4.0,
                              original_max_position_embeddings=8192)
    try:
        return ModelConfig(
            dim=params.dim, n_layers=params.n_layers, n_heads=params.n_heads, n_kv_heads=params.n_kv_heads,
            vocab_size=params.vocab_size if params.vocab_size > 0 else vocab_size, multiple_of=params.multiple_of,
            ffn_dim_multiplier=params.ffn_dim_multiplier, norm_eps=params.norm_eps, rope_theta=params.rope_theta,
            rope_scaling=scaling, max_seq_len=max_seq_len or params.max_seq_len or _default_max_seq_len(params),
            tie_embeddings=tie_embeddings, bos_id=1 if bos_id is None else bos_id,
            eos_id=2 if eos_id is None else eos_id)
    except MinillamaError as exc:
        raise MinillamaError(f"{source}: {exc}") from None


# --------------------------------------------------------------------------------------------------------------
# Model-parallel shards
# --------------------------------------------------------------------------------------------------------------
# How Meta's model.py splits each weight across model-parallel ranks (fairscale): ColumnParallelLinear splits the
# output features (dim 0 of the weight), RowParallelLinear the input features (dim 1). Norms are replicated.
# The embedding is the one that changed: ParallelEmbedding (LLaMA 1, Llama 2) splits the embedding dimension,
# VocabParallelEmbedding (Llama 3) the vocabulary; `_embedding_split` tells them apart by shape.
_SPLIT_DIM = {
    "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
    "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0, "output.weight": 0,
    "attention.wo.weight": 1, "feed_forward.w2.weight": 1,
    "attention_norm.weight": None, "ffn_norm.weight": None, "norm.weight": None,
}
_SKIPPED = {"rope.freqs"}  # LLaMA 1/2 saved the RoPE frequencies; we derive them from params


def shard_paths(directory: Path) -> list[Path]:
    """consolidated.00.pth, consolidated.01.pth, ... in rank order, checked to be numbered 0..n-1."""
    numbered = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _SHARD_NAME.fullmatch(p.name)))
    if not numbered:
        raise MinillamaError(f"{directory}: no consolidated.NN.pth weight files")
    ranks = [rank for rank, _ in numbered]
    if ranks != list(range(len(ranks))):
        names = ", ".join(path.name for _, path in numbered)
        raise MinillamaError(f"{directory}: model-parallel shards must be numbered 00, 01, ... without gaps or "
                             f"repeats; found {names}")
    return [path for _, path in numbered]


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        # mmap: a 70B shard is ~17 GB; tensors are read from disk as they are merged, not all up front.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MinillamaError(f"{path}: not a readable PyTorch weights file ({first_line})") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise MinillamaError(f"{path}: expected a dict of tensors")
    return {name: t for name, t in state.items() if name not in _SKIPPED}


def _embedding_split(shapes: list[tuple[int, ...]], dim: int, paths: list[Path]) -> int:
    """The dimension the shards of tok_embeddings.weight are cut along: 1 for ParallelEmbedding (each shard
    (V, dim / n)), 0 for VocabParallelEmbedding (each shard (V / n, dim))."""
    if shapes[0][1] == dim:
        return 0
    if shapes[0][1] * len(shapes) == dim:
        return 1
    raise MinillamaError(f"{paths[0]}: tok_embeddings.weight has shape {shapes[0]}, which is neither (V, {dim}) "
                         f"nor (V, {dim} / {len(shapes)} shards) for params.json's dim={dim}")


def merge_shards(paths: list[Path], dim: int) -> dict[str, torch.Tensor]:
    """One state dict from the model-parallel shards (Meta's names, Meta's rotary order)."""
    shards = [_load_shard(path) for path in paths]
    names = list(shards[0])
    for path, shard in zip(paths[1:], shards[1:]):
        if set(shard) != set(names):
            odd = sorted(set(shard) ^ set(names))[0]
            raise MinillamaError(f"{path} and {paths[0]} hold different tensors (e.g. {odd})")
    merged = {}
    for name in names:
        parts = [shard[name] for shard in shards]
        for path, part in zip(paths[1:], parts[1:]):
            if part.shape != parts[0].shape or part.dtype != parts[0].dtype:
                raise MinillamaError(f"shards disagree: {name} is {tuple(part.shape)} {part.dtype} in {path.name} "
                                     f"but {tuple(parts[0].shape)} {parts[0].dtype} in {paths[0].name}")
        key = re.sub(r"^layers\.\d+\.", "", name)
        if name == "tok_embeddings.weight":
            split = _embedding_split([tuple(p.shape) for p in parts], dim, paths) if len(parts) > 1 else 0
        elif key in _SPLIT_DIM:
            split = _SPLIT_DIM[key]
        else:
            raise MinillamaError(f"{paths[0]}: unexpected tensor {name} for a LLaMA checkpoint")
        if split is None:
            for path, part in zip(paths[1:], parts[1:]):
                if not torch.equal(part, parts[0]):
                    raise MinillamaError(f"shards disagree: {name} should be replicated but {path.name} differs "
                                         f"from {paths[0].name}")
            merged[name] = parts[0]
        else:
            merged[name] = torch.cat(parts, dim=split) if len(parts) > 1 else parts[0]
    return merged


# --------------------------------------------------------------------------------------------------------------
# The conversion
# --------------------------------------------------------------------------------------------------------------
def load_meta(directory: str | Path, max_seq_len: int | None = None) -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) from a Meta checkpoint directory, the model in our (rotate-half) layout and the dtype
    the shards hold (bf16 for Meta's releases). `max_seq_len` overrides the context guessed from params.json."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MinillamaError(f"Meta checkpoint directory {directory} not found")
    params = read_params(directory)
    if not (directory / TOKENIZER_FILE).is_file():
        raise MinillamaError(f"{directory}: no {TOKENIZER_FILE} (SentencePiece for LLaMA 1/2, a tiktoken rank "
                             "file for Llama 3)")
    tokenizer = load_tokenizer(directory / TOKENIZER_FILE)
    paths = shard_paths(directory)
    state = merge_shards(paths, params.dim)

    cfg = model_config(params, tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id,
                       tie_embeddings="output.weight" not in state, max_seq_len=max_seq_len,
                       source=str(directory / PARAMS_FILE))
    if tokenizer.vocab_size > cfg.vocab_size:
        raise MinillamaError(f"{directory / TOKENIZER_FILE} has {tokenizer.vocab_size} tokens but params.json's "
                             f"vocab_size is {cfg.vocab_size}")
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if cfg.tie_embeddings:
        del expected["output.weight"]
    for name, shape in expected.items():
        if name not in state:
            raise MinillamaError(f"{paths[0]}: tensor {name} is missing")
        if tuple(state[name].shape) != shape:
            raise MinillamaError(f"{name} merged from {len(paths)} shard(s) has shape {tuple(state[name].shape)} "
                                 f"but {directory / PARAMS_FILE} implies {shape}")
    for i in range(cfg.n_layers):
        for projection, heads in (("wq", cfg.n_heads), ("wk", cfg.n_kv_heads)):
            name = f"layers.{i}.attention.{projection}.weight"
            state[name] = meta_to_hf_rotary(state[name], heads)
    if cfg.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight  # assign=True gave each name its own Parameter
    model.reset_buffers()
    return model, tokenizer


def convert_meta(directory: str | Path, out: str | Path, max_seq_len: int | None = None) -> Path:
    """Convert a Meta checkpoint directory to our Hugging Face-format directory `out` (written atomically: on any
    error nothing is left at `out`). Weights keep their stored dtype. Returns `out`."""
    model, tokenizer = load_meta(directory, max_seq_len=max_seq_len)
    return save(model, tokenizer, out)


__all__ = ["convert_meta", "load_meta", "hf_to_meta_rotary", "meta_to_hf_rotary", "MetaParams", "read_params",
           "merge_shards", "shard_paths", "model_config"]
