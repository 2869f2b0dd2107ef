"""llama.cpp's batch-1 decode speed on our checkpoints, exported to GGUF in f16 and q8_0.

    pip install llama-cpp-python          # builds llama.cpp (10+ minutes on 2 cores)
    python benchmarks/llamacpp_decode.py runs/default/step-0001000
    python benchmarks/llamacpp_decode.py CKPT --dtypes f32 f16 q8_0 --new-tokens 256 --threads 2 --repeats 5

For each dtype the checkpoint is exported with `minillama.interop.gguf.export_gguf` and loaded by llama.cpp
(llama-cpp-python, `n_threads` threads, f16 KV cache as llama.cpp defaults). Each repeat starts from an empty
cache: the fixed prompt is evaluated in one batch (prefill, not timed), which gives the first new token; then
`--new-tokens` tokens are decoded one at a time, greedily, and only that loop is timed: decode tokens/s =
new tokens / seconds. After `--warmup` untimed runs, the median of `--repeats` runs is reported, with the
slowest and fastest. A table goes to
stdout and JSON to benchmarks/results/llamacpp_decode.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"


def last_logits(llm):
    """The logits of the last token evaluated, read in place from llama.cpp (llama_get_logits_ith(ctx, -1))."""
    import llama_cpp
    import numpy as np

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def greedy_run(llm, prompt_ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """(seconds to the first token, decode tokens/s after it, generated ids) for one greedy run from an empty
    cache: the prompt in one batch (prefill), whose last logits give the first token, then `new_tokens` more
    decoded one at a time."""
    started = time.perf_counter()
    llm.reset()
    llm.eval(prompt_ids)
    token = int(last_logits(llm).argmax())
    generated = [token]
    first_token_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([token])
        token = int(last_logits(llm).argmax())
        generated.append(token)
    return first_token_s, new_tokens / (time.perf_counter() - started), generated


def measure(checkpoint: Path, dtype: str, gguf_dir: Path, args: argparse.Namespace) -> dict:
    import llama_cpp

    from minillama.checkpoint import load
    from minillama.interop.gguf import export_gguf

    path = export_gguf(checkpoint, gguf_dir / f"{checkpoint.name}-{dtype}.gguf", dtype)
    _, tokenizer = load(checkpoint)
    prompt_ids = tokenizer.encode(args.prompt, bos=True)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt_ids) + args.new_tokens + 8, n_batch=512,
                          n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    for _ in range(args.warmup):  # first runs pay for buffer allocation and page faults, not decoding
        greedy_run(llm, prompt_ids, args.new_tokens)
    rates, generated = [], []
    for _ in range(args.repeats):
        _, rate, generated = greedy_run(llm, prompt_ids, args.new_tokens)
        rates.append(rate)
    return dict(dtype=dtype, file_bytes=path.stat().st_size, prompt_tokens=len(prompt_ids),
                new_tokens=args.new_tokens, threads=args.threads, warmup=args.warmup, repeats=args.repeats,
                decode_tokens_per_s=statistics.median(rates), slowest=min(rates), fastest=max(rates),
                sample=tokenizer.decode(generated))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="checkpoint directory (Hugging Face format, with tokenizer)")
    parser.add_argument("--dtypes", nargs="+", default=["f16", "q8_0"], choices=["f32", "f16", "q8_0"])
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens decoded after the first (timed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--gguf-dir", type=Path, help="keep the exported files here (default: a temporary dir)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "llamacpp_decode.json")
    args = parser.parse_args()

    import llama_cpp

    with tempfile.TemporaryDirectory() as tmp:
        gguf_dir = args.gguf_dir or Path(tmp)
        gguf_dir.mkdir(parents=True, exist_ok=True)
        rows = [measure(args.checkpoint, dtype, gguf_dir, args) for dtype in args.dtypes]

    print(f"llama.cpp decode, batch 1, {args.threads} threads, {args.new_tokens} new tokens after the first, "
          f"median of {args.repeats}: {args.checkpoint}")
    print(f"{'dtype':6} {'file MB':>8} {'prompt':>7} {'tokens/s':>9} {'slowest':>8} {'fastest':>8}")
    for row in rows:
        print(f"{row['dtype']:6} {row['file_bytes'] / 1e6:8.1f} {row['prompt_tokens']:7d} "
              f"{row['decode_tokens_per_s']:9.1f} {row['slowest']:8.1f} {row['fastest']:8.1f}")
    record = dict(checkpoint=str(args.checkpoint), llama_cpp_python=llama_cpp.__version__,
                  machine=platform.machine(), processor=platform.processor(), rows=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
