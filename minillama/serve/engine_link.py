"""How the scheduler reaches the engine: calls (cancel these sequences, add these requests) go one way over a pipe,
replies (the new sequences' ids or why they were refused, a step's outputs, the engine's stats) come back the
other. At the far end `serve_engine` runs the engine's loop, the same code wherever it runs:

- `EngineProcess`: in a child process (spawned) that loads the checkpoint, compiles and then serves; what
  `minillama serve` uses. vLLM's V1 engine core runs apart from its API server for the same reason (below).
- `EngineThread`: on a thread of this process, over an Engine the caller built (tests, and
  `minillama serve --engine-in-process`).

The loop never waits for the server: while it has work it applies whatever calls have arrived, steps, sends the
reply and goes on to the next step; it blocks on the pipe only when idle. A call that arrives during a step is
applied before the next one, so a cancellation takes effect within one decode step of reaching the pipe. A reply
holds one entry of `added` per request that the calls applied since the last reply added, in the order sent.

Why a process. The HTTP side is Python (JSON, SSE framing, asyncio) and so is the glue of an engine step, and both
need the GIL: in one process every return from a torch kernel waits for the HTTP thread to let the GIL go (up to
the 5 ms switch interval). Measured on the 2-core CPU, 15m preset in bf16, compiled, 2 threads, 32 rows
(2026-12-03): the engine alone took 19.3 ms a step; beside a thread that spends 4 ms of pure Python per step it
took 26.5 ms, beside another process busy 6 ms of every 20 it took 24.3 ms. Inside the server under 32 streaming
clients (benchmarks/serve_load.py): on a thread of the server's process 50.8 ms, in a child process 24-29 ms
(benchmarks/RESULTS.md). A child process still shares the CPUs, but not the GIL.

The child ignores SIGINT and SIGTERM (the server decides when to stop: draining first) and exits when the pipe
closes, so it never outlives the server. An error inside a step ends the loop after it reports the error; the
scheduler then fails every request and /health turns 503.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from minillama.errors import MinillamaError
from minillama.infer.engine import Engine, EngineStats, StepOutput
from minillama.infer.sampling import SamplingParams

if TYPE_CHECKING:
    from minillama.serve.server import ServeConfig

log = logging.getLogger("minillama.serve")


class EngineFailed(Exception):
    """The engine stopped on an unexpected error, or could not take a request; the request cannot finish (500)."""


@dataclass
class EngineInfo:
    """What the HTTP side needs to know of the engine: limits for validating requests, and its first stats."""

    max_len: int  # positions per sequence
    max_batch: int  # sequences decoded together
    vocab_size: int
    stats: EngineStats  # when it was built (idle)


@dataclass
class EngineCall:
    """Drop `cancel` (sequence ids), then add `add` (per request: its prompts and their sampling parameters)."""

    cancel: list[int]
    add: list[tuple[list[list[int]], list[SamplingParams]]]


@dataclass
class EngineReply:
    added: list[list[int] | Exception]  # per request added since the last reply: its sequence ids, or why refused
    outputs: list[StepOutput]  # the step's (empty when there was nothing to step)
    step_s: float | None  # how long the step took (None: no step)
    stats: EngineStats  # after the step
    has_work: bool  # whether another reply follows without a new call


def engine_info(engine: Engine) -> EngineInfo:
    return EngineInfo(engine.max_len, engine.max_batch, engine.cfg.vocab_size, engine.stats())


def serve_engine(engine: Engine, conn: Any) -> None:
    """The engine's loop at the far end of the pipe (module docstring), until it receives None or the pipe
    closes. An error in a step is sent as ("failed", its message) and ends the loop."""
    while True:
        try:
            calls = [] if engine.has_work() else [conn.recv()]  # idle: wait for a call
            while conn.poll():
                calls.append(conn.recv())
        except (EOFError, OSError):  # the server's end is gone
            return
        if any(call is None for call in calls):  # the server is closing
            return
        try:
            message = ("reply", apply_calls(engine, calls))
        except BaseException as exc:  # a bug in the engine: report it, then stop (the scheduler fails everything)
            log.exception("the engine stopped")
            message = ("failed", f"{type(exc).__name__}: {exc}")
        try:
            conn.send(message)
        except OSError:  # the server's end is gone
            return
        if message[0] == "failed":
            return


def apply_calls(engine: Engine, calls: Sequence[EngineCall]) -> EngineReply:
    """Carry out calls on an engine, in order, then step if it has work."""
    added = []
    for call in calls:
        for seq_id in call.cancel:
            engine.cancel(seq_id)
        added += [_add_request(engine, prompts, params) for prompts, params in call.add]
    outputs: list[StepOutput] = []
    step_s = None
    if engine.has_work():
        started = time.perf_counter()
        outputs = engine.step()
        step_s = time.perf_counter() - started
    return EngineReply(added, outputs, step_s, engine.stats(), engine.has_work())


def _add_request(engine: Engine, prompts: Sequence[list[int]], params: Sequence[SamplingParams]
                 ) -> list[int] | Exception:
    """All of a request's sequences, or none of them (bad input the engine saw: MinillamaError)."""
    seq_ids: list[int] = []
    try:
        for prompt, sampling in zip(prompts, params):
            seq_ids.append(engine.add(prompt, sampling))
    except MinillamaError as exc:
        refusal: Exception = exc
    except Exception:  # noqa: BLE001 - logged; the request gets a 500, the engine goes on
        log.exception("adding a request to the engine failed")
        refusal = EngineFailed("the engine could not take this request")
    else:
        return seq_ids
    for seq_id in seq_ids:
        engine.cancel(seq_id)
    return refusal


class _Link:
    """The server's end of the pipe to the engine's loop, which `runner` (a thread or a process) runs: calls are
    sent by a thread of their own (a caller never blocks on a full pipe, even while the engine is busy with a long
    step), replies are read by the caller."""

    info: EngineInfo

    def __init__(self, conn: Any, runner: threading.Thread | multiprocessing.process.BaseProcess) -> None:
        self._conn, self._runner = conn, runner
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_all, name="minillama-engine-calls", daemon=True)
        self._sender.start()

    def send(self, call: EngineCall) -> None:
        """Hand a call to the engine (in order of sending); returns at once."""
        self._outbox.put(call)

    def receive(self, timeout_s: float) -> EngineReply | None:
        """The next reply, or None when none came within timeout_s; raises EngineFailed when the engine has failed
        or is gone."""
        try:
            if not self._conn.poll(timeout_s):
                return None
            kind, payload = self._conn.recv()
        except (EOFError, OSError):  # the far end closed: its loop has ended (a process: wait for its exit code)
            self._runner.join(1)
            raise EngineFailed(self._gone()) from None
        if kind != "reply":
            raise EngineFailed(payload)
        return payload

    def close(self, timeout_s: float = 10.0) -> None:
        """End the engine's loop (call it once nobody reads replies any more): tell it to, wait up to timeout_s for
        it (then kill a process), close the pipe."""
        self._outbox.put(None)
        self._sender.join(timeout_s)
        self._runner.join(timeout_s)
        if isinstance(self._runner, multiprocessing.process.BaseProcess) and self._runner.is_alive():
            self._runner.kill()
            self._runner.join()
        self._conn.close()

    def problem(self) -> str | None:
        """Why the engine cannot answer (its loop has ended), in one line; None while it runs."""
        return None if self._runner.is_alive() else self._gone()

    def _gone(self) -> str:
        return "the engine's loop has ended"

    def _send_all(self) -> None:
        while True:
            call = self._outbox.get()
            try:
                self._conn.send(call)
            except OSError:  # the far end is gone; receive() reports it
                return
            if call is None:
                return


class EngineThread(_Link):
    """The engine's loop on a thread of this process, over an engine the caller built."""

    def __init__(self, engine: Engine) -> None:
        self.info = engine_info(engine)
        ours, theirs = multiprocessing.Pipe()
        thread = threading.Thread(target=serve_engine, args=(engine, theirs), name="minillama-engine", daemon=True)
        thread.start()
        super().__init__(ours, thread)


class EngineProcess(_Link):
    """The engine's loop in a spawned child process that builds the engine from the server's config (module
    docstring). The constructor returns once the child has loaded the checkpoint (and compiled, with --compile);
    a checkpoint or setting the child cannot load raises MinillamaError with its message."""

    def __init__(self, config: ServeConfig) -> None:
        context = multiprocessing.get_context("spawn")  # not fork: torch's threads do not survive a fork
        ours, theirs = context.Pipe()
        self._process = context.Process(target=_child_main, args=(theirs, config), name="minillama-engine",
                                        daemon=True)
        self._process.start()
        theirs.close()
        try:
            kind, payload = ours.recv()
        except (EOFError, OSError):
            self._process.join(5)
            raise MinillamaError(f"the engine process could not start: {self._gone()}") from None
        if kind != "ready":
            self._process.join(5)
            raise MinillamaError(payload)
        self.info = payload
        super().__init__(ours, self._process)

    def _gone(self) -> str:
        return f"the engine process exited (exit code {self._process.exitcode})"


def build_engine(config: ServeConfig) -> Engine:
    """The engine `minillama serve` runs: loaded as `minillama generate` loads a checkpoint, with the server's
    limits, and compiled for every batch size before it takes traffic when compiling."""
    from minillama.infer.generate import load_inference_setup, set_threads

    set_threads(config.threads)  # the engine's intra-op threads
    setup = load_inference_setup(config.checkpoint, device=config.device, dtype=config.dtype,
                                 quantize=config.quantize, group_size=config.group_size, draft=config.draft,
                                 draft_tokens=config.draft_tokens)
    engine = setup.engine(max_batch=config.max_batch, max_len=config.max_context, compile=config.compile,
                          prefill_chunk=config.prefill_chunk, max_cached_tokens=config.max_cached_tokens)
    if engine.compiled:  # every batch size's graph before the first request, not while requests wait on it
        print("minillama: compiling the decode step (a graph per batch size up to --max-batch) ...", file=sys.stderr,
              flush=True)
        print(f"minillama: compiled in {engine.warm_up():.0f} s", file=sys.stderr, flush=True)
    return engine


def _child_main(conn: Any, config: ServeConfig) -> None:
    """The child process: build the engine, say it is ready (or why not), then serve it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        engine = build_engine(config)
    except MinillamaError as exc:
        conn.send(("error", str(exc)))
        return
    conn.send(("ready", engine_info(engine)))
    serve_engine(engine, conn)


__all__ = ["EngineFailed", "EngineInfo", "EngineCall", "EngineReply", "EngineThread", "EngineProcess",
           "serve_engine", "apply_calls", "build_engine", "engine_info"]
