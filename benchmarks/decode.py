"""Decoding speed: minillama's Engine against Hugging Face's `generate()` at its best, and against the memory
bandwidth limit.

    python benchmarks/decode.py                                   # CPU: 15m, 125m, 350m
    python benchmarks/decode.py --presets 15m --rounds 2 --new-tokens 16 --prompt-len 32   # a quick check
    python benchmarks/decode.py --device cuda                     # GPU: 125m and 1b

Every contestant starts from the same random weights (`Transformer(cfg)` after torch.manual_seed(0); speed does
not depend on what was learned) and the same random prompt of --prompt-len tokens, and decodes --new-tokens
tokens greedily without stopping at EOS.

- `minillama-fp32`, `minillama-bf16`: one sequence through `Engine` (weights and KV cache in that dtype; on CUDA
  the engine's default, the decode step compiled into CUDA graphs). `-b8` suffix: 8 prompts decoded together.
  `minillama-fp32-compiled`: the engine with compile=True (static cache, torch.compile'd decode step), to see what
  compiling gives on this device. A compiled engine is warmed up (`Engine.warm_up()`, every batch bucket's graph)
  before its first round, as `minillama generate --compile` and `minillama serve` do.
- `minillama-int8`, `minillama-int4`: the same over a model quantized by `minillama.quantize.quantize(model,
  "int8" | "int4")`, in the dtype `minillama generate --quantize` loads it in by default (`--dtype auto`): bf16
  on CUDA and on CPUs with native bf16, fp32 elsewhere (an AVX2-only CPU, where bf16 norms, attention and KV cache
  are emulated and slow; the quantized matmuls still run in bf16 there, `minillama.quantize.default_scale_dtype`).
  Where that module does not exist yet the rows say "not available"; no numbers are invented.
- `hf-<attn>-<dtype>`: `LlamaForCausalLM.generate(do_sample=False)` with attn_implementation eager (matmul) or
  sdpa and its default dynamic cache; `hf-<attn>-static-compiled-<dtype>`: with cache_implementation="static"
  and its automatic torch.compile of the forward (CompileConfig; mode reduce-overhead, i.e. CUDA graphs on
  CUDA; on CPU with our compiled engine's inductor options, `CPU_COMPILE_OPTIONS`: autotuned GEMMs, but not its
  freezing, which HF's static-cache generate does not survive); `hf-<attn>-static-compiled-plain-<dtype>`: the
  same with inductor's defaults. The fastest HF contestant in the run is "HF best", and every ratio is against it.
- `llamacpp-f16`, `llamacpp-q8_0` (optional: `pip install llama-cpp-python`, which builds llama.cpp): the same
  weights exported with `minillama export gguf` (minillama.interop.gguf) and decoded by llama.cpp itself
  (llama-cpp-python's low-level `eval`, one token at a time, greedy, the same prompt ids, f16 KV cache as llama.cpp
  defaults, as many threads as torch uses). The export needs a tokenizer: a small BPE is trained on a fixed text
  and padded to the preset's vocabulary (the prompt is token ids, so its tokens do not matter). Compare them with
  `minillama-bf16` and `minillama-int8` (16 and 8 bits per weight). `benchmarks/llamacpp_decode.py` does the same
  for a trained checkpoint and its own prompt text.

Measures per round: time to first token (prefill + first token; HF: generate(max_new_tokens=1)) and decode
tokens/s after the first token (HF: (N - 1) / (time of generate(N) - time of generate(1))). Medians over rounds.
Each contestant lives in its own process; after warm-up rounds (compilation) the rounds interleave in a rotating
order so that noise from other processes hits all contestants alike. Each round also records the CPU time other
processes took meanwhile (Linux): the quiet columns use only rounds where it stayed under 10%.

The bandwidth limit (as gpt-fast reports it): decoding one token at batch 1 reads every weight once (the input
embedding only one row unless tied to the output) plus the KV cache so far (taken at the mean context of the
decode, prompt + new/2); bytes per token x tokens/s is the bandwidth achieved, against this device's copy
bandwidth measured here on a 1 GiB buffer (larger than this machine's ~480 MiB L3; 4 GiB on CUDA), counted as
bytes read + bytes written. Models that fit in the last-level cache can go past it.

On a shared machine the wall-clock columns carry the other processes' noise; "CPU ms/token" (the least CPU time
a contestant's process spent per decoded token over the rounds, all its threads together) does not, and with
--threads 1 it compares contestants fairly there.

Results: a table on stdout and JSON (default benchmarks/results/decode.json; --out to name another).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_throughput import _busy_cpu_s, _device_name, _own_cpu_s  # noqa: E402  (the same probes)

CPU_CONTESTANTS = ["minillama-fp32", "minillama-bf16", "minillama-bf16-compiled", "minillama-int8", "minillama-int4",
                   "minillama-fp32-b8", "minillama-bf16-b8", "hf-eager-fp32", "hf-sdpa-fp32", "hf-eager-bf16",
                   "hf-sdpa-bf16", "hf-sdpa-static-compiled-fp32", "hf-sdpa-static-compiled-bf16"]
LLAMACPP_CONTESTANTS = ["llamacpp-f16", "llamacpp-q8_0"]  # not in the defaults: they need llama-cpp-python
CUDA_CONTESTANTS = ["minillama-bf16", "minillama-int8", "minillama-int4", "minillama-bf16-b8", "hf-sdpa-bf16",
                    "hf-sdpa-static-compiled-bf16"]
QUANTIZED = ("int8", "int4")
BATCH = 8


# --------------------------------------------------------------------------------------------------------------
# Contestant names -> settings
# --------------------------------------------------------------------------------------------------------------
def parse(name: str) -> dict:
    """'minillama-bf16-b8' -> dict(kind='minillama', dtype='bf16', batch=8, compiled=False), etc."""
    parts = name.split("-")
    if parts[0] == "minillama" and len(parts) >= 2 and parts[1] in ("fp32", "bf16", *QUANTIZED):
        rest = parts[2:]
        batch = BATCH if "b8" in rest else 1
        if set(rest) - {"b8", "compiled"}:
            raise ValueError(name)
        return dict(kind="minillama", dtype=parts[1], batch=batch, compiled="compiled" in rest)
    if parts[0] == "hf" and len(parts) in (3, 5, 6) and parts[1] in ("eager", "sdpa") and parts[-1] in ("fp32", "bf16"):
        if len(parts) >= 5 and (parts[2:4] != ["static", "compiled"] or parts[4:-1] not in ([], ["plain"])):
            raise ValueError(name)
        return dict(kind="hf", attention=parts[1], dtype=parts[-1], batch=1, compiled=len(parts) >= 5,
                    plain=len(parts) == 6)
    if name in LLAMACPP_CONTESTANTS:
        return dict(kind="llamacpp", dtype=name.split("-", 1)[1], batch=1, compiled=False)
    raise ValueError(name)


def quantizer(mode: str):
    """minillama.quantize.quantize(model, mode) when the quantization module exists, else None."""
    try:
        from minillama.quantize import quantize
    except ImportError:
        return None
    return lambda model: quantize(model, mode)


# --------------------------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------------------------
def initial_model(preset: str, device: str, dtype):
    import torch

    from minillama.config import ModelConfig
    from minillama.model import Transformer

    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset(preset)).to(device=device, dtype=dtype).eval()


def weight_bytes_read(model, embedding, head) -> int:
    """Bytes of every distinct parameter and buffer, less the input embedding when it is not the output head's
    weight itself (a lookup reads one row of it). Untied also when the head was quantized: the embedding then
    keeps a floating-point copy of its own."""
    tied = head is embedding
    import itertools

    seen, total = set(), 0
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total if tied else total - embedding.numel() * embedding.element_size()


def build_minillama(settings: dict, preset: str, prompt: list[int], new_tokens: int, device: str):
    import torch

    from minillama.infer import Engine, SamplingParams
    from minillama.infer.generate import DTYPES, inference_dtype

    dtype = DTYPES.get(settings["dtype"]) or inference_dtype("auto", torch.device(device))  # quantized: auto
    model = initial_model(preset, device, dtype)
    if settings["dtype"] in QUANTIZED:
        model = quantizer(settings["dtype"])(model)
    batch = settings["batch"]
    engine = Engine(model, max_batch=batch, max_len=len(prompt) + new_tokens,
                    compile=True if settings["compiled"] else None)
    if engine.compiled:
        engine.warm_up()  # every bucket's graph, as `minillama generate --compile` and `minillama serve` do
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    prompts = [prompt[i:] + prompt[:i] for i in range(batch)]  # distinct prompts of one length

    def run() -> dict:
        start = time.perf_counter()
        for p in prompts:
            engine.add(p, params)
        first_s = None
        while True:  # prefill until every sequence is decoding
            outputs = engine.step()
            first_s = first_s or (time.perf_counter() - start if outputs else None)
            stats = engine.stats()
            if stats.running == batch or not engine.has_work():
                break
        decode_start, cpu_start, decoded = time.perf_counter(), _own_cpu_s(), 0
        for out in engine.run():
            decoded += len(out.token_ids)
        decode_s = time.perf_counter() - decode_start
        return dict(ttft_s=first_s, decode_tokens_per_s=decoded / decode_s,
                    decode_cpu_s_per_token=(_own_cpu_s() - cpu_start) / decoded)

    run.engine = engine  # for benchmarks/decode_ab.py, which changes the engine between rounds
    weight_bytes = weight_bytes_read(model, model.tok_embeddings.weight, getattr(model.output, "weight", None))
    return run, weight_bytes, engine.kv_bytes_per_token, lambda: greedy_head(engine, prompt)


def greedy_head(engine, prompt: list[int], n: int = 16) -> list[int]:
    from minillama.infer import SamplingParams

    return engine.generate([prompt], SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))[0].token_ids


def build_hf(settings: dict, preset: str, prompt: list[int], new_tokens: int, device: str):
    import torch
    from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM

    from minillama.interop.hf import config_to_hf, hf_state_dict

    dtype = torch.float32 if settings["dtype"] == "fp32" else torch.bfloat16
    ours = initial_model(preset, "cpu", torch.float32)
    cfg = ours.cfg
    hf_cfg = LlamaConfig(**{k: v for k, v in config_to_hf(cfg).items() if k != "architectures"},
                         attn_implementation=settings["attention"])
    model = LlamaForCausalLM(hf_cfg)
    missing, unexpected = model.load_state_dict(hf_state_dict(ours), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights do not map onto LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    del ours
    model.to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # decode all new tokens, as ours with ignore_eos
    kwargs = dict(do_sample=False, pad_token_id=0)
    if settings["compiled"]:
        if device.startswith("cuda"):
            compile_config = CompileConfig(fullgraph=False)  # mode reduce-overhead: CUDA graphs
        else:
            from minillama.infer.engine import CPU_COMPILE_OPTIONS

            # Our compiled engine's options, not its freezing: with freezing, HF's static-cache generate fails on its
            # second call (torch 2.13, transformers 5.24: "index out of bounds" in a generated kernel), so HF's
            # weights stay graph inputs and only its GEMMs are autotuned.
            compile_config = CompileConfig(fullgraph=False, mode=None,
                                           options=None if settings["plain"] else dict(CPU_COMPILE_OPTIONS))
        compile_config._compile_all_devices = True  # HF compiles automatically on GPUs only unless told
        kwargs.update(cache_implementation="static", compile_config=compile_config)
    ids = torch.tensor([prompt], device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def generate(n: int):
        with torch.inference_mode():
            return model.generate(ids, max_new_tokens=n, **kwargs)

    def run() -> dict:
        sync()
        start, cpu_start = time.perf_counter(), _own_cpu_s()
        generate(1)
        sync()
        ttft_s, ttft_cpu_s = time.perf_counter() - start, _own_cpu_s() - cpu_start
        start, cpu_start = time.perf_counter(), _own_cpu_s()
        generate(new_tokens)
        sync()
        total_s, total_cpu_s = time.perf_counter() - start, _own_cpu_s() - cpu_start
        return dict(ttft_s=ttft_s, decode_tokens_per_s=(new_tokens - 1) / max(total_s - ttft_s, 1e-9),
                    decode_cpu_s_per_token=(total_cpu_s - ttft_cpu_s) / (new_tokens - 1))

    kv_per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * torch.tensor([], dtype=dtype).element_size()
    return run, weight_bytes_read(model, model.model.embed_tokens.weight, model.lm_head.weight), kv_per_token, \
        lambda: generate(16)[0, len(prompt):].tolist()


def build_llamacpp(settings: dict, preset: str, prompt: list[int], new_tokens: int, device: str):
    import tempfile

    import llama_cpp
    import torch
    from llamacpp_decode import greedy_run

    from minillama.checkpoint import save
    from minillama.interop.gguf import export_gguf
    from minillama.tokenizer import train_bpe_from_texts

    if device != "cpu":
        raise ValueError("the llama.cpp contestants run on the CPU only")
    model = initial_model(preset, "cpu", torch.float32)
    tokenizer = train_bpe_from_texts([__doc__ * 4], vocab_size=512)  # padded to the model's vocabulary on export
    with tempfile.TemporaryDirectory() as tmp:
        save(model, tokenizer, Path(tmp) / "checkpoint")
        path = export_gguf(Path(tmp) / "checkpoint", Path(tmp) / "model.gguf", settings["dtype"])
        threads = torch.get_num_threads()
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + new_tokens + 8, n_batch=512,
                              n_threads=threads, n_threads_batch=threads, verbose=False)
        weight_bytes = path.stat().st_size  # tensors + the vocabulary (a few KB)
    cfg = model.cfg
    if not cfg.tie_embeddings:  # the input embedding is read one row a token (q8_0/f16 alike: its share of the file)
        weight_bytes -= weight_bytes * model.tok_embeddings.weight.numel() // model.num_params()
    del model

    def run() -> dict:
        cpu_start = _own_cpu_s()
        ttft_s, rate, _ = greedy_run(llm, prompt, new_tokens - 1)
        # CPU time of the whole run, prefill included, over the decoded tokens: a bound, a little high
        return dict(ttft_s=ttft_s, decode_tokens_per_s=rate,
                    decode_cpu_s_per_token=(_own_cpu_s() - cpu_start) / (new_tokens - 1))

    kv_per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2  # f16 cache
    return run, weight_bytes, kv_per_token, lambda: greedy_run(llm, prompt, 15)[2]


def worker(conn, name: str, preset: str, prompt_len: int, new_tokens: int, device: str, threads: int | None) -> None:
    import torch

    from minillama.config import ModelConfig
    from minillama.runtime import retain_freed_memory

    if threads:
        torch.set_num_threads(threads)
    retain_freed_memory()  # as `minillama train` does; every contestant alike
    cfg = ModelConfig.from_preset(preset)
    prompt = torch.randint(3, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    settings = parse(name)
    build = dict(minillama=build_minillama, hf=build_hf, llamacpp=build_llamacpp)[settings["kind"]]
    run, weight_bytes, kv_per_token, head = build(settings, preset, prompt, new_tokens, device)
    conn.send(dict(weight_bytes=weight_bytes, kv_bytes_per_token=kv_per_token, first_tokens=head(),
                   threads=torch.get_num_threads()))
    while conn.recv() == "run":
        busy, own, start = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()
        result = run()
        wall_s = time.perf_counter() - start
        result["others_cpu_fraction"] = None if busy is None else max(
            0.0, (_busy_cpu_s() - busy) - (_own_cpu_s() - own)) / wall_s
        conn.send(result)
    conn.close()


# --------------------------------------------------------------------------------------------------------------
# Copy bandwidth
# --------------------------------------------------------------------------------------------------------------
def copy_bandwidth(device: str, threads: int | None, repeats: int = 5) -> float:
    """Bytes per second of dst.copy_(src), read + written, over a buffer larger than the last-level cache."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    size = (4 if device.startswith("cuda") else 1) << 30
    src = torch.ones(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size / best


# --------------------------------------------------------------------------------------------------------------
# The coordinator
# --------------------------------------------------------------------------------------------------------------
def run_preset(preset: str, contestants: list[str], args, bandwidth: float) -> dict:
    ctx = mp.get_context("spawn")
    workers, info, unavailable = {}, {}, {}
    for name in contestants:
        settings = parse(name)
        if settings["kind"] == "minillama" and settings["dtype"] in QUANTIZED and quantizer(settings["dtype"]) is None:
            unavailable[name] = "not available (no minillama.quantize yet)"
            continue
        if settings["kind"] == "llamacpp" and importlib.util.find_spec("llama_cpp") is None:
            unavailable[name] = "not available (pip install llama-cpp-python)"
            continue
        conn, child = ctx.Pipe()
        started = time.perf_counter()
        process = ctx.Process(target=worker, args=(child, name, preset, args.prompt_len, args.new_tokens,
                                                   args.device, args.threads), daemon=True)
        process.start()
        child.close()
        try:
            info[name] = conn.recv()
            start = time.perf_counter()
            for _ in range(args.warmup):
                conn.send("run")
                conn.recv()
        except EOFError:
            raise RuntimeError(f"the {name} worker for {preset} died (its traceback is above)") from None
        print(f"  {preset} {name}: built (and compiled) in {start - started:.1f} s, {args.warmup} warm-up rounds "
              f"in {time.perf_counter() - start:.1f} s", flush=True)
        workers[name] = (process, conn)

    names = list(workers)
    rounds: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            workers[name][1].send("run")
            rounds[name].append(workers[name][1].recv())
    for process, conn in workers.values():
        conn.send("stop")
        process.join(timeout=60)
    return summarize(preset, names, rounds, info, unavailable, args, bandwidth)


def summarize(preset: str, names: list[str], rounds: dict, info: dict, unavailable: dict, args,
              bandwidth: float) -> dict:
    from minillama.config import ModelConfig
    from minillama.model import count_parameters

    quiet = [r for r in range(args.rounds) if all(
        (rounds[n][r]["others_cpu_fraction"] or 0.0) < 0.1 for n in names)]
    mean_context = args.prompt_len + args.new_tokens / 2
    result = dict(preset=preset, params=count_parameters(ModelConfig.from_preset(preset)), quiet_rounds=quiet,
                  contestants={}, unavailable=unavailable)
    for name in names:
        rs = rounds[name]
        settings = parse(name)
        tps = statistics.median(r["decode_tokens_per_s"] for r in rs)
        entry = dict(settings, decode_tokens_per_s=tps, ttft_s=statistics.median(r["ttft_s"] for r in rs),
                     decode_cpu_ms_per_token=1000 * min(r["decode_cpu_s_per_token"] for r in rs),
                     decode_tokens_per_s_quiet=statistics.median([rs[r]["decode_tokens_per_s"] for r in quiet])
                     if quiet else None, rounds=rs, first_tokens=info[name]["first_tokens"],
                     threads=info[name]["threads"])
        if settings["batch"] == 1:
            bytes_per_token = info[name]["weight_bytes"] + info[name]["kv_bytes_per_token"] * mean_context
            entry.update(bytes_per_token=bytes_per_token, bandwidth_bytes_per_s=bytes_per_token * tps,
                         bandwidth_fraction=bytes_per_token * tps / bandwidth,
                         bandwidth_limit_tokens_per_s=bandwidth / bytes_per_token)
        result["contestants"][name] = entry
    hf = [n for n in names if n.startswith("hf-")]
    best = max(hf, key=lambda n: result["contestants"][n]["decode_tokens_per_s"], default=None)
    result["hf_best"] = best
    for name in names:
        entry = result["contestants"][name]
        if best is not None and entry["batch"] == 1:
            per_round = [rounds[name][r]["decode_tokens_per_s"] / rounds[best][r]["decode_tokens_per_s"]
                         for r in range(args.rounds)]
            entry["vs_hf_best"] = statistics.median(per_round)
        single = "-".join(part for part in name.split("-") if part != "b8")  # its batch-1 twin
        if entry["batch"] > 1 and single in result["contestants"]:
            entry["vs_batch_1"] = statistics.median(rounds[name][r]["decode_tokens_per_s"] /
                                                    rounds[single][r]["decode_tokens_per_s"]
                                                    for r in range(args.rounds))
        same_weights = "fp32" if entry["kind"] == "llamacpp" else entry["dtype"]  # f16/q8_0: compared, not equal
        reference = result["contestants"].get(f"minillama-{same_weights}")  # None: nothing to compare with
        entry["first_tokens_agree"] = None if reference is None else entry["first_tokens"] == reference["first_tokens"]
    return result


def print_table(results: list[dict], bandwidth: float) -> None:
    def fmt(value, pattern: str) -> str:
        return "-" if value is None else pattern.format(value)

    print(f"\ncopy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)\n")
    print("| model | contestant | batch | decode tokens/s | TTFT ms | vs HF best | vs batch 1 | GB/s achieved | "
          "of copy bandwidth | limit tokens/s | quiet tokens/s | CPU ms/token | first 16 greedy tokens as "
          "minillama's |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for res in results:
        label = f"{res['preset']} ({res['params'] / 1e6:.0f}M)"
        for name, c in res["contestants"].items():
            print(f"| {label} | {name} | {c['batch']} | {c['decode_tokens_per_s']:,.1f} | {1000 * c['ttft_s']:,.1f} "
                  f"| {fmt(c.get('vs_hf_best'), '{:.2f}x')} | {fmt(c.get('vs_batch_1'), '{:.2f}x')} "
                  f"| {fmt(c.get('bandwidth_bytes_per_s', 0) / 1e9 or None, '{:.1f}')} "
                  f"| {fmt(c.get('bandwidth_fraction'), '{:.0%}')} "
                  f"| {fmt(c.get('bandwidth_limit_tokens_per_s'), '{:,.0f}')} "
                  f"| {fmt(c['decode_tokens_per_s_quiet'], '{:,.1f}')} | {c['decode_cpu_ms_per_token']:.2f} "
                  f"| { {True: 'yes', False: 'no'}.get(c['first_tokens_agree'], '-') } |")
        for name, why in res["unavailable"].items():
            print(f"| {label} | {name} | 1 | {why} | | | | | | | | | |")
    for res in results:
        rounds = len(next(iter(res["contestants"].values()))["rounds"])
        print(f"{res['preset']}: HF best = {res['hf_best']}; {len(res['quiet_rounds'])} of {rounds} rounds quiet "
              "(other processes took under 10% of the CPU time)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--presets", help="comma-separated (default: 15m,125m,350m on CPU; 125m,1b on CUDA)")
    parser.add_argument("--contestants", help=f"comma-separated (default CPU: {','.join(CPU_CONTESTANTS)}; "
                                              f"CUDA: {','.join(CUDA_CONTESTANTS)})")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per contestant, interleaved")
    parser.add_argument("--warmup", type=int, help="unmeasured first rounds (compilation; default 1, CUDA 2)")
    parser.add_argument("--threads", type=int, help="torch threads in every worker (default: torch's)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode.json"))
    args = parser.parse_args(argv)

    import torch
    import transformers

    cuda = args.device.startswith("cuda")
    args.warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    presets = (args.presets or ("125m,1b" if cuda else "15m,125m,350m")).split(",")
    contestants = args.contestants.split(",") if args.contestants else (CUDA_CONTESTANTS if cuda else CPU_CONTESTANTS)
    for name in contestants:
        try:
            parse(name)
        except ValueError:
            parser.error(f"unknown contestant {name!r}; e.g. {', '.join(CPU_CONTESTANTS)}, minillama-fp32-compiled, "
                         f"hf-eager-static-compiled-bf16, {', '.join(LLAMACPP_CONTESTANTS)}")
    from minillama.config import ModelConfig

    for preset in presets:
        if args.prompt_len + args.new_tokens > ModelConfig.from_preset(preset).max_seq_len:
            parser.error(f"--prompt-len + --new-tokens exceeds {preset}'s max_seq_len")
    device_name = _device_name(args.device)
    bandwidth = copy_bandwidth(args.device, args.threads)
    print(f"device {args.device} ({device_name}), torch {torch.__version__}, transformers {transformers.__version__}, "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    results = [run_preset(preset, contestants, args, bandwidth) for preset in presets]
    print_table(results, bandwidth)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(device=args.device, device_name=device_name, torch=torch.__version__,
                                   transformers=transformers.__version__, python=platform.python_version(),
                                   copy_bandwidth_bytes_per_s=bandwidth, prompt_len=args.prompt_len,
                                   new_tokens=args.new_tokens, rounds=args.rounds, warmup=args.warmup,
                                   threads=args.threads, argv=sys.argv[1:], results=results), indent=1))
    tmp.replace(out)
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
