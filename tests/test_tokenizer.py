"""Tokenizer tests: parity with each reference library, BPE training properties, save/load, errors and the CLI."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import pytest

from minillama import tokenizer as tokenizer_module
from minillama.cli import main
from minillama.errors import MinillamaError
from minillama.tokenizer import (
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    load_tokenizer,
    train_bpe,
)

# CI clones the repository with ../shared beside it.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LLAMA2_MODEL = SHARED_DATA / "llama2-tokenizer.model"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"

TEXTS = [
    "",
    "Hello, world!",
    "12345 and 3.14159, 1,000,000 and 2024-06-01",
    "   leading, trailing and    inner runs of spaces   ",
    "tabs\tand\nnewlines\r\n\n\n\u00a0nbsp\u2003em space",
    "emoji 🦙🔥 👩‍👩‍👧 ❤️ 🇫🇷",
    "中文字符测试，日本語のテキスト、한국어 텍스트",
    "def f(x):\n    return {'a': x ** 2}  # comment\n\tif x != 0: pass\n",
    "Mixed: Ελληνικά, русский, العربية, עברית, हिन्दी, ไทย",
    "e\u0301 lone combining mark \u0301\u0308 at the start",
    "<s> </s> <unk> <|begin_of_text|> <|eot_id|> literal special-token text",
    "I'm you're WE'LL they've She'd",
    " " * 40,
    "a" * 300,
    "\x00 control \x7f chars \u200b zero width",
]


def has_llama2() -> None:
    if not LLAMA2_MODEL.is_file():
        pytest.skip(f"{LLAMA2_MODEL} not present")


# --------------------------------------------------------------------------------------------------------------
# SentencePiece
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama2():
    has_llama2()
    import sentencepiece

    return load_tokenizer(LLAMA2_MODEL), sentencepiece.SentencePieceProcessor(model_file=str(LLAMA2_MODEL))


def test_sentencepiece_parity(llama2):
    ours, ref = llama2
    assert isinstance(ours, SentencePieceTokenizer)
    assert (ours.vocab_size, ours.bos_id, ours.eos_id) == (32000, 1, 2)
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.encode(text, bos=True) == [1] + ref.encode(text)
        assert ours.encode(text, eos=True) == ref.encode(text) + [2]
        assert ours.encode(text, bos=True, eos=True) == ref.encode(text, add_bos=True, add_eos=True)
        assert ours.decode(ours.encode(text, bos=True, eos=True)) == ref.decode(ref.encode(text))
    assert ours.encode_batch(TEXTS) == [ref.encode(t) for t in TEXTS]
    # The reference behaviour the data README states: digits split, byte fallback for the llama.
    assert [ref.id_to_piece(i) for i in ours.encode("12345")] == ["▁", "1", "2", "3", "4", "5"]
    assert [ref.id_to_piece(i) for i in ours.encode("🦙")[1:]] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    assert ours.token_to_id("<s>") == 1 and ours.token_to_id("no such piece") is None


def test_sentencepiece_save_load_pickle(llama2, tmp_path):
    ours, _ = llama2
    again = load_tokenizer(ours.save(tmp_path / "sp"))  # a directory holding tokenizer.model
    assert isinstance(again, SentencePieceTokenizer)
    assert again.fingerprint == ours.fingerprint and len(ours.fingerprint) == 64
    unpickled = pickle.loads(pickle.dumps(ours))
    assert unpickled.fingerprint == ours.fingerprint
    assert unpickled.encode_batch(TEXTS) == ours.encode_batch(TEXTS)


# --------------------------------------------------------------------------------------------------------------
# tiktoken (Llama 3 format). We have no real Llama 3 rank file, so we make one from a small byte-level BPE.
# --------------------------------------------------------------------------------------------------------------
# Written out independently of minillama.tokenizer, from Meta's llama-models models/llama3_1/api/tokenizer.py.
META_PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
META_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
META_SPECIAL += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(META_SPECIAL))]


def gpt2_byte_chars() -> dict[str, int]:
    """ByteLevel's printable stand-in character for each byte (GPT-2's bytes_to_unicode), inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


@pytest.fixture(scope="module")
def rank_file(tmp_path_factory) -> Path:
    """A rank file in Llama 3's format: the 256 bytes, then the merges of a BPE trained with Meta's pattern."""
    from tokenizers import Regex, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as RustTokenizer

    corpus = tmp_path_factory.mktemp("tiktoken") / "corpus.txt"
    corpus.write_text("\n".join(TEXTS * 20) + (SHAKESPEARE.read_text()[:200_000] if SHAKESPEARE.is_file() else ""))
    bpe = RustTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(META_PAT_STR), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.train([str(corpus)], trainers.BpeTrainer(vocab_size=1500, show_progress=False,
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    byte_of = gpt2_byte_chars()
    merged = [bytes(byte_of[c] for c in token) for token, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = [bytes([b]) for b in range(256)] + [t for t in merged if len(t) > 1]
    import base64

    path = corpus.parent / "tokenizer.model"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % rank for rank, t in enumerate(tokens)))
    return path


@pytest.fixture(scope="module")
def tiktoken_pair(rank_file):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(rank_file))
    ref = tiktoken.Encoding(name="ref", pat_str=META_PAT_STR, mergeable_ranks=ranks,
                            special_tokens={t: len(ranks) + i for i, t in enumerate(META_SPECIAL)})
    return load_tokenizer(rank_file), ref, len(ranks)


def meta_split(s: str, max_len: int) -> list[str]:
    """Meta's _split_whitespaces_or_nonwhitespaces, the per-character loop, as the reference for long runs."""
    out, run_len, run_is_space, start = [], 0, s[0].isspace() if s else False, 0
    for i, ch in enumerate(s):
        if run_is_space ^ ch.isspace():
            run_len, run_is_space = 1, ch.isspace()
        else:
            run_len += 1
            if run_len > max_len:
                out.append(s[start:i])
                start, run_len = i, 1
    return out + [s[start:]]


def test_tiktoken_parity(tiktoken_pair):
    ours, ref, n = tiktoken_pair
    assert isinstance(ours, TiktokenTokenizer)
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (n, n + 1, n + 256)
    assert ours.token_to_id("<|eot_id|>") == n + 9 and ours.token_to_id("<|reserved_special_token_246|>") == n + 255
    for text in TEXTS:
        expected = ref.encode(text, allowed_special=set(), disallowed_special=())  # Meta's defaults
        assert ours.encode(text) == expected, text
        assert ours.encode(text, bos=True, eos=True) == [n] + expected + [n + 1]
        assert ours.decode(ours.encode(text, bos=True, eos=True)) == text
    assert ours.encode_batch(TEXTS) == [ref.encode_ordinary(t) for t in TEXTS]
    # A literal special token in the text stays text.
    assert n not in ours.encode("<|begin_of_text|>")


def test_tiktoken_long_runs_cut_where_meta_cuts(tiktoken_pair):
    ours, ref, _ = tiktoken_pair
    text = "x" * 30_001 + " " * 52_000 + "ab " * 9_000 + "\n" * 25_000 + "y"
    expected = [i for piece in meta_split(text, 25_000) for i in ref.encode_ordinary(piece)]
    assert ours.encode(text) == expected
    assert ours.encode_batch([text, "short"]) == [expected, ref.encode_ordinary("short")]
    assert ours.decode(expected) == text


def test_tiktoken_save_load_pickle(tiktoken_pair, tmp_path):
    ours, _, _ = tiktoken_pair
    again = load_tokenizer(ours.save(tmp_path / "tk"))
    assert isinstance(again, TiktokenTokenizer) and again.fingerprint == ours.fingerprint
    assert pickle.loads(pickle.dumps(ours)).encode_batch(TEXTS) == ours.encode_batch(TEXTS)


# --------------------------------------------------------------------------------------------------------------
# BPE training
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bpe") / "corpus.txt"
    text = SHAKESPEARE.read_text(encoding="utf-8") if SHAKESPEARE.is_file() else ""
    path.write_text(text + "\n".join(TEXTS * 50), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bpe(corpus, tmp_path_factory) -> tuple[HuggingFaceTokenizer, Path]:
    out = tmp_path_factory.mktemp("bpe_out")
    return train_bpe([corpus], vocab_size=2048, out_dir=out), out


def test_bpe_specials_and_digits(bpe):
    tok, _ = bpe
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.token_to_id("<unk>")) == (2048, 1, 2, 0)
    ids = tok.encode("12345")
    assert [tok.decode([i]) for i in ids] == ["1", "2", "3", "4", "5"]
    assert "2024" in TEXTS[2] and [tok.decode([i]) for i in tok.encode("in 2024")][-4:] == ["2", "0", "2", "4"]
    # Stronger: no learned token holds a digit together with anything else, so no number can ever merge.
    for token_id in range(3, tok.vocab_size):
        piece = tok.decode([token_id])
        assert len(piece) == 1 or not any(ch.isdigit() for ch in piece), piece


def random_unicode(rng: random.Random) -> str:
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x17F), (0x300, 0x36F), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF),
              (0x0590, 0x06FF), (0xAC00, 0xD7A3), (0xE000, 0xF8FF), (0x10000, 0x10FFFF)]
    whitespace = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u2028", "\u3000", " " * 7]
    parts = []
    for _ in range(rng.randint(0, 40)):
        if rng.random() < 0.2:
            parts.append(rng.choice(whitespace))
        else:
            lo, hi = rng.choice(ranges)
            parts.append(chr(rng.randint(lo, hi)))  # no range touches the surrogates D800-DFFF
    return "".join(parts)


def test_bpe_round_trips_any_unicode(bpe):
    tok, _ = bpe
    rng = random.Random(1234)
    texts = TEXTS + [random_unicode(rng) for _ in range(1000)]
    for text in texts:
        assert tok.decode(tok.encode(text, bos=True, eos=True)) == text, repr(text)
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert 0 not in {i for ids in tok.encode_batch(texts) for i in ids}  # never <unk>


def test_bpe_transformers_parity(bpe):
    from transformers import AutoTokenizer

    tok, out = bpe
    assert json.loads((out / "tokenizer_config.json").read_text())["bos_token"] == "<s>"
    hf = AutoTokenizer.from_pretrained(out)
    assert (hf.bos_token, hf.eos_token, hf.bos_token_id, hf.eos_token_id) == ("<s>", "</s>", 1, 2)
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), text
        assert hf(text)["input_ids"] == tok.encode(text, bos=True)  # HF LLaMA convention: bos added by default
        assert hf.decode(tok.encode(text, bos=True), skip_special_tokens=True) == text


def test_bpe_save_load_fingerprint_pickle(bpe, corpus, tmp_path):
    tok, out = bpe
    again = load_tokenizer(out)
    assert isinstance(again, HuggingFaceTokenizer) and again.fingerprint == tok.fingerprint
    assert load_tokenizer(again.save(tmp_path / "copy")).fingerprint == tok.fingerprint
    unpickled = pickle.loads(pickle.dumps(tok))
    assert unpickled.fingerprint == tok.fingerprint and unpickled.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    assert unpickled.encode("<s>") != [1]  # literal specials stay text after unpickling too
    small = train_bpe(corpus, vocab_size=400)
    assert small.vocab_size == 400 and small.fingerprint != tok.fingerprint


# --------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------
def test_load_errors(tmp_path):
    with pytest.raises(MinillamaError, match="not found: .*nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(MinillamaError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    garbage = tmp_path / "tokenizer.model"
    garbage.write_text("this is not a tokenizer\n")
    with pytest.raises(MinillamaError, match="neither a SentencePiece model nor a tiktoken rank file"):
        load_tokenizer(garbage)
    garbage.write_text("AAE= 0\nnot base64 at all!\n")
    with pytest.raises(MinillamaError, match="line 2"):
        load_tokenizer(garbage)
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text("{}")
    with pytest.raises(MinillamaError, match="not a valid tokenizer.json"):
        load_tokenizer(bad_json)


def test_train_errors(tmp_path, monkeypatch):
    with pytest.raises(MinillamaError, match="training file not found: .*missing.txt"):
        train_bpe([tmp_path / "missing.txt"], vocab_size=300)
    with pytest.raises(MinillamaError, match="is a directory"):
        train_bpe([tmp_path], vocab_size=300)
    good = tmp_path / "good.txt"
    good.write_text("hello world\n" * 10)
    with pytest.raises(MinillamaError, match="vocab_size=100 is too small"):
        train_bpe(good, vocab_size=100)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"hello\n" * 1000 + "café".encode("latin-1"))
    with pytest.raises(MinillamaError, match=r"latin1.txt: not UTF-8 text: invalid byte at offset 6003"):
        train_bpe([good, bad], vocab_size=300)
    # The offset is right when a multi-byte character straddles two read chunks.
    monkeypatch.setattr(tokenizer_module, "_UTF8_CHUNK_BYTES", 4)
    straddle = tmp_path / "straddle.txt"
    straddle.write_bytes("abc€d".encode() + b"\xc3(")  # € is 3 bytes at offsets 3-5; bad pair at offset 7
    with pytest.raises(MinillamaError, match="offset 7"):
        train_bpe([straddle], vocab_size=300)
    truncated = tmp_path / "truncated.txt"
    truncated.write_bytes("abcdefg€".encode()[:-1])  # ends inside a character
    with pytest.raises(MinillamaError, match="offset 7"):
        train_bpe([truncated], vocab_size=300)


def test_decode_rejects_out_of_range_ids(bpe):
    tok, _ = bpe
    with pytest.raises(MinillamaError, match="token id 2048 is out of range"):
        tok.decode([5, 2048])
    with pytest.raises(MinillamaError, match="token id -1"):
        tok.decode([-1])


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------
def test_cli_train_encode_decode(corpus, tmp_path, capsys):
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "512", "--out", str(out)]) == 0
    assert "trained 512 tokens" in capsys.readouterr().out
    tok = load_tokenizer(out)
    assert main(["tokenizer", "encode", "--tokenizer", str(out), "--bos", "Hi 42 🦙"]) == 0
    ids = [int(i) for i in capsys.readouterr().out.split()]
    assert ids == tok.encode("Hi 42 🦙", bos=True)
    assert main(["tokenizer", "encode", "--tokenizer", str(out), "--json", "Hi 42 🦙"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ids": tok.encode("Hi 42 🦙")}
    assert main(["tokenizer", "decode", "--tokenizer", str(out), *map(str, ids)]) == 0
    assert capsys.readouterr().out == "Hi 42 🦙\n"


def test_cli_errors_exit_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xff")
    cases = [
        (["tokenizer", "train", "--input", str(bad), "--vocab-size", "300", "--out", str(tmp_path / "o")],
         "bad.txt: not UTF-8 text: invalid byte at offset 3"),
        (["tokenizer", "train", "--input", str(tmp_path / "gone.txt"), "--vocab-size", "300", "--out",
          str(tmp_path / "o")], "gone.txt"),
        (["tokenizer", "encode", "--tokenizer", str(tmp_path / "none"), "hi"], "tokenizer not found"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("minillama: error: ") and message in err and err.count("\n") == 1, err
