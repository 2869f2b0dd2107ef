"""`minillama serve`: a real server in a subprocess on a loopback port, spoken to with the `openai` client and
httpx. Completions and chat, streamed and not; greedy text alone equals greedy text among 32 concurrent requests;
the bad-input catalog (each a 4xx in OpenAI's shape, and the server answers the next request); a client that
disconnects frees its KV memory; 429 under a full queue; 401 without the key; SIGTERM drains and exits 0; /health
sees a stalled engine; the OpenAPI schema fuzzed with schemathesis finds no 5xx.

The servers run conftest's `tiny_checkpoint` (a random 2-layer dim-32 model, weights drawn wide so greedy argmaxes
are far from ties; a BPE tokenizer, so text round-trips) in fp32 with one thread.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from minillama.serve.chat import ChatFormatter, plain_chat_text

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 128  # the main server's --max-context: bounds every request the fuzzer can make
BODY_LIMIT = 65536


class ServerProcess:
    """`python -m minillama serve ... --port 0` in a subprocess; the URL is read from its first line."""

    def __init__(self, checkpoint: Path, *flags: str, env: dict[str, str] | None = None) -> None:
        self.checkpoint = str(checkpoint)
        environment = {k: v for k, v in os.environ.items() if k != "MINILLAMA_API_KEY"}
        environment.update(PYTHONPATH=str(REPO), **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "minillama", "serve", "--checkpoint", self.checkpoint, "--port", "0",
             "--dtype", "fp32", "--threads", "1", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment, cwd=REPO)
        line = self.proc.stdout.readline()
        match = re.search(r"at (http://\S+)/v1 ", line)
        if match is None:
            self.proc.kill()
            raise AssertionError(f"the server did not start: {line!r} {self.proc.stderr.read()}")
        self.url = match.group(1)
        self.curl_line = self.proc.stdout.readline().strip()
        self.stderr_lines: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0,
                             **kwargs)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics").text
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(minillama_\w+(?:\{[^}]*\})?) (\S+)$", text,
                                                                    re.M)}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    s = ServerProcess(tiny_checkpoint, "--max-context", str(CONTEXT), "--max-body-bytes", str(BODY_LIMIT))
    yield s
    assert s.stop() == 0
    assert not any("Traceback" in line for line in s.stderr_lines), "".join(s.stderr_lines)


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def complete(server, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", json={"model": server.checkpoint, **body}, timeout=60)


# --------------------------------------------------------------------------------------------------------------
# The API with the openai client
# --------------------------------------------------------------------------------------------------------------
def test_start_prints_the_url_and_a_working_curl_line(server):
    assert server.curl_line.startswith(f"curl {server.url}/v1/chat/completions")
    proc = subprocess.run(server.curl_line, shell=True, capture_output=True, text=True, timeout=60)
    answer = json.loads(proc.stdout)
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["role"] == "assistant"


def test_models_lists_the_checkpoint(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [server.checkpoint]


def test_completions_streamed_and_not(client, server):
    args = dict(model=server.checkpoint, prompt="ROMEO: what say you", max_tokens=12, temperature=0)
    done = client.completions.create(**args)
    choice = done.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.text
    assert done.usage.completion_tokens <= 12 and done.usage.prompt_tokens > 0
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == done.usage.completion_tokens


def test_chat_streamed_and_not(client, server):
    args = dict(model=server.checkpoint, messages=[{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": "Hello there"}],
                max_tokens=10, temperature=0)
    done = client.chat.completions.create(**args)
    message = done.choices[0].message
    assert message.role == "assistant" and message.content and done.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(**args, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    # The plain template (no chat template in the checkpoint): the same text as a completion of it.
    prompt = plain_chat_text(args["messages"])
    same = client.completions.create(model=server.checkpoint, prompt=prompt, max_tokens=10, temperature=0)
    assert same.choices[0].text == message.content and same.usage.prompt_tokens == done.usage.prompt_tokens


def test_n_seeds_logprobs_penalties(client, server):
    args = dict(model=server.checkpoint, prompt="KING:", max_tokens=8, temperature=1.0, seed=11)
    three = client.completions.create(**args, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    for j, choice in enumerate(three.choices):  # sequence j is seeded seed + j
        alone = client.completions.create(**{**args, "seed": 11 + j})
        assert alone.choices[0].text == choice.text
    scored = client.completions.create(**args, logprobs=2, frequency_penalty=0.5, presence_penalty=0.5)
    lp = scored.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == scored.usage.completion_tokens
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) <= 2 for t in lp.top_logprobs)
    chat = client.chat.completions.create(model=server.checkpoint, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=5, logprobs=True, top_logprobs=3, temperature=0)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)


def test_stop_strings_never_leak_into_a_stream(client, server):
    args = dict(model=server.checkpoint, prompt="ROMEO:", max_tokens=40, temperature=0,
                extra_body={"ignore_eos": True})
    full = client.completions.create(**args).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]  # a piece from the middle, likely split over tokens
    assert len(stop) == 3 and stop.strip()
    chunks = list(client.completions.create(**args, stop=[stop], stream=True))
    pieces = [c.choices[0].text for c in chunks]
    assert "".join(pieces) == full[:full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert not any(stop in p for p in pieces)


def test_greedy_text_alone_equals_text_among_32_concurrent_requests(server):
    """32 requests of mixed prompt lengths and max_tokens, some streamed: each gives, token for token, what it
    gives alone."""
    words = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
             "Arise, fair sun, and kill the envious moon").split()
    requests = [dict(prompt=" ".join(words[:1 + (7 * i) % len(words)]), max_tokens=4 + (13 * i) % 37,
                     stream=i % 3 == 0) for i in range(32)]
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)

    async def one(r):
        args = dict(model=server.checkpoint, prompt=r["prompt"], max_tokens=r["max_tokens"], temperature=0)
        if not r["stream"]:
            return (await client.completions.create(**args)).choices[0].text
        return "".join([c.choices[0].text async for c in await client.completions.create(**args, stream=True)])

    async def run():
        alone = [await one(r) for r in requests]
        together = await asyncio.gather(*(one(r) for r in requests))
        return alone, together

    alone, together = asyncio.run(run())
    assert together == alone
    assert len({len(t) for t in alone}) > 5  # mixed lengths really


# --------------------------------------------------------------------------------------------------------------
# Bad input: a 4xx in OpenAI's shape with a clear message, and the server answers the next request
# --------------------------------------------------------------------------------------------------------------
MODEL = "{model}"
BAD_INPUT = [
    # (name, path, raw body or JSON object, status, substring of the message)
    ("malformed JSON", "completions", b'{"model": "x", "prompt": ', 400, "not valid JSON"),
    ("not an object", "completions", [1, 2], 400, "JSON object"),
    ("empty body", "completions", b"", 400, "JSON object"),
    ("max_tokens a string", "completions", {"prompt": "a", "max_tokens": "ten"}, 400, "'max_tokens'"),
    ("temperature a string", "completions", {"prompt": "a", "temperature": "hot"}, 400, "'temperature'"),
    ("messages not a list", "chat/completions", {"messages": "hello"}, 400, "'messages'"),
    ("unknown role", "chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("empty messages", "chat/completions", {"messages": []}, 400, "'messages'"),
    ("missing prompt", "completions", {}, 400, "'prompt'"),
    ("missing messages", "chat/completions", {}, 400, "'messages'"),
    ("missing model", "completions", {"model": None, "prompt": "a"}, 400, "'model'"),
    ("unknown model", "completions", {"model": "gpt-9", "prompt": "a"}, 404, "does not exist"),
    ("max_tokens 0", "completions", {"prompt": "a", "max_tokens": 0}, 400, "'max_tokens'"),
    ("max_tokens negative", "completions", {"prompt": "a", "max_tokens": -5}, 400, "'max_tokens'"),
    ("max_tokens beyond the context", "completions", {"prompt": "a", "max_tokens": 10_000}, 400, "context holds"),
    ("chat max_tokens beyond the context", "chat/completions",
     {"messages": [{"role": "user", "content": "a"}], "max_tokens": 10_000}, 400, "context holds"),
    ("prompt longer than the context", "completions", {"prompt": "word " * 400}, 400, "context holds"),
    ("prompt ids beyond the context", "completions", {"prompt": [5] * 500, "max_tokens": 1}, 400, "context holds"),
    ("prompt id outside the vocabulary", "completions", {"prompt": [1, 10_000]}, 400, "outside the vocabulary"),
    ("n too large", "completions", {"prompt": "a", "n": 1000}, 400, "n=1000"),
    ("n zero", "completions", {"prompt": "a", "n": 0}, 400, "'n'"),
    ("oversized body", "completions", {"prompt": "a" * (BODY_LIMIT + 10)}, 413, "larger than"),
    ("invalid UTF-8", "completions", b'{"model": "\xff\xfe", "prompt": "a"}', 400, "not valid UTF-8"),
    ("stop list too long", "completions", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ("empty stop string", "completions", {"prompt": "a", "stop": [""]}, 400, "'stop'"),
    ("top_p 0", "completions", {"prompt": "a", "top_p": 0}, 400, "'top_p'"),
    ("temperature too high", "completions", {"prompt": "a", "temperature": 5}, 400, "'temperature'"),
    ("logprobs too many", "completions", {"prompt": "a", "logprobs": 99}, 400, "'logprobs'"),
    ("negative seed", "completions", {"prompt": "a", "seed": -1}, 400, "'seed'"),
    ("echo", "completions", {"prompt": "a", "echo": True}, 400, "echo is not supported"),
    ("top_logprobs without logprobs", "chat/completions",
     {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, 400, "needs logprobs"),
    ("unknown route", "nosuch", {"prompt": "a"}, 404, "no such route"),
]


@pytest.mark.parametrize("name, path, body, status, message", BAD_INPUT, ids=[row[0] for row in BAD_INPUT])
def test_bad_input_is_a_4xx_in_openai_shape(server, name, path, body, status, message):
    if isinstance(body, dict):
        body = json.dumps({"model": server.checkpoint, **body}).encode()
    elif isinstance(body, list):
        body = json.dumps(body).encode()
    response = httpx.post(f"{server.url}/v1/{path}", content=body, headers={"Content-Type": "application/json"},
                          timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and message in error["message"], error
    assert "Traceback" not in response.text and "pydantic" not in response.text
    after = complete(server, prompt="a", max_tokens=1)
    assert after.status_code == 200, after.text


def test_client_disconnect_cancels_and_frees_kv_memory(server):
    """100 streams closed after their first chunk: each sequence is cancelled (far fewer tokens generated than
    asked for) and the free KV memory returns to what it was."""
    before = server.metrics()
    max_tokens = CONTEXT - 20
    body = {"model": server.checkpoint, "prompt": "ROMEO: speak", "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True}

    def abort(_):
        with httpx.Client(timeout=30) as http, http.stream("POST", f"{server.url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # the first chunk: leave

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(abort, range(100)))
    deadline = time.monotonic() + 30
    while True:
        now = server.metrics()
        settled = (now["minillama_kv_cache_bytes_free"] == before["minillama_kv_cache_bytes_free"]
                   and now["minillama_kv_cache_tokens_reserved"] == 0 and now["minillama_running_sequences"] == 0
                   and now["minillama_queue_depth"] == 0)
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert now["minillama_kv_cache_bytes_free"] == before["minillama_kv_cache_bytes_free"]
    assert now["minillama_kv_cache_bytes_in_use"] == 0 and now["minillama_kv_cache_tokens_reserved"] == 0
    generated = now["minillama_generation_tokens_total"] - before["minillama_generation_tokens_total"]
    assert generated < 100 * max_tokens / 4, f"{generated} tokens: the aborted sequences ran on"


# --------------------------------------------------------------------------------------------------------------
# Limits: a full queue, the API key, /health
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_server(tiny_checkpoint):
    s = ServerProcess(tiny_checkpoint, "--max-batch", "1", "--max-queue", "1", env={"MINILLAMA_API_KEY": "sesame"})
    yield s
    assert s.stop() == 0


def test_a_full_queue_answers_429_with_retry_after(small_server):
    body = {"model": small_server.checkpoint, "prompt": "ROMEO:", "max_tokens": 300, "ignore_eos": True}
    headers = {"Authorization": "Bearer sesame"}

    def post(_):
        return httpx.post(f"{small_server.url}/v1/completions", json=body, headers=headers, timeout=120)

    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(post, range(6)))
    refused = [r for r in responses if r.status_code == 429]
    assert refused and all(r.headers["Retry-After"].isdigit() for r in refused)
    assert refused[0].json()["error"]["code"] == "queue_full"
    assert all(r.status_code in (200, 429) for r in responses)
    assert sum(r.status_code == 200 for r in responses) >= 2  # one running, one queued
    assert small_server.metrics()['minillama_requests_total{endpoint="/v1/completions",status="429"}'] == len(refused)


def test_the_api_key_is_required_and_health_stays_open(small_server):
    url = f"{small_server.url}/v1/models"
    assert httpx.get(url).status_code == 401
    wrong = httpx.get(url, headers={"Authorization": "Bearer sesame!"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url, headers={"Authorization": "Bearer sesame"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        small_server.client(api_key="wrong").completions.create(model=small_server.checkpoint, prompt="a",
                                                                 max_tokens=1)
    assert small_server.client(api_key="sesame").completions.create(model=small_server.checkpoint, prompt="a",
                                                                    max_tokens=1).choices
    assert httpx.get(f"{small_server.url}/health").status_code == 200
    assert "sesame" not in small_server.curl_line and "$MINILLAMA_API_KEY" in small_server.curl_line


def test_sigterm_drains_running_requests_and_exits_0(tiny_checkpoint):
    s = ServerProcess(tiny_checkpoint, "--grace", "60")
    body = {"model": s.checkpoint, "prompt": "ROMEO:", "max_tokens": 1000, "n": 4, "stream": True,
            "ignore_eos": True, "temperature": 0}
    events: list[str] = []
    first_chunk = threading.Event()

    def stream():
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    first_chunk.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first_chunk.wait(60)
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    refused = httpx.post(f"{s.url}/v1/completions", json={**body, "stream": False, "max_tokens": 1}, timeout=10)
    health = httpx.get(f"{s.url}/health", timeout=10)
    reader.join(120)
    assert s.proc.wait(timeout=60) == 0
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    assert health.status_code == 503
    assert events[-1] == "data: [DONE]"  # the running request finished
    finishes = [c["finish_reason"] for e in events[:-1] for c in json.loads(e[6:])["choices"] if c["finish_reason"]]
    assert finishes == ["length"] * 4


def engine_process_pids(pid: int) -> list[int]:
    """The server's children spawned by multiprocessing to run a function (not its resource tracker)."""
    children = [int(p) for task in Path(f"/proc/{pid}/task").iterdir() for p in (task / "children").read_text().split()]
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def test_an_engine_process_that_dies_fails_its_requests_and_health_but_not_the_server(tiny_checkpoint):
    """The engine runs in a child process (engine_link.py). Killed mid-request: the stream ends with an error
    event in OpenAI's shape, /health turns 503 naming the exit, new requests get 503, and SIGTERM still
    ends the server with 0."""
    s = ServerProcess(tiny_checkpoint)
    try:
        (engine_pid,) = engine_process_pids(s.proc.pid)
        assert complete(s, prompt="ROMEO:", max_tokens=4).status_code == 200  # it answers through the child
        body = {"model": s.checkpoint, "prompt": "ROMEO:", "max_tokens": CONTEXT, "ignore_eos": True,
                "stream": True}
        events = []
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=60) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: ") and not events:
                    os.kill(engine_pid, signal.SIGKILL)  # after the first chunk: the request is running
                events += [line[6:]] if line.startswith("data: ") else []
        assert json.loads(events[-2])["error"]["type"] == "server_error" and events[-1] == "[DONE]", events[-3:]
        deadline = time.monotonic() + 10
        while (health := httpx.get(f"{s.url}/health")).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health.status_code == 503 and "engine process exited" in health.json()["reason"], health.text
        assert complete(s, prompt="ROMEO:", max_tokens=4).status_code in (500, 503)
        assert s.proc.poll() is None  # the HTTP server is still up, saying what is wrong
    finally:
        assert s.stop() == 0


def test_health_reports_an_engine_loop_that_stopped_making_progress(tiny_model):
    """In-process: the engine's step blocks; /health turns 503 once the heartbeat is older than the limit, and
    200 again when the loop moves. An engine that raises is reported too."""
    from starlette.testclient import TestClient

    from minillama.infer import Engine, SamplingParams
    from minillama.serve import ChatFormatter, Scheduler, ServerState, build_app

    model, tokenizer = tiny_model
    engine = Engine(model, tokenizer, max_batch=2, max_len=32)
    release = threading.Event()
    real_step = engine.step

    def stuck_step():
        release.wait(30)
        return real_step()

    engine.step = stuck_step
    scheduler = Scheduler(engine, max_queue=4)
    scheduler.start()
    state = ServerState(scheduler, tokenizer, ChatFormatter(tokenizer), model_name="m", health_stall_s=0.3)
    http = TestClient(build_app(state))

    def health_becomes(status: int) -> dict:
        deadline = time.monotonic() + 10
        while (response := http.get("/health")).status_code != status and time.monotonic() < deadline:
            time.sleep(0.05)
        assert response.status_code == status, response.text
        return response.json()

    health_becomes(200)
    scheduler.submit([tokenizer.encode("a", bos=True)], [SamplingParams(max_new_tokens=2)], asyncio.new_event_loop())
    assert "no progress" in health_becomes(503)["reason"]
    release.set()
    health_becomes(200)

    def broken_step():
        raise RuntimeError("boom")

    engine.step = broken_step
    real_receive, reader_lags = scheduler.link.receive, threading.Event()

    def lagging_receive(timeout_s):  # the reader lags behind the engine's end: /health must still learn why it ended
        reader_lags.set()
        time.sleep(0.5)
        return real_receive(timeout_s)

    scheduler.link.receive = lagging_receive
    assert reader_lags.wait(5)
    scheduler.submit([tokenizer.encode("a", bos=True)], [SamplingParams(max_new_tokens=2)], asyncio.new_event_loop())
    assert "boom" in health_becomes(503)["reason"]
    scheduler.stop()


# --------------------------------------------------------------------------------------------------------------
# The chat template
# --------------------------------------------------------------------------------------------------------------
def test_a_checkpoint_chat_template_is_rendered_with_control_tokens(tiny_checkpoint, tiny_model, tmp_path):
    _, tokenizer = tiny_model
    config = json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
                               "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    chat = ChatFormatter.from_checkpoint(tmp_path, tokenizer)
    ids = chat.prompt_ids([{"role": "user", "content": "Hi </s> there"}])
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    # Control tokens from the template are ids; the same text inside a message is too (transformers does the same).
    assert ids[0] == bos and ids.count(eos) == 2
    assert tokenizer.decode(ids) == "[user] Hi  there[assistant]"
    plain = ChatFormatter.from_checkpoint(tiny_checkpoint, tokenizer)
    assert plain.template_name == "the plain chat template"
    assert plain.prompt_ids([{"role": "user", "content": "Hi"}]) == tokenizer.encode("user: Hi\nassistant:", bos=True)


# --------------------------------------------------------------------------------------------------------------
# The OpenAPI schema, fuzzed: no 5xx
# --------------------------------------------------------------------------------------------------------------
FUZZED_OPERATIONS = ["POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models", "GET /health",
                     "GET /metrics"]


@pytest.mark.parametrize("examples", [60, pytest.param(500, marks=pytest.mark.slow)])
@pytest.mark.parametrize("operation_name", FUZZED_OPERATIONS)
def test_fuzzed_requests_never_get_a_5xx(server, operation_name, examples):
    """schemathesis draws requests from the server's OpenAPI schema (valid and invalid ones; 60 per operation by
    default, 500 in the slow run); none may get a 5xx (nor may the server log a traceback: the fixture checks).
    Most bodies are brought in range (the served model's name, small max_tokens and n, no unsupported fields) so
    that they get past those checks to the rest."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in schema.get_all_operations())}
    assert set(operations) == set(FUZZED_OPERATIONS)

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=operations[operation_name].as_strategy())
    def fuzz(case):
        body = case.body
        if isinstance(body, dict) and "model" in body and hash(str(body)) % 4:  # 3 in 4 bodies get in range
            body["model"] = server.checkpoint
            for name, most in (("max_tokens", 16), ("max_completion_tokens", 16), ("n", 4)):
                if type(body.get(name)) is int and body[name] > most:
                    body[name] = body[name] % most + 1
            for unsupported in ("echo", "suffix", "best_of", "logit_bias", "tools"):
                body.pop(unsupported, None)
        case.call_and_validate(base_url=server.url, checks=[not_a_server_error], timeout=60)

    fuzz()
