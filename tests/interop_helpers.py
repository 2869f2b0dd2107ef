"""Small models and tokenizers of each kind for the interop tests (test_gguf.py, test_meta.py)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from test_checkpoint import random_model  # noqa: F401  (re-exported: every weight distinct, norms included)

from minillama.tokenizer import HuggingFaceTokenizer, TiktokenTokenizer, load_tokenizer, train_bpe

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHAKESPEARE = SHARED / "tinyshakespeare.txt"
LLAMA2_TOKENIZER = SHARED / "llama2-tokenizer.model"

TEXTS = [
    "ROMEO: But, soft! what light through yonder window breaks?",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "Digits 12345 and 3.14159, symbols #@%&*!",
    "I'm you're WE'LL they've She'd",
    "héllo wörld, naïve café — ünïcödé ✓ 🦙",
]


def small_bpe(directory: Path, vocab_size: int = 400) -> HuggingFaceTokenizer:
    """Our byte-level BPE trained on the start of tinyshakespeare."""
    corpus = directory / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:200_000] + "\n".join(TEXTS))
    return train_bpe([corpus], vocab_size, out_dir=directory / "bpe")


def tiktoken_from_bpe(bpe: HuggingFaceTokenizer, path: Path) -> TiktokenTokenizer:
    """A Llama 3-format rank file (`base64(token) rank` lines) from a byte-level BPE: the 256 bytes, then each
    merge's token in merge order, so every token is two lower-ranked ones merged, as in a real rank file."""
    from gguf.vocab import bytes_to_unicode

    char_to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    spec = json.loads(bpe.__getstate__()["json"])
    ranks = {bytes([b]): b for b in range(256)}
    for merge in spec["model"]["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = bytes(char_to_byte[c] for c in left + right)
        ranks.setdefault(token, len(ranks))
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
    tokenizer = load_tokenizer(path)
    assert isinstance(tokenizer, TiktokenTokenizer)
    return tokenizer


def llama2_tokenizer():
    import pytest

    if not LLAMA2_TOKENIZER.is_file():
        pytest.skip(f"{LLAMA2_TOKENIZER} not present")
    return load_tokenizer(LLAMA2_TOKENIZER)
