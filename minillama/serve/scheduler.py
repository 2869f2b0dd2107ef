"""The bridge between asyncio request handlers and the engine, which runs its own loop at the far end of a pipe (in
a child process, or on a thread: engine_link.py).

    scheduler = Scheduler(engine, max_queue=256, metrics=ServerMetrics())    # an Engine, or an EngineProcess
    scheduler.start()
    request = scheduler.submit(prompts, params, asyncio.get_running_loop())   # QueueFull, ShuttingDown
    async for index, out in request.outputs(): ...                            # StepOutputs of its sequences
    scheduler.cancel(request)                                                 # a client went away

Iteration-level batching is the engine's (engine.py): a sequence added between two steps starts its (chunked)
prefill in the next one, and a finished or cancelled sequence frees its row and KV memory at once. The scheduler
only moves requests in and outputs out:
- `submit` and `cancel` send their call at once (the engine applies it before its next step, so a cancellation
  takes effect within one decode step of the client leaving); a request cancelled before the engine has answered
  with its sequence ids is cancelled when that answer comes;
- a background thread reads the engine's replies: the requests it took (or refused: bad input it saw) and each
  step's outputs, which it hands to their requests' asyncio queues with `loop.call_soon_threadsafe` (one wake-up of
  each event loop per step);
- the queue is bounded: sequences sent and not answered yet plus those waiting for a cache row (the engine's)
  never exceed `max_queue`, and `submit` raises QueueFull beyond it (the server answers 429); KV-memory admission
  is the engine's `max_cached_tokens` budget;
- `heartbeat_s` is stamped at every reply, and every IDLE_WAIT_S while the engine is idle with nothing sent, so an
  engine stuck in a step, or gone, shows in `health()`;
- `drain()` stops new requests (ShuttingDown) and waits for the running ones, up to a grace period.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from minillama.errors import MinillamaError
from minillama.infer.engine import Engine, StepOutput
from minillama.infer.sampling import SamplingParams
from minillama.serve.engine_link import EngineCall, EngineFailed, EngineInfo, EngineProcess, EngineReply, EngineThread
from minillama.serve.metrics import ServerMetrics

log = logging.getLogger("minillama.serve")

IDLE_WAIT_S = 0.5  # the reply reader wakes this often when none comes, to stamp the heartbeat of an idle engine
ENGINE_GONE_WAIT_S = 2.0  # how long /health waits for the reader to learn why an ended engine loop ended


class QueueFull(MinillamaError):
    """The bounded queue has no room: try again later (HTTP 429)."""


class ShuttingDown(MinillamaError):
    """The server is draining or stopped and takes no new requests (HTTP 503)."""


class RequestCancelled(Exception):
    """The request was cancelled (its client went away) before it finished."""


@dataclass
class Accepted:
    """The engine took the request's sequences."""


@dataclass
class Output:
    index: int  # which of the request's sequences
    output: StepOutput


@dataclass
class Failed:
    error: Exception  # MinillamaError from the engine (bad input), ShuttingDown, RequestCancelled, EngineFailed


@dataclass(eq=False)
class ScheduledRequest:
    """One HTTP request's sequences (several for several prompts or n > 1) on their way through the engine."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted_s: float = field(default_factory=time.perf_counter)
    seq_ids: list[int] = field(default_factory=list)
    remaining: int = 0  # sequences not finished yet
    first_token_s: dict[int, float] = field(default_factory=dict)
    finished: bool = False  # every sequence finished, or cancelled, or failed
    answered: bool = False  # the engine said whether it took the request

    def post(self, item: Accepted | Output | Failed) -> None:
        """From the scheduler's threads: hand an item to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    async def accepted(self) -> None:
        """Wait until the engine took the sequences; raises what the engine refused them with."""
        item = await self.events.get()
        if isinstance(item, Failed):
            raise item.error

    async def outputs(self) -> AsyncIterator[tuple[int, StepOutput]]:
        """(sequence index, output) until every sequence has finished; raises if the request failed."""
        left = len(self.prompts)
        while left:
            item = await self.events.get()
            if isinstance(item, Failed):
                raise item.error
            if isinstance(item, Output):
                left -= item.output.finish_reason is not None
                yield item.index, item.output


def _deliver(items: list[tuple[ScheduledRequest, Output]]) -> None:
    """On a request's event loop: hand a step's outputs to their requests."""
    for request, item in items:
        request.events.put_nowait(item)


class Scheduler:
    """Talks to an engine's loop (see the module docstring). Thread-safe."""

    def __init__(self, engine: Engine | EngineProcess, max_queue: int = 256,
                 metrics: ServerMetrics | None = None) -> None:
        if max_queue < 1:
            raise MinillamaError(f"max_queue must be >= 1, got {max_queue}")
        self.link = engine if isinstance(engine, EngineProcess) else EngineThread(engine)
        self.info: EngineInfo = self.link.info
        self.max_queue = max_queue
        self.metrics = metrics or ServerMetrics()
        self._cond = threading.Condition()
        self._sent: list[ScheduledRequest] = []  # sent, not answered yet, in order of sending (under the lock)
        self._sent_sequences = 0
        self._engine_waiting = 0  # the engine's waiting sequences at its last reply (under the lock)
        self._engine_has_work = False  # as its last reply said (reader thread)
        self._active: set[ScheduledRequest] = set()  # taken by the engine, not finished (under the lock)
        self._by_seq: dict[int, tuple[ScheduledRequest, int]] = {}  # seq_id -> (request, index) of running ones
        self._busy = 0  # requests submitted and not finished (under the lock)
        self._accepting = True
        self._stop = False
        self.error: BaseException | None = None
        self.heartbeat_s = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="minillama-engine-replies", daemon=True)

    # ----------------------------------------------------------------------------------------------------------
    # From the HTTP side
    # ----------------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.metrics.set_engine(self.info.stats, 0)
        self._thread.start()

    def submit(self, prompts: Sequence[list[int]], params: Sequence[SamplingParams],
               loop: asyncio.AbstractEventLoop) -> ScheduledRequest:
        """Queue a request's sequences (one per prompt/params pair). Raises QueueFull when they do not fit in the
        queue and ShuttingDown once draining has begun; the engine's own refusals arrive as `accepted()`'s error."""
        request = ScheduledRequest(list(prompts), list(params), loop)
        with self._cond:
            if not self._accepting or self.error is not None:
                raise ShuttingDown("the server is shutting down and takes no new requests")
            queued = self._sent_sequences + self._engine_waiting
            if queued + len(request.prompts) > self.max_queue:
                raise QueueFull(f"the server is busy: {queued} sequences are queued (at most {self.max_queue}); "
                                "retry later")
            self._sent.append(request)
            self._sent_sequences += len(request.prompts)
            self._busy += 1
            self.link.send(EngineCall([], [(request.prompts, request.params)]))  # in the order of self._sent
        return request

    def cancel(self, request: ScheduledRequest) -> None:
        """Drop a request's sequences before the engine's next step; their rows and KV memory return to the pool.
        A finished request is left alone. Whoever still waits on the request gets RequestCancelled."""
        with self._cond:
            if request.finished:
                return
            request.post(Failed(RequestCancelled("the request was cancelled")))
            if request.answered:  # else when the engine answers (_answer)
                self.link.send(EngineCall(list(request.seq_ids), []))
                self._active.discard(request)
                for seq_id in request.seq_ids:
                    self._by_seq.pop(seq_id, None)
            self._retire(request)

    def drain(self, grace_s: float) -> bool:
        """Take no new requests; wait up to grace_s for the submitted ones to finish, then cancel what is left
        (its handlers get ShuttingDown). True when everything finished in time."""
        deadline = time.monotonic() + grace_s
        with self._cond:
            self._accepting = False
            while self._busy and self.error is None and time.monotonic() < deadline:
                self._cond.wait(timeout=min(0.1, max(deadline - time.monotonic(), 0)))
            drained = self._busy == 0
        if not drained:
            self._stop_engine(ShuttingDown("the server shut down before this request finished"))
        return drained

    def stop(self) -> None:
        """Stop the engine and the reply reader (requests still running get ShuttingDown)."""
        with self._cond:
            self._accepting = False
        self._stop_engine(ShuttingDown("the server shut down before this request finished"))

    @property
    def accepting(self) -> bool:
        return self._accepting

    def health(self, stall_s: float) -> str | None:
        """Why the engine is unhealthy, in one line; None when its loop is alive and made progress within stall_s."""
        problem = self.link.problem()
        if problem is not None and self._thread.is_alive() and self._thread is not threading.current_thread():
            # The engine's loop has ended; its last message (why) may still be in the pipe. The reply reader reads
            # it at once and then stops, so wait for that to name the error rather than just "ended".
            self._thread.join(ENGINE_GONE_WAIT_S)
        if self.error is not None:
            return f"the engine loop stopped on an error: {type(self.error).__name__}: {self.error}"
        if not self._thread.is_alive():
            return "the engine loop is not running"
        if problem is not None:
            return problem
        quiet_s = time.monotonic() - self.heartbeat_s
        if quiet_s > stall_s:
            return f"the engine loop has made no progress for {quiet_s:.0f} s (limit {stall_s:g} s)"
        return None

    # ----------------------------------------------------------------------------------------------------------
    # The reply reader
    # ----------------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop:
                reply = self.link.receive(IDLE_WAIT_S)
                if reply is None:  # nothing came: fine if the engine is idle and nothing is on its way to it
                    with self._cond:
                        if not (self._engine_has_work or self._sent):
                            self.heartbeat_s = time.monotonic()
                    continue
                self._engine_has_work = reply.has_work
                self._answer(reply)
                if reply.step_s is not None:
                    self.metrics.step.observe(reply.step_s)
                    self._dispatch(reply.outputs)
                with self._cond:
                    self._engine_waiting = reply.stats.waiting
                    self.metrics.set_engine(reply.stats, self._sent_sequences)
                self.heartbeat_s = time.monotonic()
        except BaseException as exc:  # a bug in the engine, or its process died: fail every request, unhealthy
            if self._stop:
                return
            log.exception("the engine loop stopped")
            with self._cond:
                self.error = exc
                for request in self._sent + list(self._active):
                    request.post(Failed(EngineFailed("the engine stopped on an internal error")))
                    self._retire(request)
                self._sent.clear()
                self._active.clear()
                self._cond.notify_all()

    def _answer(self, reply: EngineReply) -> None:
        """The engine's answers to the requests sent first: their sequence ids, or why it refused them (bad input
        it saw: nothing of the request stays queued)."""
        with self._cond:
            answered = self._sent[:len(reply.added)]
            del self._sent[:len(reply.added)]
            for request, result in zip(answered, reply.added):
                request.answered = True
                self._sent_sequences -= len(request.prompts)
                if isinstance(result, Exception):
                    request.post(Failed(result))
                    self._retire(request)
                    continue
                request.seq_ids = result
                request.remaining = len(result)
                if request.finished:  # cancelled while on its way
                    self.link.send(EngineCall(list(result), []))
                    continue
                for index, seq_id in enumerate(result):
                    self._by_seq[seq_id] = (request, index)
                self._active.add(request)
                self.metrics.prompt_tokens.inc(sum(len(p) for p in request.prompts))
                request.post(Accepted())

    def _dispatch(self, outputs: list[StepOutput]) -> None:
        now = time.perf_counter()
        delivered: dict[asyncio.AbstractEventLoop, list[tuple[ScheduledRequest, Output]]] = {}
        for out in outputs:
            entry = self._by_seq.get(out.seq_id)
            if entry is None:
                continue
            request, index = entry
            if out.finish_reason is not None:
                self._by_seq.pop(out.seq_id, None)
            if request.finished:  # cancelled: its outputs from before the cancellation reached the engine
                continue
            if index not in request.first_token_s and (out.token_ids or out.finish_reason):
                request.first_token_s[index] = now
                self.metrics.ttft.observe(now - request.submitted_s)
            self.metrics.generation_tokens.inc(len(out.token_ids))
            delivered.setdefault(request.loop, []).append((request, Output(index, out)))
            if out.finish_reason is not None:
                request.remaining -= 1
                tokens = len(out.completion.token_ids) if out.completion is not None else 0
                if tokens > 1:
                    self.metrics.tpot.observe((now - request.first_token_s[index]) / (tokens - 1))
                if request.remaining == 0:
                    with self._cond:
                        self._active.discard(request)
                        self._retire(request)
        # One wake-up of each event loop per step, not one per output: the HTTP thread then runs once per step
        # instead of interrupting the step's compute 32 times.
        for loop, items in delivered.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def _retire(self, request: ScheduledRequest) -> None:
        """A request leaves the scheduler (finished, cancelled or failed). Called with the lock held."""
        if not request.finished:
            request.finished = True
            self._busy -= 1
            self._cond.notify_all()

    def _stop_engine(self, error: Exception) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()  # within IDLE_WAIT_S, plus the reply it may be handling
        self.link.close()
        with self._cond:  # the engine is gone: whatever is left will not finish
            for request in self._sent + list(self._active):
                request.post(Failed(error))
                self._retire(request)
            self._sent.clear()
            self._active.clear()


__all__ = ["Scheduler", "ScheduledRequest", "QueueFull", "ShuttingDown", "EngineFailed", "RequestCancelled",
           "Accepted", "Output", "Failed"]
