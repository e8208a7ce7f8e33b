"""Prometheus metrics of one server (its own registry, so several servers in one process, as in
tests, do not collide). Engine gauges are read from the engine's stats at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from glmv.engine.async_engine import EngineStats

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats], queue_len: Callable[[], int]) -> None:
        self._stats = stats
        self._queue_len = queue_len

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        gauges = (
            ("glmv_num_requests_running", "requests holding KV blocks", s.num_running),
            ("glmv_num_requests_waiting", "requests queued in the scheduler", s.num_waiting),
            ("glmv_num_requests_in_flight", "requests accepted and not yet finished",
             self._queue_len()),
            ("glmv_kv_cache_blocks_used", "KV-cache blocks held by requests",
             s.num_kv_blocks_used),
            ("glmv_kv_cache_blocks_total", "KV-cache blocks", s.num_kv_blocks),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = (
            ("glmv_encoder_cache_hits", "images/videos served from the vision-encoder cache",
             s.encoder_cache_hits),
            ("glmv_encoder_cache_misses", "images/videos that ran through the vision encoder",
             s.encoder_cache_misses),
            ("glmv_engine_steps", "engine steps run", s.num_steps),
            ("glmv_engine_step_failures", "engine steps that raised", s.step_failures),
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    """Counters and histograms the serving code updates, plus the engine's gauges."""

    def __init__(self, stats: Callable[[], EngineStats], queue_len: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("glmv_http_requests", "HTTP requests by path and status",
                                     ["path", "status"], registry=r)
        self.requests_finished = Counter(
            "glmv_requests_finished", "generation requests by finish reason", ["reason"],
            registry=r)
        self.prompt_tokens = Counter("glmv_prompt_tokens", "prompt tokens (visual included)",
                                     registry=r)
        self.visual_tokens = Counter("glmv_visual_tokens", "prompt tokens filled by media",
                                     ["modality"], registry=r)
        self.cached_tokens = Counter("glmv_cached_prompt_tokens",
                                     "prompt tokens served by the prefix cache", registry=r)
        self.generation_tokens = Counter("glmv_generation_tokens", "generated tokens",
                                         registry=r)
        self.ttft = Histogram("glmv_time_to_first_token_seconds",
                              "request arrival to first generated token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.tpot = Histogram("glmv_time_per_output_token_seconds",
                              "mean time between generated tokens of a request", registry=r,
                              buckets=_TOKEN_BUCKETS)
        self.e2e = Histogram("glmv_e2e_request_latency_seconds", "request arrival to finish",
                             registry=r, buckets=_LATENCY_BUCKETS)
        self.media_seconds = Histogram(
            "glmv_media_processing_seconds",
            "fetch, decode and preprocessing of one request's media and prompt", registry=r,
            buckets=_LATENCY_BUCKETS)
        r.register(_EngineCollector(stats, queue_len))

    def render(self) -> bytes:
        return generate_latest(self.registry)
