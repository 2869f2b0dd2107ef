"""Checkpoints as Hugging Face model directories: `config.json` + safetensors weights + the tokenizer's files.

Our native format *is* the Hugging Face layout, so a directory we save opens in `transformers` and
llama.cpp's converters as it is, and a Llama downloaded from the Hub loads here without a conversion step:

    config.json                        LlamaForCausalLM fields (see `minillama.interop.hf`)
    model.safetensors                  all tensors, or above `max_shard_bytes`:
    model-00001-of-0000N.safetensors   ... N shards, and
    model.safetensors.index.json       {"metadata": {"total_size": ...}, "weight_map": {tensor: shard file}}
    tokenizer files                    whatever `Tokenizer.save` writes

Weights are read with safetensors only, never `torch.load`: a pickle can run arbitrary code, a safetensors file
is a JSON header and raw bytes. Saving is atomic (see `minillama.files.atomic_directory`), so a crash while
saving never leaves a half-written checkpoint where a complete one was. The training loop stores its model
through `save_model_files` inside its own step directory and keeps optimizer state beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minillama.config import ModelConfig
from minillama.errors import MinillamaError
from minillama.files import aside_path, atomic_directory, read_json
from minillama.interop.hf import (
    CONFIG_FILE,
    config_from_hf,
    config_to_hf,
    from_hf_name,
    hf_state_dict,
    ties_output,
    to_hf_name,
    unwrap_compiled,
)
from minillama.model import Transformer

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# transformers 4.x's default `max_shard_size="5GB"` (decimal, as HF counts); transformers 5 moved to 50GB, but
# 5 GB shards stay under every upload and filesystem limit in common use and cost nothing in load time.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
# Names `load` takes as evidence that a directory holds a tokenizer: HF tokenizers, sentencepiece, tiktoken.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "tokenizer.tiktoken")
# A quantized checkpoint (quantize.py) stores its weights under another name: transformers 5 only warns
# about an unknown `quantization_config` and would cast the int8 tensors into its bf16 Linears, loading garbage;
# without a model.safetensors it stops with "no file named model.safetensors" instead (tests/test_quantize.py).
QUANTIZED_STEM = "minillama-quantized"


def _weight_file_names(quantized: bool) -> tuple[str, str, str]:
    """(single file, index file, shard stem) of a plain or a quantized checkpoint."""
    if not quantized:
        return WEIGHTS_FILE, INDEX_FILE, "model"
    return f"{QUANTIZED_STEM}.safetensors", f"{QUANTIZED_STEM}.safetensors.index.json", QUANTIZED_STEM


def read_config(directory: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint directory, from its config.json."""
    source, hf = _read_hf_config(directory)
    return config_from_hf(hf, source)


def _read_hf_config(directory: str | Path) -> tuple[str, dict]:
    path = Path(directory) / CONFIG_FILE
    return str(path), read_json(path, missing=f"{path}: not found; a checkpoint directory needs a config.json")


# --------------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------------
def _plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards of at most max_shard_bytes, in order, as transformers does; a tensor
    bigger than the limit gets a shard to itself (tensors are never split)."""
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += size
    return shards


def _write_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # {"format": "pt"} is what transformers writes and checks for before trusting a file's layout.
    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_json(data: Any, path: Path) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_model_files(model: torch.nn.Module, tokenizer: Any, directory: str | Path, *,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: torch.dtype | None = None) -> None:
    """Write config.json, the weights and the tokenizer's files into an existing `directory`, not atomically.

    `save` wraps this in `atomic_directory`; the trainer calls it inside its own atomic step directory.
    `dtype` casts floating tensors (e.g. bfloat16 to halve the file); None keeps the model's dtype.
    """
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise MinillamaError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    directory = Path(directory)
    cfg = unwrap_compiled(model).cfg
    tensors = hf_state_dict(model, dtype)
    float_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    hf_config = config_to_hf(cfg, float_dtypes.pop() if len(float_dtypes) == 1 else None)
    quantization = getattr(unwrap_compiled(model), "quantization", None)  # set by quantize.py
    if quantization is not None:
        hf_config["quantization_config"] = quantization.to_hf()
    if tokenizer is not None:
        if tokenizer.vocab_size > cfg.vocab_size:
            raise MinillamaError(f"tokenizer vocab_size={tokenizer.vocab_size} exceeds the model's "
                                 f"vocab_size={cfg.vocab_size}: its top token ids have no embedding row")
        # The tokenizer is the authority on which ids mark a document's start and end.
        for key, attr in (("bos_token_id", "bos_id"), ("eos_token_id", "eos_id")):
            if getattr(tokenizer, attr, None) is not None:
                hf_config[key] = getattr(tokenizer, attr)
        tokenizer.save(directory)  # first, so that a stray config.json of its own is overwritten by ours

    single_file, index_file, stem = _weight_file_names("quantization_config" in hf_config)
    shards = _plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        _write_shard(tensors, directory / single_file)
    else:
        weight_map = {}
        for i, names in enumerate(shards, start=1):
            file_name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
            _write_shard({name: tensors[name] for name in names}, directory / file_name)
            weight_map.update(dict.fromkeys(names, file_name))
        total_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        total_parameters = sum(t.numel() for t in tensors.values())
        _write_json({"metadata": {"total_size": total_bytes, "total_parameters": total_parameters},
                     "weight_map": weight_map}, directory / index_file)
    _write_json(hf_config, directory / CONFIG_FILE)


def save(model: torch.nn.Module, tokenizer: Any, directory: str | Path, *,
         max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: torch.dtype | None = None) -> Path:
    """Save `model` (and `tokenizer`, which may be None) as a Hugging Face directory, atomically.

    An existing `directory` is replaced: until the new checkpoint is complete on disk the old one stays, and a
    crash at any instant leaves one of the two whole (see `atomic_directory`). Returns the directory.
    """
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        save_model_files(model, tokenizer, tmp, max_shard_bytes=max_shard_bytes, dtype=dtype)
    return directory


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------
def _weight_files(directory: Path, quantized: bool = False) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files to read, and the index's weight_map when the checkpoint is sharded. A single
    model.safetensors wins over an index, as in transformers."""
    single_file, index_file, _ = _weight_file_names(quantized)
    single = directory / single_file
    if single.exists():
        return [single], None
    index_path = directory / index_file
    index = read_json(index_path, missing=f"{directory}: no {single_file} and no {index_file}; no weights to load")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise MinillamaError(f"{index_path}: expected a 'weight_map' object of tensor name -> shard file")
    shards = []
    for file_name in sorted(set(weight_map.values())):
        if Path(file_name).name != file_name:
            raise MinillamaError(f"{index_path}: shard {file_name!r} is not a file name inside the directory")
        if not (directory / file_name).exists():
            raise MinillamaError(f"{index_path} names shard {file_name}, which is missing from {directory}")
        shards.append(directory / file_name)
    return shards, weight_map


def _read_shard(path: Path, device: torch.device, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, moved to `device` (and cast) one at a time so that host memory
    peaks at one tensor beyond the memory map. Any failure to parse names the file."""
    tensors = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                tensors[name] = tensor.to(device)
    except (SafetensorError, OSError, ValueError) as exc:
        raise MinillamaError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from None
    return tensors


def load_state(directory: str | Path, cfg: ModelConfig, *, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None, template: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint directory under our names, checked name by name and shape by shape (and the
    dtype of integer tensors) against `template`, a model on the meta device (default: the one `cfg`
    describes). A tied output projection appears as `tok_embeddings.weight` only."""
    directory, device = Path(directory), torch.device(device)
    if template is None:
        with torch.device("meta"):
            template = Transformer(cfg)
    expected = {name: tuple(t.shape) for name, t in template.state_dict().items()}
    integer_dtypes = {name: t.dtype for name, t in template.state_dict().items() if not t.is_floating_point()}
    if ties_output(template):
        del expected["output.weight"]
    quantized = getattr(template, "quantization", None) is not None  # set by quantize.py
    files, weight_map = _weight_files(directory, quantized)
    state: dict[str, torch.Tensor] = {}
    source: dict[str, Path] = {}
    for path in files:
        for hf_name, tensor in _read_shard(path, device, dtype).items():
            name = from_hf_name(hf_name)
            if name is None and hf_name.endswith("rotary_emb.inv_freq"):
                continue  # transformers < 4.31 saved RoPE frequencies; we derive them from the config
            if name == "output.weight" and ties_output(template):
                continue  # some tied checkpoints store lm_head too; transformers ignores it and so do we
            if name is None or name not in expected:
                raise MinillamaError(f"{path}: unexpected tensor {hf_name} for the model config.json describes "
                                     f"({cfg.n_layers} layers, tie_word_embeddings={cfg.tie_embeddings})")
            if name in state:
                raise MinillamaError(f"{path}: tensor {hf_name} also appears in {source[name]}")
            if tuple(tensor.shape) != expected[name]:
                raise MinillamaError(f"{path}: tensor {hf_name} has shape {tuple(tensor.shape)} but config.json "
                                     f"implies {expected[name]}")
            wanted = integer_dtypes.get(name)  # quantized weights; anything else is floating point
            if (tensor.dtype != wanted) if wanted is not None else not tensor.is_floating_point():
                raise MinillamaError(f"{path}: tensor {hf_name} has dtype {tensor.dtype} but config.json implies "
                                     f"{integer_dtypes.get(name, 'a floating-point dtype')}")
            state[name], source[name] = tensor, path
    if weight_map is not None:
        index_path = directory / _weight_file_names(quantized)[1]
        for hf_name, file_name in weight_map.items():
            name = from_hf_name(hf_name)
            if name in state and source[name].name != file_name:
                raise MinillamaError(f"{index_path} places {hf_name} in {file_name}, but it is in "
                                     f"{source[name].name}")
            if name in expected and name not in state:
                raise MinillamaError(f"{index_path} places {hf_name} in {file_name}, which lacks it")
    for name in expected:
        if name not in state:
            where = ", ".join(p.name for p in files)
            raise MinillamaError(f"{directory}: tensor {to_hf_name(name)} is missing (read {where})")
    return state


def load_model(directory: str | Path, *, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> Transformer:
    """The Transformer stored in a checkpoint directory, without its tokenizer.

    The model is built on the meta device and the loaded tensors are assigned into it, so no memory is spent
    on a random initialisation that would be overwritten. `dtype=None` keeps the stored dtype (as transformers
    5 does by default); pass torch.float32 for fp32 master weights when training.
    """
    directory = Path(directory)
    _check_directory(directory)
    source, hf = _read_hf_config(directory)
    cfg = config_from_hf(hf, source)
    with torch.device("meta"):
        model = Transformer(cfg)
    if "quantization_config" in hf:
        # Quantized Linears are swapped in from outside the model (quantize.py, which imports this module).
        from minillama.quantize import QuantizationSpec, quantize_structure

        quantize_structure(model, QuantizationSpec.from_hf(hf["quantization_config"], source), torch.bfloat16)
    tied = ties_output(model)
    state = load_state(directory, cfg, device=device, dtype=dtype, template=model)
    if tied:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        # assign=True gave each name its own Parameter; tie them back into one, as the constructor does.
        model.output.weight = model.tok_embeddings.weight
    model.reset_buffers()  # RoPE frequencies are still on the meta device: derived, never stored
    if "quantization_config" in hf:
        from minillama.quantize import set_scale_dtype

        set_scale_dtype(model)  # where its quantized matmuls run fastest (an fp32 load: bf16 on AVX2 and AVX-512)
    return model


def _check_directory(directory: Path) -> None:
    if directory.is_dir():
        return
    aside = aside_path(directory.absolute())
    if aside.is_dir():
        raise MinillamaError(f"{directory} not found, but {aside} holds the complete checkpoint that an "
                             "interrupted save moved aside; rename it back (saving to the directory again "
                             "restores it first)")
    raise MinillamaError(f"checkpoint directory {directory} not found")


def has_tokenizer(directory: str | Path) -> bool:
    return any((Path(directory) / name).exists() for name in TOKENIZER_FILES)


def load(directory: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
         quantize: str | None = None, group_size: int | None = None) -> tuple[Transformer, Any]:
    """(model, tokenizer) from a checkpoint directory; the tokenizer is None when the directory has none.

    Works on directories written by `save` (quantized ones included) and on Hugging Face Llama directories
    (transformers' `save_pretrained`, Hub downloads). `quantize="int8"` or `"int4"` (with `group_size`)
    quantizes the weights after loading (`minillama.quantize.quantize`).
    """
    directory = Path(directory)
    if group_size is not None and quantize is None:
        raise MinillamaError(f"group size {group_size} given without quantize='int4' (--quantize int4)")
    if quantize is not None:
        from minillama.quantize import QuantizationSpec, quantization_spec
        from minillama.quantize import quantize as quantize_model

        spec = QuantizationSpec.create(quantize, group_size)  # bad values fail before the weights are read
    model = load_model(directory, device=device, dtype=dtype)
    if quantize is not None:
        if quantization_spec(model) is not None:
            raise MinillamaError(f"{directory} is already quantized ({quantization_spec(model).method}); load it "
                                 "without quantizing again")
        quantize_model(model, spec.method, spec.group_size)
    tokenizer = None
    if has_tokenizer(directory):
        from minillama.tokenizer import load_tokenizer  # tokenizer sits beside checkpoint in the layering

        tokenizer = load_tokenizer(directory)
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise MinillamaError(f"{directory}: tokenizer vocab_size={tokenizer.vocab_size} exceeds the model's "
                                 f"vocab_size={model.cfg.vocab_size}")
    return model, tokenizer


__all__ = ["save", "load", "load_model", "load_state", "save_model_files", "read_config", "has_tokenizer",
           "DEFAULT_MAX_SHARD_BYTES", "TOKENIZER_FILES"]
