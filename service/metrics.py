"""Prometheus metrics of the service, in a registry of their own (several servers in one process,
as the tests run them, do not collide). service/metrics_http.py serves them over HTTP."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 600, 1800)
_RATE_BUCKETS = (100, 300, 1e3, 3e3, 1e4, 3e4, 1e5, 3e5, 1e6)
_FRACTION_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


# prompt lengths: powers of two from 128 tokens to 2M
_PROMPT_TOKEN_BUCKETS = tuple(float(2**power) for power in range(7, 22))
MODEL_LABEL = "model_name"


class _RequestCounter:
    """The RPC counter with model_name filled in, so callers name only the method and the code."""

    def __init__(self, counter: Counter, model_name: str):
        self._counter = counter
        self._model_name = model_name

    def labels(self, method: str, code: str):
        return self._counter.labels(method, code, self._model_name)


class ServiceMetrics:
    """Every metric carries a `model_name` label (the served model's id), as serving dashboards
    expect; the histograms follow the usual names: time to first token, prompt length."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None):
        self.model_name = model_name
        self.registry = registry or CollectorRegistry()

        def one(kind, name: str, description: str, **options):
            return kind(name, description, [MODEL_LABEL], registry=self.registry, **options).labels(
                model_name
            )

        def latency(name: str, description: str):
            return one(Histogram, name, description, buckets=_LATENCY_BUCKETS)

        self.requests = _RequestCounter(
            Counter(
                "proxyprefill_requests",
                "RPCs by method and final status code",
                ["method", "code", MODEL_LABEL],
                registry=self.registry,
            ),
            model_name,
        )
        self.time_to_first_token = latency(
            "proxyprefill_time_to_first_token_seconds",
            "Prefill RPC accepted to its result (logits and KV) ready on the front end",
        )
        self.prefill_latency = latency(
            "proxyprefill_prefill_latency_seconds", "Prefill RPC latency, accepted to summary"
        )
        self.queue_latency = latency("proxyprefill_queue_seconds", "Time admitted requests wait for a worker")
        self.estimate_seconds = latency(
            "proxyprefill_estimate_seconds", "ProxyAttn block-score estimation time per prefill (worker side)"
        )
        self.prompt_length = one(
            Histogram,
            "proxyprefill_request_prompt_tokens",
            "Prompt length of finished prefills, in tokens",
            buckets=_PROMPT_TOKEN_BUCKETS,
        )
        self.tokens_per_second = one(
            Histogram,
            "proxyprefill_tokens_per_second",
            "Prompt tokens per second of worker prefill",
            buckets=_RATE_BUCKETS,
        )
        self.prompt_tokens = one(Counter, "proxyprefill_prompt_tokens", "Prompt tokens prefilled")
        self.sparsity = one(
            Histogram,
            "proxyprefill_sparsity",
            "Fraction of causal blocks skipped per prefill (mean over layers and heads)",
            buckets=_FRACTION_BUCKETS,
        )
        self.queue_depth = one(Gauge, "proxyprefill_queue_depth", "Admitted requests waiting for a worker")
        self.running = one(Gauge, "proxyprefill_running_requests", "Prefills running on workers")
        self.pending_tokens = one(
            Gauge, "proxyprefill_pending_tokens", "Prompt tokens admitted and not finished"
        )
        self.kv_bytes_held = one(Gauge, "proxyprefill_kv_bytes_held", "KV bytes held under leases")
        self.kv_handles = one(Gauge, "proxyprefill_kv_handles", "Live KV handles")
        self.kv_bytes_sent = one(Counter, "proxyprefill_kv_bytes_sent", "KV bytes streamed to clients")
        self.leases_expired = one(Counter, "proxyprefill_leases_expired", "Leases that expired unreleased")
        self.cancelled = one(
            Counter, "proxyprefill_prefills_cancelled", "Prefills stopped by cancellation or deadline"
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
