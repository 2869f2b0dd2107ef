"""The bridge between asyncio request handlers and the engine: one background thread owns the Engine and calls
`step()`; everything else talks to it through a lock-protected inbox.

    scheduler = Scheduler(engine, max_queue=256, metrics=ServerMetrics())
    scheduler.start()
    request = scheduler.submit(prompts, params, asyncio.get_running_loop())   # QueueFull, ShuttingDown
    async for index, out in request.outputs(): ...                            # StepOutputs of its sequences
    scheduler.cancel(request)                                                 # a client went away

Iteration-level batching is the engine's (engine.py): a sequence added between two steps starts its (chunked)
prefill in the next one, and a finished or cancelled sequence frees its row and KV memory at once. This thread
only moves requests in and outputs out:
- each loop takes the inbox (new requests, cancellations) under the lock, adds and cancels in the engine, then
  runs one step and hands each output to its request's asyncio queue with `loop.call_soon_threadsafe`; so a
  cancellation takes effect before the next step, within one decode step of the client leaving;
- the queue is bounded: sequences waiting for a cache row (the engine's) plus those in the inbox never exceed
  `max_queue`, and `submit` raises QueueFull beyond it (the server answers 429); KV-memory admission is the
  engine's `max_cached_tokens` budget;
- `heartbeat_s` is stamped every loop (at least every IDLE_WAIT_S when idle), so a loop stuck in a step or a
  thread that died shows in `health()`;
- `drain()` stops new requests (ShuttingDown) and waits for the running ones, up to a grace period.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from minillama.errors import MinillamaError
from minillama.infer.engine import Engine, StepOutput
from minillama.infer.sampling import SamplingParams
from minillama.serve.metrics import ServerMetrics

log = logging.getLogger("minillama.serve")

IDLE_WAIT_S = 0.5  # an idle loop wakes this often to stamp its heartbeat


class QueueFull(MinillamaError):
    """The bounded queue has no room: try again later (HTTP 429)."""


class ShuttingDown(MinillamaError):
    """The server is draining or stopped and takes no new requests (HTTP 503)."""


class RequestCancelled(Exception):
    """The request was cancelled (its client went away) before it finished."""


class EngineFailed(Exception):
    """The engine thread stopped on an unexpected error; the request cannot finish (HTTP 500)."""


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

    def post(self, item: Accepted | Output | Failed) -> None:
        """From the engine thread: hand an item to the request's event loop."""
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
    """Owns an Engine on a background thread (see the module docstring). Thread-safe."""

    def __init__(self, engine: Engine, max_queue: int = 256, metrics: ServerMetrics | None = None) -> None:
        if max_queue < 1:
            raise MinillamaError(f"max_queue must be >= 1, got {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics or ServerMetrics()
        self._cond = threading.Condition()
        self._inbox: deque[ScheduledRequest] = deque()
        self._inbox_sequences = 0
        self._cancels: list[ScheduledRequest] = []
        self._engine_waiting = 0  # the engine's waiting sequences after the last step (under the lock)
        self._active: set[ScheduledRequest] = set()  # in the engine, not finished (engine thread only)
        self._by_seq: dict[int, tuple[ScheduledRequest, int]] = {}  # seq_id -> (request, index)
        self._busy = 0  # requests submitted and not finished (under the lock)
        self._accepting = True
        self._stop = False
        self.error: BaseException | None = None
        self.heartbeat_s = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="minillama-engine", daemon=True)

    # ----------------------------------------------------------------------------------------------------------
    # From the HTTP side
    # ----------------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.metrics.set_engine(self.engine.stats(), 0)
        self._thread.start()

    def submit(self, prompts: Sequence[list[int]], params: Sequence[SamplingParams],
               loop: asyncio.AbstractEventLoop) -> ScheduledRequest:
        """Queue a request's sequences (one per prompt/params pair). Raises QueueFull when they do not fit in the
        queue and ShuttingDown once draining has begun; the engine's own refusals arrive as `accepted()`'s error."""
        request = ScheduledRequest(list(prompts), list(params), loop)
        with self._cond:
            if not self._accepting or self.error is not None:
                raise ShuttingDown("the server is shutting down and takes no new requests")
            queued = self._inbox_sequences + self._engine_waiting
            if queued + len(request.prompts) > self.max_queue:
                raise QueueFull(f"the server is busy: {queued} sequences are queued (at most {self.max_queue}); "
                                "retry later")
            self._inbox.append(request)
            self._inbox_sequences += len(request.prompts)
            self._busy += 1
            self._cond.notify()
        return request

    def cancel(self, request: ScheduledRequest) -> None:
        """Drop a request's sequences before the next step; their rows and KV memory return to the pool. A
        finished request is left alone. Whoever still waits on the request gets RequestCancelled."""
        with self._cond:
            if request.finished:
                return
            request.post(Failed(RequestCancelled("the request was cancelled")))
            if request in self._inbox:
                self._inbox.remove(request)
                self._inbox_sequences -= len(request.prompts)
                self._retire(request)
            else:
                self._cancels.append(request)
            self._cond.notify()

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
        """Stop the engine thread (requests still running get ShuttingDown)."""
        with self._cond:
            self._accepting = False
        self._stop_engine(ShuttingDown("the server shut down before this request finished"))

    @property
    def accepting(self) -> bool:
        return self._accepting

    def health(self, stall_s: float) -> str | None:
        """Why the engine is unhealthy, in one line; None when its loop is alive and made progress within stall_s."""
        if self.error is not None:
            return f"the engine loop stopped on an error: {type(self.error).__name__}: {self.error}"
        if not self._thread.is_alive():
            return "the engine loop is not running"
        quiet_s = time.monotonic() - self.heartbeat_s
        if quiet_s > stall_s:
            return f"the engine loop has made no progress for {quiet_s:.0f} s (limit {stall_s:g} s)"
        return None

    # ----------------------------------------------------------------------------------------------------------
    # The engine thread
    # ----------------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._take_inbox():
                if self.engine.has_work():
                    started = time.perf_counter()
                    outputs = self.engine.step()
                    self.metrics.step.observe(time.perf_counter() - started)
                    self._dispatch(outputs)
                stats = self.engine.stats()
                with self._cond:
                    self._engine_waiting = stats.waiting
                    self.metrics.set_engine(stats, self._inbox_sequences)
                self.heartbeat_s = time.monotonic()
        except BaseException as exc:  # a bug in the engine: fail every request, report unhealthy
            log.exception("the engine loop stopped")
            with self._cond:
                self.error = exc
                failed = list(self._inbox) + list(self._active)
                self._inbox.clear()
                for request in failed:
                    request.post(Failed(EngineFailed("the engine stopped on an internal error")))
                    self._retire(request)
                self._cond.notify_all()

    def _take_inbox(self) -> bool:
        """Wait for work, then apply cancellations and add new requests to the engine. False: stop the loop."""
        with self._cond:
            while not (self._stop or self._inbox or self._cancels or self.engine.has_work()):
                self.heartbeat_s = time.monotonic()
                self._cond.wait(timeout=IDLE_WAIT_S)
            if self._stop:
                return False
            for request in self._cancels:
                for seq_id in request.seq_ids:
                    if self.engine.cancel(seq_id):
                        self._by_seq.pop(seq_id, None)
                self._active.discard(request)
                self._retire(request)
            self._cancels.clear()
            while self._inbox:
                self._add(self._inbox.popleft())
            self._inbox_sequences = 0
            self._engine_waiting = self.engine.stats().waiting
        return True

    def _add(self, request: ScheduledRequest) -> None:
        try:
            request.seq_ids = [self.engine.add(p, q) for p, q in zip(request.prompts, request.params)]
        except MinillamaError as exc:  # bad input the engine saw: nothing of the request stays queued
            for seq_id in request.seq_ids:
                self.engine.cancel(seq_id)
            request.post(Failed(exc))
            self._retire(request)
            return
        except Exception:  # noqa: BLE001 - logged; the request gets a 500, the loop goes on
            log.exception("adding a request to the engine failed")
            request.post(Failed(EngineFailed("the engine could not take this request")))
            self._retire(request)
            return
        request.remaining = len(request.seq_ids)
        for index, seq_id in enumerate(request.seq_ids):
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
            if index not in request.first_token_s and (out.token_ids or out.finish_reason):
                request.first_token_s[index] = now
                self.metrics.ttft.observe(now - request.submitted_s)
            self.metrics.generation_tokens.inc(len(out.token_ids))
            delivered.setdefault(request.loop, []).append((request, Output(index, out)))
            if out.finish_reason is not None:
                del self._by_seq[out.seq_id]
                request.remaining -= 1
                tokens = len(out.completion.token_ids) if out.completion is not None else 0
                if tokens > 1:
                    self.metrics.tpot.observe((now - request.first_token_s[index]) / (tokens - 1))
                if request.remaining == 0:
                    self._active.discard(request)
                    with self._cond:
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
            self._thread.join()
        with self._cond:  # the thread is gone: whatever is left will not finish
            for request in list(self._inbox) + list(self._active):
                request.post(Failed(error))
                self._retire(request)
            self._inbox.clear()
            self._active.clear()


__all__ = ["Scheduler", "ScheduledRequest", "QueueFull", "ShuttingDown", "EngineFailed", "RequestCancelled",
           "Accepted", "Output", "Failed"]
