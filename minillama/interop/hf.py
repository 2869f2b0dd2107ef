"""Hugging Face's Llama as minillama sees it: tensor names and config.json fields, both ways.

Our checkpoint format *is* the Hugging Face directory layout (minillama/checkpoint.py writes and reads it); this
module holds the two mappings that make it so: parameter names (`to_hf_name` / `from_hf_name`) and
`config.json` <-> `ModelConfig` (`config_from_hf` / `config_to_hf`), with LlamaConfig's defaults and both
transformers 4's and 5's ways of writing RoPE.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from minillama.config import ModelConfig, RopeScaling, coerce_value
from minillama.errors import MinillamaError

CONFIG_FILE = "config.json"


# --------------------------------------------------------------------------------------------------------------
# Tensor names: ours <-> Hugging Face's LlamaForCausalLM. Our RoPE already uses HF's "rotate half" layout, so
# the weights themselves need no permutation (Meta's original checkpoints would).
# --------------------------------------------------------------------------------------------------------------
_TOP_LEVEL_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {  # inside layers.{i}. (ours) and model.layers.{i}. (HF)
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_LEVEL_FROM_HF = {hf: ours for ours, hf in _TOP_LEVEL_NAMES.items()}
_LAYER_FROM_HF = {hf: ours for ours, hf in _LAYER_NAMES.items()}
# torch.compile's wrapper prefixes parameter names (of the model, or of each block compiled on its own); saving
# sees through it.
_COMPILE_PREFIX = "_orig_mod."


def to_hf_name(name: str) -> str:
    """`layers.3.attention.wq.weight` -> `model.layers.3.self_attn.q_proj.weight`. Other tensors of a known
    module keep their own name beside its weight (a quantized projection's `weight_scale`, quantize.py)."""
    module, _, tensor = name.rpartition(".")
    if tensor != "weight" and module:
        try:
            return to_hf_name(f"{module}.weight").removesuffix("weight") + tensor
        except MinillamaError:
            raise MinillamaError(f"parameter {name!r} has no Hugging Face LlamaForCausalLM name") from None
    if name in _TOP_LEVEL_NAMES:
        return _TOP_LEVEL_NAMES[name]
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    raise MinillamaError(f"parameter {name!r} has no Hugging Face LlamaForCausalLM name")


def from_hf_name(name: str) -> str | None:
    """`model.layers.3.self_attn.q_proj.weight` -> `layers.3.attention.wq.weight`; None for a name we lack."""
    module, _, tensor = name.rpartition(".")
    if tensor != "weight" and module:
        ours = from_hf_name(f"{module}.weight")
        return None if ours is None else ours.removesuffix("weight") + tensor
    if name in _TOP_LEVEL_FROM_HF:
        return _TOP_LEVEL_FROM_HF[name]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if match and match.group(2) in _LAYER_FROM_HF:
        return f"layers.{match.group(1)}.{_LAYER_FROM_HF[match.group(2)]}"
    return None


# --------------------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# --------------------------------------------------------------------------------------------------------------
_REQUIRED = object()


def _field(hf: dict[str, Any], key: str, kind: type, source: str, default: Any = _REQUIRED) -> Any:
    """hf[key] checked against `kind`; a missing or null key gives `default`, or an error if it is required."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise MinillamaError(f"{source}: missing required key {key!r}")
        return default
    return coerce_value(value, kind, f"{source}: {key}")


def _token_id(hf: dict[str, Any], key: str, default: int, source: str) -> int:
    """bos/eos ids; Llama 3 instruct models list several eos ids, of which the first ends a document."""
    value = hf.get(key)
    if isinstance(value, list):
        if not value:
            return default
        return _field({key: value[0]}, key, int, source)
    return _field(hf, key, int, source, default)


def _rope_from_hf(hf: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from transformers 5's `rope_parameters` or transformers 4's `rope_theta` +
    `rope_scaling`. transformers 5 reads `rope_parameters` first when both are present, and so do we."""
    if isinstance(hf.get("rope_parameters"), dict):
        params, where = hf["rope_parameters"], "rope_parameters"
        theta = _field(params, "rope_theta", float, f"{source}: {where}", 10000.0)
    elif hf.get("rope_parameters") is not None:
        raise MinillamaError(f"{source}: rope_parameters must be an object, got {hf['rope_parameters']!r}")
    else:
        theta = _field(hf, "rope_theta", float, source, 10000.0)
        params, where = hf.get("rope_scaling") or {}, "rope_scaling"
        if not isinstance(params, dict):
            raise MinillamaError(f"{source}: rope_scaling must be an object or null, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))  # "type" before transformers 4.42
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise MinillamaError(f"{source}: {where}.rope_type={rope_type!r} is not supported; minillama implements "
                             "'default' and Llama 3.1's 'llama3'")
    where = f"{source}: {where}"
    scaling = RopeScaling(
        factor=_field(params, "factor", float, where),
        low_freq_factor=_field(params, "low_freq_factor", float, where),
        high_freq_factor=_field(params, "high_freq_factor", float, where),
        original_max_position_embeddings=_field(params, "original_max_position_embeddings", int, where),
    )
    if scaling.factor <= 0 or scaling.original_max_position_embeddings <= 0:
        raise MinillamaError(f"{where} factor and original_max_position_embeddings must be positive")
    if scaling.high_freq_factor <= scaling.low_freq_factor:
        raise MinillamaError(f"{where} high_freq_factor={scaling.high_freq_factor} must exceed "
                             f"low_freq_factor={scaling.low_freq_factor} (the blend divides by their difference)")
    return theta, scaling


def config_from_hf(hf: dict[str, Any], source: str = CONFIG_FILE) -> ModelConfig:
    """A ModelConfig from the fields of a Hugging Face LlamaConfig (`config.json` as a dict).

    The shape keys are required rather than defaulted to LlamaConfig's 7B values: a config.json without
    `hidden_size` is broken, and a 7B-shaped guess would only fail later, against the tensors, less clearly.
    Errors name the HF key and `source`, since that is what the user can open and fix.
    """
    if not isinstance(hf, dict):
        raise MinillamaError(f"{source}: expected a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type != "llama":
        raise MinillamaError(f"{source}: model_type={model_type!r}, expected 'llama'")
    for key, unsupported in (("attention_bias", True), ("mlp_bias", True)):
        if hf.get(key) == unsupported:
            raise MinillamaError(f"{source}: {key}=true is not supported (LLaMA's projections have no bias)")
    if hf.get("hidden_act", "silu") != "silu":
        raise MinillamaError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported, expected 'silu'")

    dim = _field(hf, "hidden_size", int, source)
    n_heads = _field(hf, "num_attention_heads", int, source)
    n_kv_heads = _field(hf, "num_key_value_heads", int, source, n_heads)
    head_dim = _field(hf, "head_dim", int, source, None)
    shape = {"hidden_size": dim, "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads,
             "num_hidden_layers": _field(hf, "num_hidden_layers", int, source),
             "intermediate_size": _field(hf, "intermediate_size", int, source),
             "vocab_size": _field(hf, "vocab_size", int, source),
             "max_position_embeddings": _field(hf, "max_position_embeddings", int, source, 2048)}
    for key, value in shape.items():
        if value <= 0:
            raise MinillamaError(f"{source}: {key}={value} must be positive")
    if head_dim is None and dim % n_heads != 0:
        raise MinillamaError(f"{source}: hidden_size={dim} is not divisible by num_attention_heads={n_heads} "
                             "and no head_dim is given")
    if n_heads % n_kv_heads != 0:
        raise MinillamaError(f"{source}: num_attention_heads={n_heads} is not a multiple of "
                             f"num_key_value_heads={n_kv_heads}")
    rope_theta, rope_scaling = _rope_from_hf(hf, source)
    try:
        return ModelConfig(
            dim=dim, n_layers=shape["num_hidden_layers"], n_heads=n_heads, n_kv_heads=n_kv_heads,
            vocab_size=shape["vocab_size"], ffn_hidden_dim=shape["intermediate_size"], head_dim=head_dim,
            norm_eps=_field(hf, "rms_norm_eps", float, source, 1e-6),  # LlamaConfig's default
            rope_theta=rope_theta, rope_scaling=rope_scaling, max_seq_len=shape["max_position_embeddings"],
            tie_embeddings=_field(hf, "tie_word_embeddings", bool, source, False),
            bos_id=_token_id(hf, "bos_token_id", 1, source), eos_id=_token_id(hf, "eos_token_id", 2, source),
        )
    except MinillamaError as exc:  # what ModelConfig.validate still catches, e.g. an odd head_dim
        raise MinillamaError(f"{source}: {exc}") from None


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The config.json fields of a LlamaForCausalLM equal to `cfg`.

    RoPE is written in both styles: `rope_parameters` for transformers 5 (which prefers it) and `rope_theta` +
    `rope_scaling` for transformers 4.4x (which keeps the unknown `rope_parameters` as an inert attribute).
    Likewise `dtype` (5.x) and `torch_dtype` (4.x) name the stored float type.
    """
    scaling = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                   "high_freq_factor": s.high_freq_factor,
                   "original_max_position_embeddings": s.original_max_position_embeddings}
    rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if scaling is not None:
        rope_parameters = {**scaling, "rope_theta": cfg.rope_theta}
    hf: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_id,
        "eos_token_id": cfg.eos_id,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": rope_parameters,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if dtype is not None:
        hf["dtype"] = hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    return hf


# --------------------------------------------------------------------------------------------------------------
# Our state dict under HF names
# --------------------------------------------------------------------------------------------------------------
def unwrap_compiled(model: torch.nn.Module) -> torch.nn.Module:
    """The module torch.compile wrapped (its wrapper keeps it as `_orig_mod`), or `model` itself."""
    return getattr(model, "_orig_mod", model)


def ties_output(model: torch.nn.Module) -> bool:
    """Whether the output projection is the embedding matrix itself. A tied config's model is, unless its head
    was replaced by a quantized one (quantize.py), which keeps the embedding in floating point."""
    model = unwrap_compiled(model)
    return getattr(model.output, "weight", None) is model.tok_embeddings.weight


def hf_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors under HF names, contiguous on the CPU, floats cast to `dtype` if given.

    A tied output projection is left out: HF ties it back from `tie_word_embeddings`, and safetensors refuses
    two names for one storage anyway.
    """
    tied = ties_output(model)
    tensors = {}
    for name, tensor in model.state_dict().items():
        name = name.replace(_COMPILE_PREFIX, "")
        if tied and name == "output.weight":
            continue
        if tensor.device.type == "meta":
            raise MinillamaError(f"cannot save {name}: it is on the meta device (call init_weights() or load "
                                 "weights into the model first)")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[to_hf_name(name)] = tensor.detach().cpu().contiguous()
    return tensors


__all__ = ["CONFIG_FILE", "to_hf_name", "from_hf_name", "config_from_hf", "config_to_hf", "hf_state_dict",
           "ties_output", "unwrap_compiled"]
