"""Export a checkpoint to GGUF, the file format of llama.cpp (and of Ollama, LM Studio, ...).

    export_gguf("runs/default/step-0001000", "model.gguf", dtype="q8_0")
    # or: minillama export gguf runs/default/step-0001000 --out model.gguf --dtype q8_0

A GGUF file is a header of typed key/value metadata, then tensor descriptors and aligned tensor data
(ggml/docs/gguf.md). We write llama.cpp's "llama" architecture, whose keys, tensor names and enums we take from
the `gguf` package (llama.cpp's own Python side: gguf.constants), and three things llama.cpp expects of it:

- Query and key rows in Meta's interleaved rotary order: llama.cpp's llama graph rotates adjacent pairs
  (ggml's "normal" RoPE mode), where our weights (Hugging Face's layout) pair coordinate i with i + D/2.
- Llama 3.1's RoPE scaling as a `rope_freqs` tensor: llama.cpp divides pair i's frequency by factor i
  (ggml_rope_ext's freq_factors), so factor i = unscaled / scaled frequency.
- The vocabulary as its tokenizer kind: byte-level BPE as "gpt2" (tokens in GPT-2's byte-to-unicode
  spelling, merges, and the name of the pre-tokenizer regex llama.cpp should split with), SentencePiece as
  "llama" (pieces, scores, types).

Weights: f32, f16 or q8_0 for matrices (gguf.quants, bit-exact with ggml's reference quantizer); norms and
rope_freqs stay f32, as llama.cpp's "mostly" file types do. The file is written beside `out` under a temporary
name and renamed, so a failure never leaves a partial .gguf.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minillama.checkpoint import load
from minillama.errors import MinillamaError
from minillama.files import atomic_file
from minillama.interop.meta import hf_to_meta_rotary
from minillama.model import Transformer, rope_inverse_frequencies
from minillama.tokenizer import (
    BPE_SPLIT_PATTERN,
    LLAMA3_SPLIT_PATTERN,
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    Tokenizer,
)

DTYPES = ("f32", "f16", "q8_0")
_F16_MAX = 65504.0


def _gguf():
    """The `gguf` package, imported when needed so that the rest of minillama works without it."""
    try:
        import gguf
        import gguf.quants
        import gguf.vocab
    except ImportError:
        raise MinillamaError("GGUF export needs the `gguf` package: pip install gguf") from None
    return gguf


# --------------------------------------------------------------------------------------------------------------
# Tensors: our names -> llama.cpp's, in the layout and type llama.cpp reads
# --------------------------------------------------------------------------------------------------------------
def _tensor_kinds() -> tuple[dict[str, object], dict[str, object]]:
    t = _gguf().MODEL_TENSOR
    top = {"tok_embeddings.weight": t.TOKEN_EMBD, "norm.weight": t.OUTPUT_NORM, "output.weight": t.OUTPUT}
    layer = {"attention_norm.weight": t.ATTN_NORM, "attention.wq.weight": t.ATTN_Q, "attention.wk.weight": t.ATTN_K,
             "attention.wv.weight": t.ATTN_V, "attention.wo.weight": t.ATTN_OUT, "ffn_norm.weight": t.FFN_NORM,
             "feed_forward.w1.weight": t.FFN_GATE, "feed_forward.w3.weight": t.FFN_UP,
             "feed_forward.w2.weight": t.FFN_DOWN}
    return top, layer


def gguf_tensor_name(name: str) -> str:
    """`layers.3.attention.wq.weight` -> `blk.3.attn_q.weight` (gguf.TENSOR_NAMES for the llama arch)."""
    gguf = _gguf()
    top, layer = _tensor_kinds()
    if name in top:
        return gguf.TENSOR_NAMES[top[name]] + ".weight"
    prefix, _, rest = name.partition(".")
    block, _, rest = rest.partition(".")
    if prefix == "layers" and block.isdigit() and rest in layer:
        return gguf.TENSOR_NAMES[layer[rest]].format(bid=int(block)) + ".weight"
    raise MinillamaError(f"parameter {name!r} has no llama.cpp tensor name")


def rope_freq_factors(model: Transformer) -> torch.Tensor | None:
    """Llama 3.1 scaling as llama.cpp's per-pair divisors of the RoPE frequency; None without scaling."""
    cfg = model.cfg
    if cfg.rope_scaling is None:
        return None
    unscaled = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, None)
    scaled = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    return unscaled / scaled


def gguf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """llama.cpp name -> fp32 tensor (numpy's row-major shape; GGUF stores the dims reversed, as ggml counts).
    A tied output projection is left out: llama.cpp then reads token_embd for both."""
    cfg = model.cfg
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue
        tensor = tensor.detach().to(device="cpu", dtype=torch.float32)
        if name.endswith("attention.wq.weight"):
            tensor = hf_to_meta_rotary(tensor, cfg.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = hf_to_meta_rotary(tensor, cfg.n_kv_heads)
        tensors[gguf_tensor_name(name)] = tensor.contiguous()
    factors = rope_freq_factors(model)
    if factors is not None:
        tensors[_gguf().TENSOR_NAMES[_gguf().MODEL_TENSOR.ROPE_FREQS] + ".weight"] = factors.float()
    return tensors


def _encode(name: str, array: np.ndarray, dtype: str) -> tuple[np.ndarray, object]:
    """(data, ggml type) of one tensor for `dtype`. Vectors stay f32; a q8_0 matrix whose rows are not whole
    32-value blocks (never the case for LLaMA shapes) falls back to f16."""
    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType
    if array.ndim == 1 or dtype == "f32":
        return array.astype(np.float32), qtype.F32
    if dtype == "f16" or array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype.Q8_0][0] != 0:
        peak = float(np.abs(array).max()) if array.size else 0.0
        if peak > _F16_MAX:
            raise MinillamaError(f"{name}: a weight of magnitude {peak:.3g} does not fit in f16 (max {_F16_MAX}); "
                                 "export with --dtype f32")
        return array.astype(np.float16), qtype.F16
    return gguf.quants.quantize(array.astype(np.float32), qtype.Q8_0), qtype.Q8_0


# --------------------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------------------
@dataclass
class GGUFVocab:
    """What llama.cpp's tokenizer reads: tokens by id, their types (gguf.TokenType), SentencePiece scores or
    BPE merges, and the pre-tokenizer name (llama.cpp's llama-vocab.cpp knows each regex by name)."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    add_space_prefix: bool | None = None
    unk_id: int | None = None


# A byte-level BPE split regex -> llama.cpp's name for it. Ours (Llama 3's with single digits) is the one
# llama.cpp calls "qwen2"; Llama 3's own is "llama-bpe".
_PRE_TOKENIZERS = {BPE_SPLIT_PATTERN: "qwen2", LLAMA3_SPLIT_PATTERN: "llama-bpe"}


def _pad(tokens: list[str | None], types: list[int], vocab_size: int) -> None:
    """Fill ids no token owns (an embedding table padded past the tokenizer) with unused placeholders, so the
    vocabulary has exactly one entry per embedding row, as llama.cpp requires."""
    unused = int(_gguf().TokenType.UNUSED)
    tokens.extend([None] * (vocab_size - len(tokens)))
    types.extend([unused] * (vocab_size - len(types)))
    for i, token in enumerate(tokens):
        if token is None:
            tokens[i], types[i] = f"[PAD{i}]", unused


def _byte_level_pre_name(pre_tokenizer: dict | None, source: str) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json `pre_tokenizer`: Split(regex) + ByteLevel without its
    own regex (ours, Llama 3's), or ByteLevel with GPT-2's built-in regex."""
    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer]) if pre_tokenizer else []
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) \
            and not steps[1].get("add_prefix_space") and steps[0].get("behavior") == "Isolated":
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern in _PRE_TOKENIZERS:
            return _PRE_TOKENIZERS[pattern]
    raise MinillamaError(f"{source}: pre-tokenizer {json.dumps(pre_tokenizer)[:120]} has no llama.cpp "
                         "equivalent we know; supported: our byte-level BPE, Llama 3's and GPT-2's")


def _huggingface_vocab(tokenizer: HuggingFaceTokenizer, vocab_size: int) -> GGUFVocab:
    token_type = _gguf().TokenType
    spec = json.loads(tokenizer.__getstate__()["json"])  # the tokenizer.json it was built from
    model = spec.get("model", {})
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise MinillamaError(f"tokenizer.json: a {model.get('type')} model with a "
                             f"{(spec.get('decoder') or {}).get('type')} decoder; GGUF export supports byte-level BPE")
    pre = _byte_level_pre_name(spec.get("pre_tokenizer"), "tokenizer.json")
    entries = {i: (token, token_type.NORMAL) for token, i in model["vocab"].items()}
    for added in spec.get("added_tokens", []):
        entries[added["id"]] = (added["content"], token_type.CONTROL if added.get("special") else
                                token_type.USER_DEFINED)
    if max(entries) >= vocab_size:
        raise MinillamaError(f"tokenizer.json has token id {max(entries)}, beyond the model's {vocab_size} "
                             "embedding rows")
    tokens: list[str | None] = [None] * vocab_size
    types = [int(token_type.UNUSED)] * vocab_size
    for i, (token, kind) in entries.items():
        tokens[i], types[i] = token, int(kind)
    _pad(tokens, types, vocab_size)
    # tokenizers >= 0.20 writes each merge as a pair, older versions as one "left right" string.
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return GGUFVocab("gpt2", tokens, types, merges=merges, pre=pre, unk_id=tokenizer.token_to_id("<unk>"))


def _tiktoken_merges(ranks: dict[bytes, int], spell) -> list[str]:
    """BPE merges recovered from tiktoken ranks: the merge that builds token T is the last step of byte-pair
    encoding T with only the tokens ranked below it, and merges take the priority of the token they build.
    (A rank file stores only the tokens; tiktoken's encoder merges by lowest rank, which is this merge list.)"""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            candidates = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
            best_rank, i = min(candidates)
            if best_rank >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise MinillamaError(f"tiktoken rank file: token {token!r} (rank {rank}) cannot be built by merging two "
                                 "lower-ranked tokens, so it has no BPE merge")
        merges.append(f"{spell(parts[0])} {spell(parts[1])}")
    return merges


def _tiktoken_vocab(tokenizer: TiktokenTokenizer, vocab_size: int) -> GGUFVocab:
    gguf = _gguf()
    if tokenizer.pattern not in _PRE_TOKENIZERS:
        raise MinillamaError("tiktoken tokenizer: its split pattern has no llama.cpp pre-tokenizer name we know")
    byte_to_char = gguf.vocab.bytes_to_unicode()  # GPT-2's printable spelling of each byte, as llama.cpp reads BPE

    def spell(token: bytes) -> str:
        return "".join(byte_to_char[b] for b in token)

    ranks: dict[bytes, int] = tokenizer.__getstate__()["ranks"]
    tokens: list[str | None] = [None] * tokenizer.vocab_size
    types = [int(gguf.TokenType.NORMAL)] * tokenizer.vocab_size
    for token, rank in ranks.items():
        tokens[rank] = spell(token)
    for name, i in tokenizer.special_tokens.items():
        tokens[i], types[i] = name, int(gguf.TokenType.CONTROL)
    _pad(tokens, types, vocab_size)
    return GGUFVocab("gpt2", tokens, types, merges=_tiktoken_merges(ranks, spell),
                     pre=_PRE_TOKENIZERS[tokenizer.pattern])


def _sentencepiece_vocab(tokenizer: SentencePieceTokenizer, vocab_size: int) -> GGUFVocab:
    import sentencepiece

    token_type = _gguf().TokenType
    sp = sentencepiece.SentencePieceProcessor(model_proto=tokenizer.__getstate__()["proto"])
    tokens: list[str | None] = []
    types, scores = [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        kind = token_type.NORMAL
        for test, value in ((sp.is_unknown, token_type.UNKNOWN), (sp.is_control, token_type.CONTROL),
                            (sp.is_unused, token_type.UNUSED), (sp.is_byte, token_type.BYTE)):
            if test(i):
                kind = value
        types.append(int(kind))
    _pad(tokens, types, vocab_size)
    scores.extend([0.0] * (vocab_size - len(scores)))
    # SentencePiece's add_dummy_prefix (Llama's: on) shows as the "▁" it puts before the first word.
    add_space_prefix = sp.encode("a", out_type=str)[0].startswith("\u2581")
    return GGUFVocab("llama", tokens, types, scores=scores, add_space_prefix=add_space_prefix,
                     unk_id=sp.unk_id() if sp.unk_id() >= 0 else None)


def gguf_vocab(tokenizer: Tokenizer, vocab_size: int) -> GGUFVocab:
    """The vocabulary of `tokenizer` as llama.cpp reads it, padded to `vocab_size` entries."""
    if isinstance(tokenizer, HuggingFaceTokenizer):
        return _huggingface_vocab(tokenizer, vocab_size)
    if isinstance(tokenizer, TiktokenTokenizer):
        return _tiktoken_vocab(tokenizer, vocab_size)
    if isinstance(tokenizer, SentencePieceTokenizer):
        return _sentencepiece_vocab(tokenizer, vocab_size)
    raise MinillamaError(f"GGUF export does not know the tokenizer type {type(tokenizer).__name__}")


# --------------------------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------------------------
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}


def _add_metadata(writer, model: Transformer, tokenizer: Tokenizer, vocab: GGUFVocab, name: str, dtype: str) -> None:
    gguf = _gguf()
    cfg = model.cfg
    writer.add_name(name)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPES[dtype])))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_hidden_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)

    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.unk_id is not None:
        writer.add_unk_token_id(vocab.unk_id)
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    if tokenizer.eos_id is not None:
        writer.add_eos_token_id(tokenizer.eos_id)
    # LLaMA models are trained with bos before every document (our generate and eval prepend it too).
    writer.add_add_bos_token(tokenizer.bos_id is not None)
    writer.add_add_eos_token(False)


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise MinillamaError(f"GGUF dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")


def _check_out(out: Path) -> None:
    """Fail before any work if `out` cannot be written: its directory must exist and be writable."""
    if out.is_dir():
        raise MinillamaError(f"--out {out} is a directory; give a file name such as {out / 'model.gguf'}")
    parent = out.parent
    if not parent.exists():
        raise MinillamaError(f"cannot write {out}: directory {parent} does not exist")
    if not parent.is_dir():
        raise MinillamaError(f"cannot write {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MinillamaError(f"cannot write {out}: directory {parent} is not writable")


def write_gguf(model: Transformer, tokenizer: Tokenizer, out: str | Path, dtype: str = "f16",
               name: str = "minillama") -> Path:
    """Write `model` and `tokenizer` as a llama.cpp GGUF file, atomically. Returns `out`."""
    gguf = _gguf()
    _check_dtype(dtype)
    out = Path(out)
    _check_out(out)
    vocab = gguf_vocab(tokenizer, model.cfg.vocab_size)
    try:
        with atomic_file(out) as tmp:
            writer = gguf.GGUFWriter(tmp, "llama")
            try:
                _add_metadata(writer, model, tokenizer, vocab, name, dtype)
                for tensor_name, tensor in gguf_tensors(model).items():
                    data, qtype = _encode(tensor_name, tensor.numpy(), dtype)
                    writer.add_tensor(tensor_name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_tensors_to_file()
            finally:
                writer.close()
    except OSError as exc:
        raise MinillamaError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out


def export_gguf(checkpoint: str | Path, out: str | Path, dtype: str = "f16") -> Path:
    """Export a checkpoint directory (ours or any Hugging Face Llama) to a GGUF file for llama.cpp."""
    _check_dtype(dtype)
    _gguf()
    _check_out(Path(out))
    model, tokenizer = load(checkpoint)
    if tokenizer is None:
        raise MinillamaError(f"checkpoint {checkpoint} has no tokenizer files (tokenizer.json or tokenizer.model); "
                             "a GGUF file must carry the vocabulary")
    return write_gguf(model, tokenizer, out, dtype, name=Path(checkpoint).resolve().name)


__all__ = ["export_gguf", "write_gguf", "gguf_vocab", "gguf_tensors", "gguf_tensor_name", "rope_freq_factors",
           "GGUFVocab", "DTYPES"]
