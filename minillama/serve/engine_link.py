"""How the scheduler's thread reaches the engine: one call per loop (cancel these sequences, add these requests,
then step), answered with what happened (the new sequences' ids or why they were refused, the step's outputs, the
engine's stats). `run_call` is the one place that turns such a call into Engine methods; the two links differ only
in where it runs:

- `LocalEngine`: in this process, on the scheduler's thread (tests, and `minillama serve --engine-in-process`);
- `EngineProcess`: in a child process (spawned) that loads the checkpoint, compiles and then answers calls over a
  pipe; what `minillama serve` uses. vLLM's V1 engine core runs apart from its API server for the same reason.

Why a process. The HTTP side is Python (JSON, SSE framing, asyncio) and so is the glue of an engine step, and both
need the GIL: in one process every return from a torch kernel waits for the HTTP thread to let the GIL go (up to
the 5 ms switch interval). Measured on the 2-core CPU, 15m preset in bf16, compiled, 2 threads, 32 rows
(2026-12-03): the engine alone took 19.3 ms a step; beside a thread that spends 4 ms of pure Python per step it
took 26.5 ms, beside a process that spends 6 ms of every 20 busy 24.3 ms; inside the server under 32 streaming
clients, one process, 37.4 ms. A child process still shares the CPUs, but not the GIL.

The child ignores SIGINT and SIGTERM (the server process decides when to stop: draining first) and exits when the
pipe closes, so it never outlives the server. An error inside a step ends the child after it reports the error;
the scheduler then fails every request and /health turns 503.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import sys
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
    """One loop's work: drop `cancel` (sequence ids) before anything else, add `add` (per request: its prompts and
    their sampling parameters), then step if the engine has work."""

    cancel: list[int]
    add: list[tuple[list[list[int]], list[SamplingParams]]]


@dataclass
class EngineReply:
    added: list[list[int] | Exception]  # per request of the call: its sequence ids, or why it was refused
    outputs: list[StepOutput]  # the step's (empty when there was nothing to step)
    step_s: float | None  # how long the step took (None: no step)
    stats: EngineStats  # after the step
    has_work: bool  # whether the next loop should step even without new requests


def engine_info(engine: Engine) -> EngineInfo:
    return EngineInfo(engine.max_len, engine.max_batch, engine.cfg.vocab_size, engine.stats())


def run_call(engine: Engine, call: EngineCall) -> EngineReply:
    """Carry out a call on an engine (see EngineCall)."""
    for seq_id in call.cancel:
        engine.cancel(seq_id)
    added = [_add_request(engine, prompts, params) for prompts, params in call.add]
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


class LocalEngine:
    """The engine on the caller's thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.info = engine_info(engine)

    def call(self, call: EngineCall) -> EngineReply:
        return run_call(self.engine, call)

    def problem(self) -> str | None:
        return None

    def close(self) -> None:
        pass


class EngineProcess:
    """The engine in a spawned child process, built there from the server's config (module docstring). The
    constructor returns once the child has loaded the checkpoint (and compiled, with --compile); a checkpoint or
    setting the child cannot load raises MinillamaError with its message."""

    def __init__(self, config: ServeConfig) -> None:
        context = multiprocessing.get_context("spawn")  # not fork: torch's threads do not survive a fork
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=_child_main, args=(child_conn, config), name="minillama-engine",
                                        daemon=True)
        self._process.start()
        child_conn.close()
        try:
            kind, payload = self._receive()
        except EngineFailed as exc:
            self.close()
            raise MinillamaError(f"the engine process could not start: {exc}") from None
        if kind != "ready":
            self.close()
            raise MinillamaError(payload)
        self.info: EngineInfo = payload

    def call(self, call: EngineCall) -> EngineReply:
        try:
            self._conn.send(call)
        except OSError:
            raise EngineFailed(self._exit_message()) from None
        kind, payload = self._receive()
        if kind != "reply":
            raise EngineFailed(payload)
        return payload

    def problem(self) -> str | None:
        """Why the engine cannot answer (its process has exited), in one line; None while it runs."""
        return None if self._process.is_alive() else self._exit_message()

    def close(self, timeout_s: float = 10.0) -> None:
        """Ask the child to exit (it also does when the pipe closes); kill it if it has not after timeout_s."""
        try:
            self._conn.send(None)
        except OSError:
            pass
        self._conn.close()
        self._process.join(timeout_s)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    def _receive(self) -> tuple[str, Any]:
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            self._process.join(5)
            raise EngineFailed(self._exit_message()) from None

    def _exit_message(self) -> str:
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
    """The child: build the engine, say it is ready, then answer calls until told to stop or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        engine = build_engine(config)
    except MinillamaError as exc:
        conn.send(("error", str(exc)))
        return
    conn.send(("ready", engine_info(engine)))
    while True:
        try:
            call = conn.recv()
        except (EOFError, OSError):  # the server process is gone
            return
        if call is None:
            return
        try:
            reply = run_call(engine, call)
        except BaseException as exc:  # a bug in the engine: report it, then stop (the scheduler fails everything)
            log.exception("the engine stopped")
            conn.send(("failed", f"{type(exc).__name__}: {exc}"))
            sys.exit(1)
        conn.send(("reply", reply))


__all__ = ["EngineFailed", "EngineInfo", "EngineCall", "EngineReply", "LocalEngine", "EngineProcess", "run_call",
           "build_engine", "engine_info"]
