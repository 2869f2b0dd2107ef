"""Serving under load: N concurrent streaming clients on loopback against `minillama serve` (iteration-level
batching), the same server with `--max-batch 1`, and Hugging Face's own OpenAI-compatible server
(`transformers serve --continuous-batching`), on one checkpoint and one request stream.

    python benchmarks/serve_load.py --smoke                       # tiny preset, 4 clients, a few tokens (~30-60 s)
    python benchmarks/serve_load.py                               # 15m and 125m, 32 clients x 4 x 128 tokens
    python benchmarks/serve_load.py --presets 15m --requests-per-client 1 --max-tokens 32 --time-cap 60
                                                                  # a short check that it runs

What is measured. Each contestant is a server process started here on a free 127.0.0.1 port (stdout and stderr
to --work/logs), waited for until GET /health answers 200, warmed up (one request per client, a few tokens, all
at once; not measured), then loaded by --clients asyncio clients (httpx, one connection each) that each send
--requests-per-client streaming POST /v1/completions requests one after another (a closed loop: a client sends
its next request when the previous stream ends). The stream of requests is fixed by --seed: request j of client i
has the prompt i * R + j, a passage of tinyshakespeare (or --text) cut to a token length drawn log-uniformly from
[--prompt-min, --prompt-max] with the checkpoint's tokenizer; max_tokens = --max-tokens, temperature 0. The load
is bounded in count (clients x requests) and in time (--time-cap seconds: streams still open then are cut and
requests not yet sent are dropped; both are counted, and what was streamed until then counts).

Per request the client notes when it sent the request, when the first non-empty text chunk arrived and when the
last one did, and the completion_tokens of the usage the stream ends with (`stream_options.include_usage`; the
number of text chunks where a stream has no usage). From these:
- output tokens/s: all streamed completion tokens / wall clock from the first request sent to the last stream
  ended (or the time cap);
- time to first token (TTFT), p50 and p99 over requests; time per output token (TPOT) = (last token time - first
  token time) / (tokens - 1), p50 and p99 over requests with 2+ tokens; end-to-end latency p50/p99;
- errors: a non-200 answer, an `error` event in the stream, a stream that ends without a finish_reason, a
  connection error. Streams cut by the time cap and requests never sent are reported apart (`cut`, `not_sent`).
- CPU: the server process's CPU seconds during the load (all its threads), this client's, and what every other
  process on the machine took meanwhile (/proc/stat), as a fraction of the wall clock: numbers from a run where
  others took much are noise.

Percentiles interpolate linearly between order statistics (numpy's default); with 128 requests p99 is close to
the maximum.

Contestants (per preset; --contestants picks a subset, --skip-hf drops the last):
- `minillama`: `python -m minillama serve --checkpoint DIR --max-batch B --max-queue Q --threads T --dtype D`
  with B = --max-batch (default: --clients), Q = 2 x clients + 8 (no request is refused for room).
- `minillama-b1`: the same with `--max-batch 1` (one sequence at a time, the rest queued).
- `hf-cb`: `transformers serve DIR --continuous-batching --device cpu --dtype D --attn-implementation sdpa
  --cb-num-blocks K` with K pages of 256 tokens = clients x ceil((prompt-max + max-tokens + 8) / 256), a paged
  cache that holds every client's longest request at once (see below for why it is set).
Both sides run with OMP_NUM_THREADS = MKL_NUM_THREADS = T (default: all CPUs) and TOKENIZERS_PARALLELISM=false,
and the same --dtype (default bf16; this machine's CPU has AVX512-BF16, where bf16 matmuls are native).
--minillama-args and --hf-args append flags to either command line. Contestants run one after the other in the
order given; the client runs in this process on the same CPUs (its CPU time is in the JSON).

EOS. A randomly initialised model may pick EOS under greedy decoding and end a request early, so both servers
are asked to ignore it: minillama with `ignore_eos: true` (vLLM's extension field) and transformers serve with a
per-request `generation_config` of `{"eos_token_id": -1}` (its continuous-batching manager takes -1 as "no EOS";
its /v1/completions refuses unknown fields such as ignore_eos with a 422). Throughput counts the tokens each
server says it produced, so a server that stopped early is not credited with tokens it did not make.

Checkpoints. Built here and cached under --work (ignored by git): the preset's model (`Transformer(cfg)` after
torch.manual_seed(0), random weights: serving speed does not depend on what was learnt) saved with
`minillama.checkpoint.save` as a Hugging Face directory (config.json, model.safetensors in fp32, tokenizer), so
both servers load the same files. The tokenizer has exactly the preset's vocabulary, so every id a random model
can emit decodes: a byte-level BPE trained on tinyshakespeare (`minillama.tokenizer.train_bpe_from_texts`; the
Python docs where /work/shared/data is missing) for the presets with vocabularies it reaches (tiny 2048, 15m 8192;
tinyshakespeare's 1 MB reaches only ~22k pieces), and the Llama 2 SentencePiece tokenizer
(/work/shared/data/llama2-tokenizer.model, 32,000 pieces) for 125m and up.

transformers serve, as found in transformers 5.24.0 (transformers/cli/serve.py and cli/serving/):
- extras: `pip install "transformers[serving]"` (fastapi, uvicorn, starlette, openai, pydantic, rich,
  accelerate); without them the command stops with "Missing dependencies for serving".
- `transformers serve [FORCE_MODEL] --host H --port P --device cpu --dtype bfloat16|float32|auto
  --attn-implementation eager|sdpa|... --continuous-batching [--cb-block-size --cb-num-blocks
  --cb-max-batch-tokens --cb-max-memory-percent --cb-use-cuda-graph] [--compile] --log-level warning`.
  FORCE_MODEL may be a local directory (kept as the model's name; requests must name it or nothing else).
- endpoints: POST /v1/chat/completions, /v1/completions (legacy text completions, streaming SSE, the usage in the
  last chunk, no `data: [DONE]`), /v1/responses, /v1/systemone, /v1/audio/transcriptions, /load_model, /reset;
  GET /v1/models, /health (503 once the continuous-batching worker has died).
- continuous batching works on the CPU, with attention as sdpa or paged|eager (flash kernels only on CUDA/XPU;
  no CUDA graphs, no decode fast path, no compile on the CPU). The batching manager starts on the first request
  (the warm-up here) and takes that request's generation config as the batch's shared sampling config; per
  request only max_new_tokens and eos_token_id are taken. `--compile` (static cache + torch.compile) applies to
  the non-batched generate() path only. Our tokenizer has no chat template, so /v1/completions is the endpoint
  both servers are driven through.
- left to itself on a CPU the paged cache takes 60% of the free system memory (max_memory_percent 0.6 on
  cpu/mps): on this 23 GB machine an 8 GB resident process even for the 1M-parameter `tiny` model, 16-24 s of
  first-request start-up, and sdpa masks over the whole cache every step. Measured once on 15m (bf16, 32 prompts
  of 20-240 tokens, 32 new tokens each; a busy machine, so CPU ms per token): the default cache ~20 ms/token,
  `--cb-num-blocks 64` ~8 ms/token in-process through `generate_batch` (which also passes workload hints, e.g.
  max_requests_per_batch = the number of requests), `--cb-max-batch-tokens 512` alone worse (~18 ms/token). So
  hf-cb gets a cache sized to the load (the one tuning flag the CLI offers that helped in-process, and it keeps
  the process small); max_requests_per_batch and the other hints have no CLI flag, and through the server (no
  hints) both the 64-page and the default cache measured ~16-22 ms/token, not told apart on the busy machine.
- on SIGINT its uvicorn waits ~20 s for the batching thread; this script stops both servers with SIGTERM and
  SIGKILLs what is left after 10 s.

Results: a table on stdout with the ratios (minillama vs minillama-b1, minillama vs hf-cb) and the issue's targets
(at 32 clients: >= 6x the throughput of --max-batch 1, zero errors, p99 TTFT < 2 s on 15m, >= 2x transformers
serve), and JSON per preset (default benchmarks/results/serve_load-<preset>-<date>.json; with --smoke under
--work) with the arguments, the machine (nproc, CPU, torch and transformers versions), the request stream, and
per contestant its command line, summary numbers and every request's raw timings.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_throughput import _busy_cpu_s, _own_cpu_s  # noqa: E402  (the same /proc probes)

SHARED_DATA = ROOT.parent / "shared" / "data"
DEFAULT_TEXT = SHARED_DATA / "tinyshakespeare.txt"
LLAMA2_TOKENIZER = SHARED_DATA / "llama2-tokenizer.model"
CONTESTANTS = ("minillama", "minillama-b1", "hf-cb")
HOST = "127.0.0.1"
SMOKE = dict(presets="tiny", clients=4, requests_per_client=2, max_tokens=8, prompt_min=8, prompt_max=48,
             time_cap=30.0)
HF_DTYPES = {"bf16": "bfloat16", "fp32": "float32", "auto": "auto"}
HF_PAGE_SIZE = 256  # ContinuousBatchingConfig.page_size's default; --cb-num-blocks counts pages of this size


# --------------------------------------------------------------------------------------------------------------
# Checkpoints and the request stream
# --------------------------------------------------------------------------------------------------------------
def load_text(path: Path) -> tuple[str, str]:
    """(text, where from): the file, or where it is missing (a machine without /work/shared/data) the Python
    installation's documentation, as `minillama train`'s default corpus."""
    if path.exists():
        return path.read_text(encoding="utf-8"), str(path)
    from minillama.data.stdlib import python_docs_texts

    return "\n\n".join(python_docs_texts()), "python:docs"


def preset_tokenizer(vocab_size: int, text: str, source: str):
    """A tokenizer with exactly `vocab_size` pieces: the Llama 2 one for 32000, else a BPE on the text."""
    from minillama.tokenizer import load_tokenizer, train_bpe_from_texts

    if vocab_size == 32000 and LLAMA2_TOKENIZER.exists():
        return load_tokenizer(LLAMA2_TOKENIZER)
    tokenizer = train_bpe_from_texts([text], vocab_size)
    if tokenizer.vocab_size != vocab_size:
        raise SystemExit(f"a BPE on {source} reached {tokenizer.vocab_size} pieces, not {vocab_size}; give a "
                         "larger --text")
    return tokenizer


def ensure_checkpoint(preset: str, work: Path, text: str, source: str) -> Path:
    """work/checkpoints/<preset>-random-seed0: the preset with random weights and a tokenizer of its vocabulary,
    built on first use."""
    import torch

    from minillama.checkpoint import save
    from minillama.config import ModelConfig
    from minillama.model import Transformer

    directory = work / "checkpoints" / f"{preset}-random-seed0"
    if (directory / "config.json").exists():
        return directory
    cfg = ModelConfig.from_preset(preset)
    tokenizer = preset_tokenizer(cfg.vocab_size, text, source)
    torch.manual_seed(0)
    model = Transformer(cfg)
    save(model, tokenizer, directory)
    print(f"  {preset}: wrote {directory} ({model.num_params() / 1e6:.1f}M parameters)", flush=True)
    return directory


def log_uniform_lengths(rng: random.Random, count: int, low: int, high: int) -> list[int]:
    return [min(high, max(low, round(math.exp(rng.uniform(math.log(low), math.log(high)))))) for _ in range(count)]


def request_prompts(checkpoint: Path, text: str, count: int, low: int, high: int, seed: int) -> tuple[list[str],
                                                                                                        list[int]]:
    """`count` passages of `text` with token lengths drawn log-uniformly from [low, high] (by the checkpoint's
    tokenizer), and those lengths. The same seed gives the same prompts for every contestant."""
    from minillama.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(checkpoint)
    ids = tokenizer.encode(text[:400_000])
    if len(ids) <= high:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than --prompt-max {high}")
    rng = random.Random(seed)
    lengths = log_uniform_lengths(rng, count, low, high)
    prompts = []
    for length in lengths:
        start = rng.randrange(len(ids) - length)
        prompts.append(tokenizer.decode(ids[start:start + length]))
    return prompts, [len(tokenizer.encode(p)) for p in prompts]


# --------------------------------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def server_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def minillama_serve_problem() -> str | None:
    """None when this checkout has the minillama.serve package, else why not (a server that then fails to start
    is reported as failed, with its log)."""
    import importlib.util

    if importlib.util.find_spec("minillama.serve") is None:
        return f"no minillama.serve package in {ROOT}"
    return None


def hf_serve_problem() -> str | None:
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        return 'transformers serve needs its extras: pip install "transformers[serving]"'
    return None


def transformers_cli() -> list[str]:
    script = Path(sys.executable).with_name("transformers")
    if script.exists():
        return [str(script)]
    found = shutil.which("transformers")
    if found:
        return [found]
    return [sys.executable, "-c", "from transformers.cli.transformers import main; main()"]


def server_command(name: str, checkpoint: Path, port: int, args) -> list[str]:
    if name.startswith("minillama"):
        max_batch = 1 if name == "minillama-b1" else args.max_batch
        return [sys.executable, "-m", "minillama", "serve", "--checkpoint", str(checkpoint), "--host", HOST,
                "--port", str(port), "--max-batch", str(max_batch), "--max-queue", str(2 * args.clients + 8),
                "--threads", str(args.threads), "--dtype", args.dtype, *shlex.split(args.minillama_args)]
    extra = shlex.split(args.hf_args)
    if "--cb-num-blocks" not in extra:
        extra += ["--cb-num-blocks", str(hf_cache_blocks(args))]
    return [*transformers_cli(), "serve", str(checkpoint), "--continuous-batching", "--device", "cpu",
            "--dtype", HF_DTYPES[args.dtype], "--attn-implementation", "sdpa", "--host", HOST, "--port", str(port),
            "--log-level", "warning", *extra]


def hf_cache_blocks(args) -> int:
    """Pages of HF_PAGE_SIZE tokens that hold every client's longest request at once (at least 8)."""
    per_request = math.ceil((args.prompt_max + args.max_tokens + 8) / HF_PAGE_SIZE)
    return max(8, args.clients * per_request)


def extra_body(name: str) -> dict:
    """Per server, how to ask for every one of max_tokens regardless of EOS (see the module docstring)."""
    if name.startswith("minillama"):
        return {"ignore_eos": True}
    return {"generation_config": json.dumps({"eos_token_id": -1, "do_sample": False})}


def _process_tree(pid: int) -> list[int]:
    """A process and its descendants alive now (Linux /proc)."""
    children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                for c in (task / "children").read_text().split()]
    return [pid] + [p for child in children for p in _process_tree(child)]


def _process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """A server subprocess in its own session, its output in a log file."""

    def __init__(self, command: list[str], env: dict, log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(command, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
                                        start_new_session=True)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def cpu_s(self) -> float | None:
        """CPU seconds the server has used: its process and the processes it started (minillama's engine process),
        all their threads (Linux)."""
        try:
            return sum(_process_cpu_s(pid) for pid in _process_tree(self.process.pid))
        except (OSError, ValueError, IndexError):
            return None

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM (both servers shut down on it; no request is running by now), then SIGKILL after grace_s
        (transformers serve's uvicorn can wait on its batching thread for long)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        try:  # the server's own children (workers, compilers), by its session's process group
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()
        self._log.close()


async def wait_healthy(base_url: str, server: Server, timeout_s: float) -> float:
    import httpx

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=base_url, timeout=5.0) as client:
        while time.perf_counter() - start < timeout_s:
            if server.process.poll() is not None:
                raise RuntimeError(f"the server exited with {server.process.returncode} before it was healthy:\n"
                                   f"{server.log_tail()}")
            try:
                if (await client.get("/health")).status_code == 200:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.25)
    raise RuntimeError(f"the server was not healthy after {timeout_s:.0f} s:\n{server.log_tail()}")


def engine_step_totals(base_url: str) -> tuple[float, int] | None:
    """minillama's engine: seconds spent in steps and steps taken so far (its /metrics histogram); None for a
    server without it. Their difference over the load says how busy the engine was."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(f"{base_url}/metrics", timeout=5.0).text
        samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    except (httpx.HTTPError, ValueError):
        return None
    if "minillama_engine_step_seconds_sum" not in samples:
        return None
    return samples["minillama_engine_step_seconds_sum"], int(samples["minillama_engine_step_seconds_count"])


async def served_model_name(base_url: str, checkpoint: Path) -> str:
    """The name to put in requests: the checkpoint path where /v1/models lists it, else its first model."""
    import httpx

    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=10.0) as client:
            ids = [m.get("id") for m in (await client.get("/v1/models")).json().get("data", [])]
    except (httpx.HTTPError, ValueError, AttributeError):
        ids = []
    return str(checkpoint) if str(checkpoint) in ids or not ids else ids[0]


# --------------------------------------------------------------------------------------------------------------
# The load
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Record:
    client: int
    index: int
    prompt: int
    sent_s: float | None = None  # seconds from the start of the load
    first_token_s: float | None = None
    last_token_s: float | None = None
    end_s: float | None = None
    chunks: int = 0  # non-empty text chunks
    usage_tokens: int | None = None
    finish_reason: str | None = None
    status: str = "not_sent"  # ok | error | cut | not_sent
    error: str | None = None

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.chunks


async def stream_one(client, body: dict, record: Record, start: float) -> None:
    import httpx

    record.sent_s = time.perf_counter() - start
    record.status = "running"
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                record.status, record.error = "error", f"HTTP {response.status_code}: {text[:300]}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter() - start
                try:
                    event = json.loads(data)
                except ValueError:
                    record.status, record.error = "error", f"not JSON: {data[:200]}"
                    return
                if event.get("error"):
                    record.status, record.error = "error", f"error event: {json.dumps(event['error'])[:300]}"
                    return
                for choice in event.get("choices") or []:
                    text = choice.get("text")
                    if text is None:
                        text = (choice.get("delta") or {}).get("content")
                    if text:
                        record.chunks += 1
                        record.first_token_s = record.first_token_s if record.first_token_s is not None else now
                        record.last_token_s = now
                    if choice.get("finish_reason"):
                        record.finish_reason = choice["finish_reason"]
                if event.get("usage"):
                    record.usage_tokens = event["usage"].get("completion_tokens")
    except (httpx.HTTPError, OSError, ValueError) as exc:  # connection, protocol, decoding
        record.status, record.error = "error", f"{type(exc).__name__}: {exc}"[:300]
        return
    finally:
        record.end_s = time.perf_counter() - start
    if record.finish_reason is None:
        record.status, record.error = "error", "the stream ended without a finish_reason"
    else:
        record.status = "ok"


async def run_load(base_url: str, model: str, prompts: list[str], clients: int, per_client: int, max_tokens: int,
                   extra: dict, time_cap_s: float, ramp_s: float = 0.0) -> tuple[list[Record], float]:
    """Every client sends its requests one after another; returns the records and the wall clock."""
    import httpx

    records = [Record(client=i, index=j, prompt=i * per_client + j) for i in range(clients) for j in
               range(per_client)]
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    timeout = httpx.Timeout(time_cap_s + 60, connect=30.0)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:
        start = time.perf_counter()

        async def client_loop(i: int) -> None:
            if ramp_s:
                await asyncio.sleep(ramp_s * i / clients)
            for record in records[i * per_client:(i + 1) * per_client]:
                body = dict(model=model, prompt=prompts[record.prompt], max_tokens=max_tokens, temperature=0,
                            stream=True, stream_options={"include_usage": True}, **extra)
                await stream_one(client, body, record, start)

        tasks = [asyncio.create_task(client_loop(i)) for i in range(clients)]
        _, pending = await asyncio.wait(tasks, timeout=time_cap_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - start
    for record in records:
        if record.status == "running":
            record.status = "cut"
    ended = [r.end_s for r in records if r.end_s is not None]
    return records, (min(wall, max(ended)) if ended and not pending else wall)


async def warm_up(base_url: str, model: str, prompts: list[str], clients: int, extra: dict) -> list[str]:
    """One short request per client, all at once; returns the errors."""
    records, _ = await run_load(base_url, model, prompts, clients, 1, 4, extra, time_cap_s=600.0)
    return [r.error for r in records if r.status != "ok"]


# --------------------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    """numpy's percentile (linear interpolation between order statistics); None for no values."""
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def summarize(records: list[Record], wall_s: float) -> dict:
    ttft = [r.first_token_s - r.sent_s for r in records if r.first_token_s is not None]
    tpot = [(r.last_token_s - r.first_token_s) / (r.tokens - 1) for r in records
            if r.status == "ok" and r.tokens > 1 and r.first_token_s is not None]
    e2e = [r.end_s - r.sent_s for r in records if r.status == "ok"]
    tokens = sum(r.tokens for r in records if r.status in ("ok", "cut"))
    count = {status: sum(r.status == status for r in records) for status in ("ok", "error", "cut", "not_sent")}
    errors = [r.error for r in records if r.status == "error"]
    ok = [r for r in records if r.status == "ok"]
    return dict(
        wall_s=wall_s, output_tokens=tokens, output_tokens_per_s=tokens / wall_s if wall_s > 0 else None,
        requests=len(records), completed=count["ok"], errors=count["error"], cut_by_time_cap=count["cut"],
        not_sent=count["not_sent"], error_examples=sorted(set(errors))[:5],
        ttft_p50_s=percentile(ttft, 50), ttft_p99_s=percentile(ttft, 99), ttft_max_s=max(ttft, default=None),
        tpot_p50_s=percentile(tpot, 50), tpot_p99_s=percentile(tpot, 99),
        e2e_p50_s=percentile(e2e, 50), e2e_p99_s=percentile(e2e, 99),
        mean_tokens_per_completed_request=sum(r.tokens for r in ok) / len(ok) if ok else None,
        finish_reasons={reason: sum(r.finish_reason == reason for r in ok) for reason in
                        sorted({r.finish_reason for r in ok})},
        usage_reported=sum(r.usage_tokens is not None for r in ok),
    )


def run_contestant(name: str, checkpoint: Path, prompts: list[str], args, log_dir: Path) -> dict:
    port = free_port()
    command = server_command(name, checkpoint, port, args)
    base_url = f"http://{HOST}:{port}"
    print(f"  {name}: {shlex.join(command)}", flush=True)
    started = time.perf_counter()
    server = Server(command, server_env(args.threads), log_dir / f"{checkpoint.name}-{name}.log")
    try:
        startup_s = asyncio.run(wait_healthy(base_url, server, args.startup_timeout))
        model = asyncio.run(served_model_name(base_url, checkpoint))
        extra = extra_body(name)
        warm = time.perf_counter()
        warm_errors = asyncio.run(warm_up(base_url, model, prompts, args.clients, extra))
        warm_s = time.perf_counter() - warm
        if warm_errors:
            print(f"    warm-up errors: {sorted(set(warm_errors))[:3]}", flush=True)
        steps_before = engine_step_totals(base_url)
        busy, own, server_cpu = _busy_cpu_s(), _own_cpu_s(), server.cpu_s()
        records, wall_s = asyncio.run(run_load(base_url, model, prompts, args.clients, args.requests_per_client,
                                               args.max_tokens, extra, args.time_cap, args.ramp))
        own = _own_cpu_s() - own
        server_cpu = None if server_cpu is None or server.cpu_s() is None else server.cpu_s() - server_cpu
        busy = None if busy is None else _busy_cpu_s() - busy
        alive = server.process.poll() is None
        steps_after = engine_step_totals(base_url) if steps_before is not None else None
    finally:
        server.stop()
    summary = summarize(records, wall_s)
    others = None if busy is None or server_cpu is None else max(0.0, busy - server_cpu - own) / wall_s
    summary.update(startup_s=startup_s, warmup_s=warm_s, warmup_errors=len(warm_errors), server_cpu_s=server_cpu,
                   client_cpu_s=own, others_cpu_fraction=others, server_alive_after_load=alive,
                   total_s=time.perf_counter() - started)
    if steps_after is not None:  # the engine's time in steps, and the mean step, during the load
        step_s, steps = steps_after[0] - steps_before[0], steps_after[1] - steps_before[1]
        summary.update(engine_steps=steps, engine_step_s=step_s, engine_busy_fraction=step_s / wall_s,
                       engine_mean_step_s=step_s / steps if steps else None)
    print(f"    {summary['output_tokens_per_s']:.1f} tokens/s, {summary['completed']}/{summary['requests']} done, "
          f"{summary['errors']} errors, {summary['cut_by_time_cap']} cut, TTFT p50/p99 "
          f"{fmt_s(summary['ttft_p50_s'])}/{fmt_s(summary['ttft_p99_s'])}, TPOT p50/p99 "
          f"{fmt_s(summary['tpot_p50_s'])}/{fmt_s(summary['tpot_p99_s'])} (startup {startup_s:.1f} s, warm-up "
          f"{warm_s:.1f} s)", flush=True)
    if summary.get("engine_steps"):
        print(f"    engine: {summary['engine_steps']} steps, mean {1000 * summary['engine_mean_step_s']:.1f} ms, "
              f"busy {summary['engine_busy_fraction']:.0%} of the load's wall clock", flush=True)
    return dict(command=command, model_name=model, extra_body=extra, log=str(server.log_path), summary=summary,
                requests=[asdict(r) for r in records])


def fmt_s(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def ratios_and_targets(preset: str, contestants: dict, args) -> tuple[dict, dict]:
    def tps(name: str) -> float | None:
        entry = contestants.get(name)
        return entry["summary"]["output_tokens_per_s"] if entry and "summary" in entry else None

    ours, single, hf = tps("minillama"), tps("minillama-b1"), tps("hf-cb")
    ratios = dict(minillama_vs_b1=ours / single if ours and single else None,
                  minillama_vs_hf=ours / hf if ours and hf else None)
    targets: dict[str, dict] = {}
    if ours is not None:
        summary = contestants["minillama"]["summary"]
        targets["zero errors"] = dict(value=summary["errors"], passed=summary["errors"] == 0)
        if preset == "15m":
            p99 = summary["ttft_p99_s"]
            targets["p99 TTFT < 2 s"] = dict(value=p99, passed=p99 is not None and p99 < 2.0)
    if ratios["minillama_vs_b1"] is not None:
        targets[">= 6x max-batch 1"] = dict(value=ratios["minillama_vs_b1"], passed=ratios["minillama_vs_b1"] >= 6)
    if ratios["minillama_vs_hf"] is not None:
        targets[">= 2x transformers serve"] = dict(value=ratios["minillama_vs_hf"],
                                                   passed=ratios["minillama_vs_hf"] >= 2)
    return ratios, targets


def print_table(result: dict) -> None:
    print(f"\n{result['preset']} ({result['checkpoint']['params'] / 1e6:.1f}M parameters, {result['args']['dtype']}), "
          f"{result['request_stream']['clients']} clients x {result['request_stream']['requests_per_client']} "
          f"requests, max_tokens {result['request_stream']['max_tokens']}, prompts "
          f"{result['request_stream']['prompt_tokens_min']}-{result['request_stream']['prompt_tokens_max']} tokens")
    print("| contestant | output tokens/s | vs minillama | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | done | errors "
          "| cut | server CPU ms/token | others' CPU |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    ours = result["contestants"].get("minillama", {}).get("summary", {}).get("output_tokens_per_s")
    for name, entry in result["contestants"].items():
        if "summary" not in entry:
            print(f"| {name} | {entry.get('unavailable') or entry.get('failed')} | | | | | | | | | | |")
            continue
        s = entry["summary"]
        versus = f"{s['output_tokens_per_s'] / ours:.2f}x" if ours and s["output_tokens_per_s"] else "-"
        others = "-" if s["others_cpu_fraction"] is None else f"{s['others_cpu_fraction']:.0%}"
        cpu = "-" if not s["server_cpu_s"] or not s["output_tokens"] else \
            f"{1000 * s['server_cpu_s'] / s['output_tokens']:.1f}"
        print(f"| {name} | {s['output_tokens_per_s']:,.1f} | {versus} | {fmt_s(s['ttft_p50_s'])} "
              f"| {fmt_s(s['ttft_p99_s'])} | {fmt_s(s['tpot_p50_s'])} | {fmt_s(s['tpot_p99_s'])} "
              f"| {s['completed']}/{s['requests']} | {s['errors']} | {s['cut_by_time_cap']} | {cpu} | {others} |")
    ratios = {key: "-" if value is None else f"{value:.2f}x" for key, value in result["ratios"].items()}
    print(f"minillama / minillama-b1: {ratios['minillama_vs_b1']}; minillama / hf-cb: {ratios['minillama_vs_hf']}"
          + ("  (smoke run: the targets are for 32 clients on 15m and 125m)" if result["smoke"] else ""))
    for target, check in result["targets"].items():
        value = check["value"]
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"  target {target}: {shown} -> {'PASS' if check['passed'] else 'FAIL'}")


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------
def machine_info() -> dict:
    import torch

    from minillama.plan.hardware import cpu_model_name

    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True,
                                    text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    nproc = shutil.which("nproc")
    return dict(nproc=int(subprocess.run([nproc], capture_output=True, text=True).stdout) if nproc else None,
                cpu_count=os.cpu_count(), cpu=cpu_model_name(), platform=platform.platform(),
                python=platform.python_version(), torch=torch.__version__, transformers=hf_version,
                git_commit=commit, git_dirty=dirty, loadavg=os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help=f"a quick end-to-end check: {', '.join(f'{k}={v}' for k, v in SMOKE.items())}")
    parser.add_argument("--presets", help="comma-separated (default 15m,125m)")
    parser.add_argument("--contestants", default=",".join(CONTESTANTS), help=f"subset of {','.join(CONTESTANTS)}")
    parser.add_argument("--skip-hf", action="store_true", help="leave out transformers serve")
    parser.add_argument("--clients", type=int, help="concurrent streaming clients (default 32)")
    parser.add_argument("--requests-per-client", type=int, help="sent one after another by each client (default 4)")
    parser.add_argument("--max-tokens", type=int, help="max_tokens of every request (default 128)")
    parser.add_argument("--prompt-min", type=int, help="shortest prompt in tokens (default 16)")
    parser.add_argument("--prompt-max", type=int, help="longest prompt in tokens (default 256)")
    parser.add_argument("--time-cap", type=float, help="seconds of load per contestant at most (default 300)")
    parser.add_argument("--ramp", type=float, default=0.0, help="spread the clients' first requests over this "
                                                                "many seconds (default 0: all at once)")
    parser.add_argument("--max-batch", type=int, help="minillama's --max-batch (default: --clients)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch/OpenMP threads of every server")
    parser.add_argument("--dtype", default="bf16", choices=sorted(HF_DTYPES), help="of both servers")
    parser.add_argument("--minillama-args", default="", help="more flags for `minillama serve`")
    parser.add_argument("--hf-args", default="", help="more flags for `transformers serve`")
    parser.add_argument("--seed", type=int, default=0, help="of the request stream")
    parser.add_argument("--text", default=str(DEFAULT_TEXT),
                        help="prompts and BPE training text (where missing: the Python docs)")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / "out" / "serve_load"),
                        help="checkpoints and server logs")
    parser.add_argument("--out", help="JSON path; {preset} and {date} are filled in (default "
                                      "benchmarks/results/serve_load-{preset}-{date}.json; with --smoke under --work)")
    args = parser.parse_args(argv)

    defaults = dict(presets="15m,125m", clients=32, requests_per_client=4, max_tokens=128, prompt_min=16,
                    prompt_max=256, time_cap=300.0)
    for key, value in (SMOKE if args.smoke else defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.max_batch = args.max_batch or args.clients
    contestants = [c for c in args.contestants.split(",") if c and not (args.skip_hf and c == "hf-cb")]
    for name in contestants:
        if name not in CONTESTANTS:
            parser.error(f"unknown contestant {name!r}; choose from {', '.join(CONTESTANTS)}")
    if not 1 <= args.prompt_min <= args.prompt_max:
        parser.error("need 1 <= --prompt-min <= --prompt-max")
    date = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = Path(args.work)
    out_pattern = args.out or str((work if args.smoke else ROOT / "benchmarks" / "results") /
                                  "serve_load-{preset}-{date}.json")
    if len(args.presets.split(",")) > 1 and "{preset}" not in out_pattern:
        parser.error("--out must contain {preset} when there are several presets")

    from minillama.config import ModelConfig
    from minillama.files import atomic_write_json

    for preset in args.presets.split(","):
        if args.prompt_max + args.max_tokens + 2 > ModelConfig.from_preset(preset).max_seq_len:
            parser.error(f"--prompt-max + --max-tokens exceeds {preset}'s max_seq_len")

    unavailable = {}
    if any(c.startswith("minillama") for c in contestants):
        problem = minillama_serve_problem()
        unavailable.update({c: problem for c in contestants if c.startswith("minillama") and problem})
    if "hf-cb" in contestants and (problem := hf_serve_problem()):
        unavailable["hf-cb"] = problem
    for name, why in unavailable.items():
        print(f"{name}: not available: {why}", flush=True)

    machine = machine_info()
    print(f"{machine['cpu']}, nproc {machine['nproc']}, torch {machine['torch']}, transformers "
          f"{machine['transformers']}, load average {machine['loadavg'][0]:.2f}", flush=True)
    text, text_source = load_text(Path(args.text))
    outputs, started = [], time.perf_counter()
    for preset in args.presets.split(","):
        print(f"{preset}:", flush=True)
        checkpoint = ensure_checkpoint(preset, work, text, text_source)
        count = args.clients * args.requests_per_client
        prompts, prompt_tokens = request_prompts(checkpoint, text, count, args.prompt_min, args.prompt_max,
                                                 args.seed)
        from minillama.checkpoint import read_config
        from minillama.model import count_parameters

        results: dict[str, dict] = {}
        for name in contestants:
            if name in unavailable:
                results[name] = dict(unavailable=unavailable[name])
                continue
            try:
                results[name] = run_contestant(name, checkpoint, prompts, args, work / "logs")
            except RuntimeError as exc:
                print(f"    {name} failed: {exc}", flush=True)
                results[name] = dict(failed=str(exc).splitlines()[0], detail=str(exc))
        ratios, targets = ratios_and_targets(preset, results, args)
        result = dict(
            benchmark="serve_load", preset=preset, date=date, smoke=args.smoke, argv=sys.argv[1:] if argv is None
            else argv, args=vars(args), machine=machine,
            checkpoint=dict(path=str(checkpoint), params=count_parameters(read_config(checkpoint)),
                            weights="random (torch.manual_seed(0))"),
            request_stream=dict(clients=args.clients, requests_per_client=args.requests_per_client,
                                max_tokens=args.max_tokens, seed=args.seed, text=text_source,
                                prompt_tokens=prompt_tokens,
                                prompt_tokens_min=min(prompt_tokens), prompt_tokens_max=max(prompt_tokens),
                                prompt_tokens_mean=sum(prompt_tokens) / len(prompt_tokens)),
            contestants=results, ratios=ratios, targets=targets)
        print_table(result)
        out = Path(out_pattern.format(preset=preset, date=date))
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, result)
        print(f"JSON: {out}", flush=True)
        outputs.append(result)
    failed = [name for r in outputs for name, entry in r["contestants"].items() if "failed" in entry]
    print(f"done in {time.perf_counter() - started:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
