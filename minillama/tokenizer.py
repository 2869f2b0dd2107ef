"""One `Tokenizer` over the three formats LLaMA models ship with, and byte-level BPE training the LLaMA way.

    tok = load_tokenizer("path/to/dir")        # tokenizer.json, or tokenizer.model (SentencePiece or tiktoken)
    ids = tok.encode("Hello", bos=True)        # [bos_id, ...]
    tok = train_bpe(["corpus.txt"], vocab_size=8192, out_dir="tok/")

Backends, each giving exactly its reference library's ids:
  HuggingFaceTokenizer   a `tokenizer.json`, through the `tokenizers` library (also what `train_bpe` produces)
  SentencePieceTokenizer a SentencePiece `.model` (LLaMA 1 and Llama 2), through `sentencepiece`
  TiktokenTokenizer      a tiktoken rank file (Llama 3's `tokenizer.model`), through `tiktoken`, with Llama 3's
                         split pattern and 256 special tokens

Text is always text: a literal "<s>" or "<|begin_of_text|>" inside a document is encoded as ordinary characters,
never as the control token, in every backend (tiktoken's `encode_ordinary`, Meta's default; `tokenizers` with
`encode_special_tokens`). Control tokens enter a sequence only through `bos=`/`eos=`, so a scraped web page that
quotes a chat template cannot inject one into training data. `decode` is the inverse on text: it drops special
tokens, so `decode(encode(text, bos=True, eos=True)) == text`.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from minillama.errors import MinillamaError
from minillama.files import make_dir

# --------------------------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------------------------


class Tokenizer(ABC):
    """Text <-> token ids. Subclasses wrap one library; all of them pickle to a few MB of defining data, so a
    data-preparation worker process gets its own copy cheaply (`encode_batch` is the fast path there)."""

    bos_id: int | None  # None when the vocabulary has no such token (e.g. some third-party tokenizer.json)
    eos_id: int | None

    @abstractmethod
    def _encode(self, text: str) -> list[int]:
        """The ids of `text` alone, no bos/eos."""

    @abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode(t)` for each text, without bos/eos, using the library's batched (multi-threaded) path."""

    @abstractmethod
    def _decode(self, ids: list[int]) -> str: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included: the model's embedding table needs at least this many rows."""

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary entry (e.g. "<|eot_id|>"), or None if there is none."""

    @abstractmethod
    def save(self, directory: str | Path) -> Path:
        """Write the files `load_tokenizer(directory)` reads back into an equal tokenizer; returns the directory."""

    @abstractmethod
    def _defining_bytes(self) -> bytes:
        """Everything that decides the ids, serialized canonically: hashed by `fingerprint`."""

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._encode(text)
        if bos:
            ids.insert(0, self._require(self.bos_id, "bos"))
        if eos:
            ids.append(self._require(self.eos_id, "eos"))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, special tokens left out. Accepts lists, numpy arrays and tensors."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise MinillamaError(f"token id {bad} is out of range for this tokenizer's vocabulary of "
                                 f"{self.vocab_size} (ids 0..{self.vocab_size - 1})")
        return self._decode(ids)

    @property
    def fingerprint(self) -> str:
        """sha256 of what defines the ids: equal tokenizers have equal fingerprints, whichever file or process
        they came from. Data manifests record it so that a changed tokenizer is caught before training."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = hashlib.sha256(self._defining_bytes()).hexdigest()
        return self._fingerprint

    def _require(self, token_id: int | None, which: str) -> int:
        if token_id is None:
            raise MinillamaError(f"this tokenizer has no {which} token, so {which}=True cannot be used")
        return token_id

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
                f"fingerprint={self.fingerprint[:12]})")


# --------------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json
# --------------------------------------------------------------------------------------------------------------
# Names that mean "begin/end of sequence" in well-known tokenizer.json files without a tokenizer_config.json:
# SentencePiece/LLaMA, Llama 3, Gemma, GPT-2 (whose one <|endoftext|> serves as both).
_KNOWN_BOS = ["<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "<|endoftext|>"]
_KNOWN_EOS = ["</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>"]


class HuggingFaceTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (tokenizer.json). bos/eos come from `tokenizer_config.json` when there is one."""

    def __init__(self, tokenizer: Any, bos_token: str | None, eos_token: str | None,
                 config: dict[str, Any] | None = None) -> None:
        self._tok = tokenizer
        # Text is text (module docstring). Not part of tokenizer.json, so set on every construction.
        self._tok.encode_special_tokens = True
        self.bos_token, self.eos_token = bos_token, eos_token
        self.config = dict(config or {})  # the tokenizer_config.json it came with, kept for save()
        self.bos_id = self._id_of(bos_token)
        self.eos_id = self._id_of(eos_token)
        self._fingerprint = None

    def _id_of(self, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise MinillamaError(f"special token {token!r} named by the tokenizer config is not in the vocabulary")
        return token_id

    @classmethod
    def from_file(cls, path: Path) -> HuggingFaceTokenizer:
        from tokenizers import Tokenizer as RustTokenizer

        try:
            tok = RustTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception with a serde message
            raise MinillamaError(f"{path}: not a valid tokenizer.json ({_first_line(exc)})") from None
        config = _read_json(path.parent / "tokenizer_config.json")
        special_map = _read_json(path.parent / "special_tokens_map.json")
        vocab = tok.get_vocab(with_added_tokens=True)
        names = []
        for key, known in (("bos_token", _KNOWN_BOS), ("eos_token", _KNOWN_EOS)):
            name = _token_content(config.get(key, special_map.get(key)))
            if name is None and key not in config:
                name = next((t for t in known if t in vocab), None)
            names.append(name)
        return cls(tok, names[0], names[1], config)

    def _encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast skips computing character offsets, which data preparation never needs.
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def save(self, directory: str | Path) -> Path:
        directory = make_dir(directory)
        self._tok.save(str(directory / "tokenizer.json"))
        # tokenizer_config.json makes `transformers.AutoTokenizer.from_pretrained(directory)` give our ids:
        # split_special_tokens is transformers' name for "text is text", and clean-up would alter decoded spaces.
        config = dict(self.config)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.update(split_special_tokens=True, clean_up_tokenization_spaces=False)
        for key, token in (("bos_token", self.bos_token), ("eos_token", self.eos_token)):
            if token is not None:
                config[key] = token
        if "<unk>" in self._tok.get_vocab(with_added_tokens=True) and "unk_token" not in config:
            config["unk_token"] = "<unk>"
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return directory

    def _defining_bytes(self) -> bytes:
        header = json.dumps({"backend": "tokenizers", "bos_id": self.bos_id, "eos_id": self.eos_id})
        return header.encode() + b"\n" + self._tok.to_str().encode()

    def __getstate__(self) -> dict[str, Any]:
        return dict(json=self._tok.to_str(), bos=self.bos_token, eos=self.eos_token, config=self.config)

    def __setstate__(self, state: dict[str, Any]) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self.__init__(RustTokenizer.from_str(state["json"]), state["bos"], state["eos"], state["config"])


# --------------------------------------------------------------------------------------------------------------
# SentencePiece (LLaMA 1, Llama 2)
# --------------------------------------------------------------------------------------------------------------
class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model, ids exactly as `sentencepiece` gives them (Meta's llama/tokenizer.py does the same:
    `sp_model.encode(s)`, then bos/eos added around it)."""

    def __init__(self, model_proto: bytes) -> None:
        import sentencepiece

        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        except Exception as exc:
            raise MinillamaError(f"not a SentencePiece model ({_first_line(exc)})") from None
        self._proto = self._sp.serialized_model_proto()
        # sentencepiece reports a missing special token as -1.
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self._fingerprint = None

    def _encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)  # control pieces (<s>, </s>) decode to nothing

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    def token_to_id(self, token: str) -> int | None:
        token_id = self._sp.piece_to_id(token)  # unknown pieces map to unk's id, so check the round trip
        return token_id if self._sp.id_to_piece(token_id) == token else None

    def save(self, directory: str | Path) -> Path:
        directory = make_dir(directory)
        (directory / "tokenizer.model").write_bytes(self._proto)
        return directory

    def _defining_bytes(self) -> bytes:
        return b"sentencepiece\n" + self._proto

    def __getstate__(self) -> dict[str, Any]:
        return dict(proto=self._proto)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["proto"])


# --------------------------------------------------------------------------------------------------------------
# tiktoken (Llama 3)
# --------------------------------------------------------------------------------------------------------------
# Llama 3's pre-tokenizer split, from Meta's llama-models `models/llama3/tokenizer.py` (`pat_str`; it is
# OpenAI's cl100k_base pattern). Each alternative is one kind of chunk that BPE merges never cross:
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"  # English contractions, case-insensitive
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"  # a word, with at most one leading non-letter (usually the space before it)
    r"|\p{N}{1,3}"  # numbers in groups of up to three digits
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"  # punctuation runs, optionally after a space and before newlines
    r"|\s*[\r\n]+"  # newlines with the whitespace before them
    r"|\s+(?!\S)"  # whitespace, leaving the last space to the word that follows
    r"|\s+"  # trailing whitespace
)

# Llama 3's 256 special tokens, numbered after the ranks (128000..128255 for the 128000-rank file), in the order
# of Meta's llama-models `models/llama3_1/api/tokenizer.py` (Llama 3.1 onward; Llama 3.0 had reserved tokens at
# 128004/128005/128008/128010, but bos, eos, the header tokens and <|eot_id|> sit at the same ids in both).
_LLAMA3_NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>",  # 128000, bos
    "<|end_of_text|>",  # 128001, eos
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",  # 128006, chat format: <|start_header_id|>role<|end_header_id|>\n\n
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message (tool call follows)
    "<|eot_id|>",  # 128009, end of turn
    "<|python_tag|>",
]
LLAMA3_NUM_SPECIAL_TOKENS = 256
LLAMA3_SPECIAL_TOKENS = _LLAMA3_NAMED_SPECIAL_TOKENS + [
    f"<|reserved_special_token_{2 + i}|>" for i in range(LLAMA3_NUM_SPECIAL_TOKENS - len(_LLAMA3_NAMED_SPECIAL_TOKENS))
]

# tiktoken's regex engine recurses per character and overflowed its stack on very long runs of whitespace or of
# non-whitespace (openai/tiktoken#195). Meta's tokenizer therefore encodes at most 400,000 characters at a time,
# each cut where a run of the same kind passes 25,000 characters; we cut at the same places so ids match Meta's.
_TIKTOKEN_MAX_CHARS = 400_000
_TIKTOKEN_MAX_RUN_CHARS = 25_000
_RUNS = re.compile(r"\s+|\S+")  # Python's \s is exactly str.isspace(), the test Meta uses


def _split_long_runs(text: str) -> Iterator[str]:
    """Meta's `_split_whitespaces_or_nonwhitespaces` over 400k-character windows, without a Python loop per
    character: every run of whitespace (or of non-whitespace) is cut every 25,000 characters from its start."""
    for window_start in range(0, max(len(text), 1), _TIKTOKEN_MAX_CHARS):
        window = text[window_start:window_start + _TIKTOKEN_MAX_CHARS]
        if len(window) <= _TIKTOKEN_MAX_RUN_CHARS:
            yield window
            continue
        slice_start = 0
        for run in _RUNS.finditer(window):
            cut = run.start() + _TIKTOKEN_MAX_RUN_CHARS
            while cut < run.end():
                yield window[slice_start:cut]
                slice_start, cut = cut, cut + _TIKTOKEN_MAX_RUN_CHARS
        yield window[slice_start:]


class TiktokenTokenizer(Tokenizer):
    """A tiktoken rank file with Llama 3's split pattern and special tokens, exactly as Meta's tokenizer encodes."""

    pattern = LLAMA3_SPLIT_PATTERN
    special_token_names = LLAMA3_SPECIAL_TOKENS

    def __init__(self, mergeable_ranks: dict[bytes, int]) -> None:
        import tiktoken

        ranks = sorted(mergeable_ranks.values())
        if ranks != list(range(len(ranks))):
            # Specials are numbered from len(ranks) (Meta's num_base_tokens), so the ranks must be 0..n-1.
            raise MinillamaError(f"tiktoken ranks must be 0..{len(ranks) - 1} without gaps or repeats")
        missing_bytes = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
        if missing_bytes:  # tiktoken would panic on text containing such a byte
            raise MinillamaError(f"tiktoken rank file lacks {len(missing_bytes)} of the 256 single bytes "
                                 f"(first: {missing_bytes[0]:#04x}); every byte needs a rank")
        self._ranks = mergeable_ranks
        self.special_tokens = {name: len(ranks) + i for i, name in enumerate(self.special_token_names)}
        self._encoding = tiktoken.Encoding(name="llama3", pat_str=self.pattern, mergeable_ranks=mergeable_ranks,
                                           special_tokens=self.special_tokens)
        self.num_base_tokens = len(ranks)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self._fingerprint = None

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "tiktoken rank file") -> TiktokenTokenizer:
        """Parse the rank file format: one `base64(token) rank` pair per line (tiktoken's load_tiktoken_bpe)."""
        ranks: dict[bytes, int] = {}
        for line_number, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise MinillamaError(f"{source}: line {line_number} is not 'base64-token rank': "
                                     f"{line[:60]!r}") from None
        if not ranks:
            raise MinillamaError(f"{source}: no ranks found")
        return cls(ranks)

    def rank_file_bytes(self) -> bytes:
        """The rank file, canonically: ordered by rank, as Meta's tokenizer.model is."""
        ordered = sorted(self._ranks.items(), key=lambda item: item[1])
        return b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in ordered)

    def _encode(self, text: str) -> list[int]:
        if len(text) <= _TIKTOKEN_MAX_RUN_CHARS:  # no run can be too long: the common, fast case
            return self._encoding.encode_ordinary(text)
        return [i for piece in _split_long_runs(text) for i in self._encoding.encode_ordinary(piece)]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if all(len(t) <= _TIKTOKEN_MAX_RUN_CHARS for t in texts):
            return self._encoding.encode_ordinary_batch(texts)
        return [self._encode(t) for t in texts]

    def _decode(self, ids: list[int]) -> str:
        return self._encoding.decode([i for i in ids if i < self.num_base_tokens])

    @property
    def vocab_size(self) -> int:
        return self.num_base_tokens + len(self.special_tokens)

    def token_to_id(self, token: str) -> int | None:
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self._ranks.get(token.encode())

    def save(self, directory: str | Path) -> Path:
        directory = make_dir(directory)
        (directory / "tokenizer.model").write_bytes(self.rank_file_bytes())
        return directory

    def _defining_bytes(self) -> bytes:
        header = json.dumps({"backend": "tiktoken", "pattern": self.pattern, "special": self.special_token_names})
        return header.encode() + b"\n" + self.rank_file_bytes()

    def __getstate__(self) -> dict[str, Any]:
        return dict(ranks=self._ranks)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["ranks"])


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+\r?")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from a directory (tokenizer.json first, else tokenizer.model) or a file. A `.model` file is
    told apart by content: tiktoken's is text lines of `base64 rank`, SentencePiece's a binary protobuf."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        raise MinillamaError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
    if not path.exists():
        raise MinillamaError(f"tokenizer not found: {path}")
    if path.suffix == ".json":
        return HuggingFaceTokenizer.from_file(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MinillamaError(f"cannot read tokenizer {path}: {exc.strerror}") from None
    first_line = data.split(b"\n", 1)[0]
    if _TIKTOKEN_LINE.fullmatch(first_line):
        return TiktokenTokenizer.from_bytes(data, source=str(path))
    if not data:
        raise MinillamaError(f"{path}: empty file, expected a SentencePiece model or a tiktoken rank file")
    try:
        return SentencePieceTokenizer(data)
    except MinillamaError:
        raise MinillamaError(f"{path}: neither a SentencePiece model nor a tiktoken rank file "
                             "(lines of 'base64-token rank')") from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MinillamaError(f"{path}: cannot read as JSON ({_first_line(exc)})") from None
    return value if isinstance(value, dict) else {}


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------------------------
# Training: byte-level BPE, the LLaMA way
# --------------------------------------------------------------------------------------------------------------
# Ids 0, 1, 2 as in LLaMA's SentencePiece vocabulary, so the presets' bos_id=1, eos_id=2 hold. <unk> is never
# produced (every byte has a token) and is kept only for that layout.
BPE_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
# Llama 3's split with single digits instead of groups of three: LLaMA (Touvron et al. 2023, section 2.1) splits
# every number into individual digits, which helps arithmetic; a digit alone in its chunk can never merge.
BPE_SPLIT_PATTERN = LLAMA3_SPLIT_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
PROGRESS_MIN_BYTES = 10_000_000  # below ~10 MB training takes a second or two and a progress bar is noise
_UTF8_CHUNK_BYTES = 1 << 24


def train_bpe(paths: str | Path | Sequence[str | Path], vocab_size: int, out_dir: str | Path | None = None, *,
              min_frequency: int = 2, show_progress: bool | None = None) -> HuggingFaceTokenizer:
    """Train a byte-level BPE tokenizer on UTF-8 text files with the `tokenizers` library.

    LLaMA's recipe (Touvron et al. 2023, section 2.1): BPE, numbers split into single digits, and byte fallback
    so nothing is unknown. Byte-level BPE gives the fallback for free: the 256 bytes are the initial alphabet and
    text is never normalized, so every UTF-8 string (emoji, CJK, whitespace runs, lone combining marks) decodes
    back exactly, which SentencePiece's `▁` space marker and NFKC normalization do not guarantee. Chunks follow
    Llama 3's pattern with single digits (BPE_SPLIT_PATTERN). Specials: <unk>=0, <s>=1 (bos), </s>=2 (eos).

    The vocabulary may come out smaller than `vocab_size` when the corpus has fewer pairs seen `min_frequency`
    times. `show_progress` defaults to on for inputs of PROGRESS_MIN_BYTES or more. With `out_dir`, the result
    is also saved there (tokenizer.json + tokenizer_config.json).
    """
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not paths:
        raise MinillamaError("train_bpe needs at least one input file")
    _check_training_args(vocab_size, min_frequency)
    total_bytes = sum(_file_size(p) for p in paths)
    if show_progress is None:
        show_progress = total_bytes >= PROGRESS_MIN_BYTES
    _check_utf8(paths, total_bytes, show_progress)
    return _train(lambda tok, trainer: tok.train([str(p) for p in paths], trainer), vocab_size, out_dir,
                  min_frequency, show_progress)


def train_bpe_from_texts(texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None, *,
                         min_frequency: int = 2, show_progress: bool = False) -> HuggingFaceTokenizer:
    """`train_bpe` on strings rather than files (sources with no file of their own, such as `python:docs`)."""
    _check_training_args(vocab_size, min_frequency)
    return _train(lambda tok, trainer: tok.train_from_iterator(texts, trainer), vocab_size, out_dir,
                  min_frequency, show_progress)


def _check_training_args(vocab_size: int, min_frequency: int) -> None:
    min_vocab = 256 + len(BPE_SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise MinillamaError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {min_vocab} "
                             f"(256 bytes + {len(BPE_SPECIAL_TOKENS)} special tokens)")
    if min_frequency < 1:  # the Rust trainer takes an unsigned count: a negative one is an OverflowError
        raise MinillamaError(f"min_frequency={min_frequency} must be at least 1 (merge pairs seen that often)")


def _train(run_trainer: Callable[[Any, Any], None], vocab_size: int, out_dir: str | Path | None, min_frequency: int,
           show_progress: bool) -> HuggingFaceTokenizer:
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as RustTokenizer

    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(BPE_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> 256 printable characters
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
                                  special_tokens=BPE_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    try:
        run_trainer(tok, trainer)
    except MinillamaError:
        raise
    except Exception as exc:  # e.g. a file changed or vanished between our check and the Rust reader
        raise MinillamaError(f"BPE training failed: {_first_line(exc)}") from None
    bos, eos = BPE_SPECIAL_TOKENS[1], BPE_SPECIAL_TOKENS[2]
    # Add bos when called with add_special_tokens=True (transformers' default), as Hugging Face LLaMA tokenizers
    # do; our own encode() always passes add_special_tokens=False and adds bos/eos itself.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    result = HuggingFaceTokenizer(tok, bos, eos)
    if out_dir is not None:
        result.save(out_dir)
    return result


def _file_size(path: Path) -> int:
    try:
        if path.is_dir():
            raise MinillamaError(f"training input {path} is a directory; pass the text files inside it")
        return path.stat().st_size
    except FileNotFoundError:
        raise MinillamaError(f"training file not found: {path}") from None
    except OSError as exc:
        raise MinillamaError(f"cannot read training file {path}: {exc.strerror}") from None


def _check_utf8(paths: list[Path], total_bytes: int, show_progress: bool) -> None:
    """Fail on the first byte that is not UTF-8, naming the file and its offset. The Rust trainer would also
    stop, but with a message that names neither; one streaming pass costs well under a second per GB."""
    from tqdm import tqdm

    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="checking UTF-8", disable=not show_progress) as bar:
        for path in paths:
            decoder = codecs.getincrementaldecoder("utf-8")()
            fed = 0  # bytes handed to the decoder so far
            try:
                with open(path, "rb") as f:
                    while True:
                        chunk = f.read(_UTF8_CHUNK_BYTES)
                        # The decoder keeps an incomplete trailing sequence and prepends it to the next chunk, so an
                        # error's `start` counts from the first held-back byte.
                        held = len(decoder.getstate()[0])
                        try:
                            decoder.decode(chunk, final=not chunk)
                        except UnicodeDecodeError as exc:
                            raise MinillamaError(f"{path}: not UTF-8 text: invalid byte at offset "
                                                 f"{fed - held + exc.start} ({exc.reason})") from None
                        if not chunk:
                            break
                        fed += len(chunk)
                        bar.update(len(chunk))
            except OSError as exc:
                raise MinillamaError(f"cannot read training file {path}: {exc.strerror}") from None


__all__ = ["Tokenizer", "HuggingFaceTokenizer", "SentencePieceTokenizer", "TiktokenTokenizer", "load_tokenizer",
           "train_bpe", "train_bpe_from_texts",
           "LLAMA3_SPLIT_PATTERN", "LLAMA3_SPECIAL_TOKENS", "BPE_SPECIAL_TOKENS", "BPE_SPLIT_PATTERN"]
