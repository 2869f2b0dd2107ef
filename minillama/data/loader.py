"""Read a prepared mixture: the batch at step s is a pure function of (seed, s, rank, world_size).

Nothing is carried from one batch to the next (no iterator state, no shuffle buffer), so resuming a run needs
only its step, and `data inspect` can show batch 123,456 without reading the 123,455 before it.

How a batch is made:

1. Global sequence indices. Rank r of W at step s with batch size B takes g = (s*W + r)*B + i, i < B. The ranks
   of one step cover a contiguous block, so no two ranks ever read the same sequence, and the same global batch
   (W*B) gives the same data whatever W is.
2. Source of g: a Weyl sequence u_g = (A*g + C) mod 2^64 with A = 2^64/golden ratio (the most evenly spread
   such sequence, Weyl 1916; Knuth TAOCP 6.4) falls in source j's slice of [0, 2^64), sized by its weight. Any
   prefix of the sequence then holds each source within a few sequences of its exact share, far tighter than
   random sampling. C comes from the seed.
3. Index k of g among source j's sequences: the number of n < g that land in j's slice. Counting lattice points
   under a line has a closed form (the classic floor_sum, O(log) steps), so k needs no scan from step 0.
4. Window: a source's training tokens are one stream, cut into windows of seq_len+1 tokens at stride seq_len
   (packing: documents run into each other, separated by EOS, as in GPT-3 and LLaMA pretraining; each token is
   a target once per epoch). k // n_windows is the epoch; within an epoch, k % n_windows goes through a seeded
   permutation (a Feistel network with cycle walking: a bijection computed per index, O(1) memory even for
   billions of windows), so no window repeats within an epoch and each epoch has a different order.
5. Shift: epoch 0 cuts the stream at 0, seq_len, 2*seq_len, ...; every later epoch moves the cuts by a seeded
   shift in [0, seq_len), reading the stream as a cycle (it ends with an EOS, so the seam is one
   more document boundary). A token then comes with a different context in each epoch, instead of the same
   window seen again: what nanoGPT gets from sampling windows at random offsets, kept a pure function of the
   step. On 1 MB of text read ~5 times this took the Shakespeare recipe from 1.462-1.465 to 1.443-1.454 nats/char
   (benchmarks/RESULTS.md).

Validation: `val_batches` walks every window of the validation split once, in order, split among ranks, padding
the last windows with IGNORE_INDEX targets so every rank yields the same number of same-shaped batches.

Bits per byte: bpb = total nats / (ln 2 * total UTF-8 bytes of the text predicted). Each split's bytes and
tokens are in the manifest; `bytes_per_token[split]` = bytes / tokens, with BOS and EOS counted as tokens of zero
bytes. Over a whole validation pass every text token is a target exactly once (only each stream's first token,
a BOS, is not), so summing nats over all ranks and dividing by ln 2 * `val_bytes()` is exact; over a subset of
batches use mean nats per target token / (ln 2 * bytes_per_token["val"]).
"""

from __future__ import annotations

import bisect
import hashlib
import math
import operator
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minillama.data.prepare import MANIFEST_NAME, SPLITS, manifest_shards, read_manifest
from minillama.errors import MinillamaError
from minillama.model import IGNORE_INDEX  # padded targets carry no loss

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # round(2^64 / golden ratio), odd


def _mix64(x: int) -> int:
    """splitmix64's finaliser (Steele, Lea & Flood 2014): a cheap, well-mixing bijection on 64-bit integers."""
    x &= _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _hash64(*parts: Any) -> int:
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def floor_sum(n: int, m: int, a: int, b: int) -> int:
    """sum_{i=0}^{n-1} floor((a*i + b) / m) for n >= 0, m >= 1, a, b >= 0, in O(log m) steps (the Euclid-like
    reduction of AtCoder Library's floor_sum)."""
    total = 0
    while True:
        if a >= m:
            total += n * (n - 1) // 2 * (a // m)
            a %= m
        if b >= m:
            total += n * (b // m)
            b %= m
        y_max = a * n + b
        if y_max < m:
            return total
        n, b = divmod(y_max, m)
        m, a = a, m


class MixtureSchedule:
    """Which source the g-th sequence comes from, and how many of that source's sequences come before it."""

    MODULUS = 1 << 64

    def __init__(self, weights: list[float], seed: int) -> None:
        total = sum(weights)
        cumulative, bounds = 0.0, [0]
        for w in weights[:-1]:
            cumulative += w / total
            bounds.append(min(self.MODULUS, round(cumulative * self.MODULUS)))
        bounds.append(self.MODULUS)
        self.bounds = bounds  # source j owns [bounds[j], bounds[j+1])
        self.offset = _mix64(_hash64("minillama-mixture", seed))

    def position(self, g: int) -> int:
        return (_GOLDEN * g + self.offset) % self.MODULUS

    def source_of(self, g: int) -> int:
        return bisect.bisect_right(self.bounds, self.position(g)) - 1

    def _below(self, g: int, bound: int) -> int:
        """How many n < g have position(n) < bound: [x mod M < b] = floor(x/M) - floor((x + M - b)/M) + 1."""
        if bound <= 0:
            return 0
        if bound >= self.MODULUS:
            return g
        m = self.MODULUS
        return floor_sum(g, m, _GOLDEN, self.offset) - floor_sum(g, m, _GOLDEN, self.offset + m - bound) + g

    def counts_before(self, g: int) -> list[int]:
        """For every source, how many of the sequences 0..g-1 it supplies."""
        below = [self._below(g, b) for b in self.bounds]
        return [below[j + 1] - below[j] for j in range(len(self.bounds) - 1)]


def permute(index: int, n: int, key: int) -> int:
    """A keyed bijection of range(n): a 4-round Feistel network on the smallest even-bit power of two >= n,
    cycle-walking values that fall outside (Black & Rogaway 2002). Fewer than 4 rounds of walking on average."""
    if n <= 1:
        return 0
    bits = max(2, (n - 1).bit_length())
    bits += bits % 2
    half = bits // 2
    mask = (1 << half) - 1
    round_keys = [_mix64(key + r) for r in range(4)]
    x = index
    while True:
        left, right = x >> half, x & mask
        for round_key in round_keys:
            left, right = right, left ^ (_mix64(right ^ round_key) & mask)
        x = (left << half) | right
        if x < n:
            return x


class _TokenStream:
    """The shards of one source and split as one array of tokens (memory-mapped, read on demand)."""

    def __init__(self, data_dir: Path, shards: list[dict[str, Any]], dtype: np.dtype) -> None:
        self.arrays = [np.memmap(data_dir / s["file"], dtype=dtype, mode="r") if s["tokens"] else
                       np.zeros(0, dtype) for s in shards]
        self.starts = [0]
        for s in shards:
            self.starts.append(self.starts[-1] + s["tokens"])
        self.size = self.starts[-1]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length), continuing from the stream's beginning past its end."""
        if start + length > self.size:  # past the end: wrap
            start %= self.size
            head = self.size - start
            if length > head:
                return np.concatenate([self.read(start, head), self.read(0, length - head)])
        out = np.empty(length, dtype=np.int64)
        filled, shard = 0, bisect.bisect_right(self.starts, start) - 1
        while filled < length:
            local = start + filled - self.starts[shard]
            part = self.arrays[shard][local: local + length - filled]
            out[filled: filled + part.size] = part
            filled += part.size
            shard += 1
        return out


def verify_shards(data_dir: str | Path, manifest: dict[str, Any] | None = None, checksums: bool = True) -> None:
    """Check that every shard exists with the manifest's size and (if `checksums`) sha256."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir) if manifest is None else manifest
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for shard in manifest_shards(manifest):
        path = data_dir / shard["file"]
        if not path.is_file():
            raise MinillamaError(f"shard {path} is missing (listed in {data_dir / MANIFEST_NAME})")
        if path.stat().st_size != shard["tokens"] * itemsize:
            raise MinillamaError(f"shard {path} has {path.stat().st_size} bytes, the manifest says "
                                 f"{shard['tokens'] * itemsize}; prepare the data again")
        if checksums:
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            if digest != shard["sha256"]:
                raise MinillamaError(f"shard {path}: sha256 {digest} does not match the manifest's "
                                     f"{shard['sha256']}; the file changed after it was prepared")


class MixtureLoader:
    """Batches of packed sequences from a prepared data directory; see the module docstring for the scheme.

    `batch(step)` -> (inputs, targets), LongTensors of shape (batch_size, seq_len), targets = inputs shifted by
    one. `weights` overrides the manifest's mixture ({name: weight}, relative). `split` picks the stream that
    `batch` samples ("train", or "val" to sample validation windows the same way); `val_batches` always walks
    the validation split. `verify` hashes every shard once on open (set False for very large data: sizes are
    still checked). A `tokenizer_fingerprint` that differs from the data's is an error.
    """

    def __init__(self, data_dir: str | Path, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, split: str = "train", tokenizer_fingerprint: str | None = None,
                 verify: bool = True, weights: dict[str, float] | None = None) -> None:
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("world_size", world_size)):
            if not isinstance(value, int) or value <= 0:
                raise MinillamaError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= rank < world_size:
            raise MinillamaError(f"rank must be in [0, {world_size}), got {rank}")
        if split not in SPLITS:
            raise MinillamaError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size, self.split = rank, world_size, split
        tok = self.manifest["tokenizer"]
        self.tokenizer_fingerprint: str = tok["fingerprint"]
        self.vocab_size: int = tok["vocab_size"]
        self.bos_id: int | None = tok["bos_id"]
        self.eos_id: int = tok["eos_id"]
        if tokenizer_fingerprint is not None and str(tokenizer_fingerprint) != self.tokenizer_fingerprint:
            raise MinillamaError(f"tokenizer mismatch: {self.data_dir} was prepared with tokenizer "
                                 f"{self.tokenizer_fingerprint}, this run uses {tokenizer_fingerprint}; "
                                 "prepare the data again with this tokenizer")
        verify_shards(self.data_dir, self.manifest, checksums=verify)
        entries = self.manifest["sources"]
        self.source_names: list[str] = [e["name"] for e in entries]
        dtype = np.dtype(self.manifest["dtype"])
        self._streams = {(e["name"], s): _TokenStream(self.data_dir, e[s]["shards"], dtype)
                         for e in entries for s in SPLITS}
        self.split_tokens = {s: self.manifest["totals"][s]["tokens"] for s in SPLITS}
        self.split_bytes = {s: self.manifest["totals"][s]["bytes"] for s in SPLITS}
        self.bytes_per_token: dict[str, float | None] = dict(self.manifest["bytes_per_token"])

        if weights is None:
            weights = {e["name"]: e["weight"] for e in entries}
        unknown = sorted(set(weights) - set(self.source_names))
        if unknown:
            raise MinillamaError(f"weights name unknown source(s) {', '.join(unknown)}; the data has "
                                 f"{', '.join(self.source_names)}")
        for name, w in weights.items():
            if not w > 0:
                raise MinillamaError(f"source {name!r}: weight must be > 0, got {w}")
        self.active = [n for n in self.source_names if n in weights]
        total = sum(weights[n] for n in self.active)
        self.weights = {n: weights[n] / total for n in self.active}
        self.windows: dict[str, int] = {}
        for name in self.active:
            tokens = self._streams[(name, split)].size
            n_windows = (tokens - 1) // seq_len
            if n_windows < 1:
                raise MinillamaError(f"source {name!r} has {tokens} {split} tokens, fewer than seq_len + 1 = "
                                     f"{seq_len + 1}: use a shorter seq_len or give the source more text")
            self.windows[name] = n_windows
        self.schedule = MixtureSchedule([self.weights[n] for n in self.active], seed)
        self._epoch_keys: dict[tuple[str, int], int] = {}

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    def _epoch_key(self, name: str, epoch: int) -> int:
        key = self._epoch_keys.get((name, epoch))
        if key is None:
            if len(self._epoch_keys) > 1024:
                self._epoch_keys.clear()
            key = self._epoch_keys[(name, epoch)] = _hash64("minillama-epoch", self.seed, name, self.split, epoch)
        return key

    def epoch_shift(self, name: str, epoch: int) -> int:
        """Where epoch `epoch` of source `name` starts cutting windows: 0 in the first epoch, then seeded."""
        return 0 if epoch == 0 else _mix64(self._epoch_key(name, epoch)) % self.seq_len

    def describe(self, step: int) -> list[dict[str, Any]]:
        """Where each sequence of batch `step` comes from: source, its index k among that source's sequences,
        epoch, window, and the window's first and last token in the source's stream (`offset`, `end`; a window of
        a shifted epoch can run past the stream's end and go on from its beginning, so `end` < `offset`)."""
        try:
            index = operator.index(step)  # ints, numpy integers, integer tensors
        except TypeError:
            index = -1
        if index < 0:
            raise MinillamaError(f"step must be a non-negative integer, got {step!r}")
        step = index
        first = (step * self.world_size + self.rank) * self.batch_size
        counts = self.schedule.counts_before(first)
        rows = []
        for i in range(self.batch_size):
            g = first + i
            j = self.schedule.source_of(g)
            name, k = self.active[j], counts[j]
            counts[j] += 1
            n_windows = self.windows[name]
            epoch, position = divmod(k, n_windows)
            window = permute(position, n_windows, self._epoch_key(name, epoch))
            size = self._streams[(name, self.split)].size
            offset = (window * self.seq_len + self.epoch_shift(name, epoch)) % size
            rows.append({"row": i, "sequence": g, "source": name, "index_in_source": k, "epoch": epoch,
                         "window": window, "offset": offset, "end": (offset + self.seq_len) % size})
        return rows

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (batch_size, seq_len) int64, for training step `step`."""
        rows = self.describe(step)
        tokens = np.stack([self._streams[(r["source"], self.split)].read(r["offset"], self.seq_len + 1)
                           for r in rows])  # (B, T+1)
        tokens = torch.from_numpy(tokens)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def epochs_at(self, step: int) -> dict[str, float]:
        """Epochs of each source's training windows consumed by all ranks before step `step`."""
        counts = self.schedule.counts_before(step * self.world_size * self.batch_size)
        return {name: counts[j] / self.windows[name] for j, name in enumerate(self.active)}

    # ---------------------------------------------------------------------------------------------------------
    # Validation
    # ---------------------------------------------------------------------------------------------------------
    def _val_sources(self, source: str | None) -> list[str]:
        if source is None:
            return self.source_names
        if source not in self.source_names:
            raise MinillamaError(f"unknown source {source!r}; the data has {', '.join(self.source_names)}")
        return [source]

    def val_windows(self, source: str | None = None) -> list[tuple[str, int]]:
        """Every validation window as (source, start token), in order: stride seq_len, the last one partial."""
        out = []
        for name in self._val_sources(source):
            n = self._streams[(name, "val")].size
            out.extend((name, start) for start in range(0, max(n - 1, 0), self.seq_len))
        return out

    def val_bytes(self, source: str | None = None) -> int:
        """UTF-8 bytes of the validation text of `source` (all sources if None): the bpb denominator."""
        entries = {e["name"]: e for e in self.manifest["sources"]}
        return sum(entries[name]["val"]["bytes"] for name in self._val_sources(source))

    def val_batches(self, batch_size: int | None = None, source: str | None = None,
                    max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of the validation split, deterministically: (inputs, targets) of shape
        (batch_size, seq_len), padded targets = IGNORE_INDEX. Every rank yields the same number of batches."""
        batch_size = batch_size or self.batch_size
        windows = self.val_windows(source)
        n_batches = math.ceil(len(windows) / (batch_size * self.world_size))
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        mine = windows[self.rank:: self.world_size]
        for b in range(n_batches):
            inputs = np.full((batch_size, self.seq_len), self.eos_id, dtype=np.int64)
            targets = np.full((batch_size, self.seq_len), IGNORE_INDEX, dtype=np.int64)
            for row, (name, start) in enumerate(mine[b * batch_size: (b + 1) * batch_size]):
                stream = self._streams[(name, "val")]
                length = min(self.seq_len + 1, stream.size - start)
                tokens = stream.read(start, length)
                inputs[row, : length - 1] = tokens[:-1]
                targets[row, : length - 1] = tokens[1:]
            yield torch.from_numpy(inputs), torch.from_numpy(targets)


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    """Tokenizer-independent loss: nats summed over predicted tokens / (ln 2 * bytes of text they cover)."""
    return total_nats / (math.log(2) * total_bytes)


__all__ = ["MixtureLoader", "MixtureSchedule", "IGNORE_INDEX", "permute", "floor_sum", "verify_shards",
           "bits_per_byte"]
