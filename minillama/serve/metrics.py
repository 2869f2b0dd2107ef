"""The server's Prometheus metrics, in a registry of its own (several servers in one process, as in tests, do not
share counters). The scheduler's reply reader sets the gauges after every engine step and observes the latencies;
the HTTP layer counts requests by status.

    minillama_requests_total{endpoint, status}     HTTP requests answered, by route and status code
    minillama_prompt_tokens_total                  prompt tokens of accepted sequences
    minillama_generation_tokens_total              tokens generated
    minillama_queue_depth                          sequences waiting for a cache row (the bounded queue)
    minillama_running_sequences                    sequences in the running batch (decoding or prefilling)
    minillama_kv_cache_bytes_allocated / _in_use / _free, minillama_kv_cache_tokens_reserved
    minillama_time_to_first_token_seconds          request accepted -> its first token
    minillama_time_per_output_token_seconds        per sequence: (end - first token) / (tokens - 1)
    minillama_engine_step_seconds                  one scheduling iteration (prefill chunk + decode)
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from minillama.infer.engine import EngineStats

# Seconds; TTFT spans a fast GPU's milliseconds to a queued CPU request's tens of seconds.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("minillama_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("minillama_prompt_tokens", "prompt tokens of accepted sequences", registry=r)
        self.generation_tokens = Counter("minillama_generation_tokens", "tokens generated", registry=r)
        self.queue_depth = Gauge("minillama_queue_depth", "sequences waiting for a cache row", registry=r)
        self.running = Gauge("minillama_running_sequences", "sequences in the running batch", registry=r)
        self.kv_allocated = Gauge("minillama_kv_cache_bytes_allocated", "the preallocated KV cache", registry=r)
        self.kv_in_use = Gauge("minillama_kv_cache_bytes_in_use", "KV cache holding live tokens", registry=r)
        self.kv_free = Gauge("minillama_kv_cache_bytes_free", "KV cache not holding live tokens", registry=r)
        self.kv_reserved = Gauge("minillama_kv_cache_tokens_reserved",
                                 "tokens admitted sequences may grow to (the admission budget's use)", registry=r)
        self.ttft = Histogram("minillama_time_to_first_token_seconds", "request accepted to its first token",
                              buckets=LATENCY_BUCKETS_S, registry=r)
        self.tpot = Histogram("minillama_time_per_output_token_seconds", "decode time per token after the first",
                              buckets=TOKEN_BUCKETS_S, registry=r)
        self.step = Histogram("minillama_engine_step_seconds", "one engine step", buckets=LATENCY_BUCKETS_S,
                              registry=r)

    def set_engine(self, stats: EngineStats, queued: int) -> None:
        """Gauges from the engine's stats; `queued` adds the sequences not handed to the engine yet."""
        self.queue_depth.set(stats.waiting + queued)
        self.running.set(stats.running + stats.prefilling)
        self.kv_allocated.set(stats.kv_bytes_allocated)
        self.kv_in_use.set(stats.kv_bytes_in_use)
        self.kv_free.set(stats.kv_bytes_allocated - stats.kv_bytes_in_use)
        self.kv_reserved.set(stats.kv_tokens_reserved)

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["ServerMetrics"]
