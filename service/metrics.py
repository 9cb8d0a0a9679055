"""Prometheus metrics of the service, in a registry of their own (several servers in one process,
as the tests run them, do not collide). service/metrics_http.py serves them over HTTP."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 600, 1800)
_RATE_BUCKETS = (100, 300, 1e3, 3e3, 1e4, 3e4, 1e5, 3e5, 1e6)
_FRACTION_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "proxyprefill_requests", "RPCs by method and final status code", ["method", "code"], registry=r
        )
        self.prefill_latency = Histogram(
            "proxyprefill_prefill_latency_seconds",
            "Prefill RPC latency, accepted to summary",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_latency = Histogram(
            "proxyprefill_queue_seconds",
            "Time admitted requests wait for a worker",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.estimate_seconds = Histogram(
            "proxyprefill_estimate_seconds",
            "ProxyAttn block-score estimation time per prefill (worker side)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens_per_second = Histogram(
            "proxyprefill_tokens_per_second",
            "Prompt tokens per second of worker prefill",
            buckets=_RATE_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("proxyprefill_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.sparsity = Histogram(
            "proxyprefill_sparsity",
            "Fraction of causal blocks skipped per prefill (mean over layers and heads)",
            buckets=_FRACTION_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "proxyprefill_queue_depth", "Admitted requests waiting for a worker", registry=r
        )
        self.running = Gauge("proxyprefill_running_requests", "Prefills running on workers", registry=r)
        self.pending_tokens = Gauge(
            "proxyprefill_pending_tokens", "Prompt tokens admitted and not finished", registry=r
        )
        self.kv_bytes_held = Gauge("proxyprefill_kv_bytes_held", "KV bytes held under leases", registry=r)
        self.kv_handles = Gauge("proxyprefill_kv_handles", "Live KV handles", registry=r)
        self.kv_bytes_sent = Counter("proxyprefill_kv_bytes_sent", "KV bytes streamed to clients", registry=r)
        self.leases_expired = Counter(
            "proxyprefill_leases_expired", "Leases that expired unreleased", registry=r
        )
        self.cancelled = Counter(
            "proxyprefill_prefills_cancelled", "Prefills stopped by cancellation or deadline", registry=r
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
