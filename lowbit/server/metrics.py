"""Prometheus metrics (prometheus_client), one registry per app so several apps can coexist."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Seconds; first tokens include queueing and prefill, so their buckets reach further.
_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.4, 0.75, 1, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)


class Metrics:
    """Counters, gauges and latency histograms of one server."""

    def __init__(self, model_name: str):
        self.registry = reg = CollectorRegistry()
        labels = {"model_name": model_name}
        mk = lambda cls, name, doc, **kw: cls(
            f"lowbit_{name}", doc, labelnames=list(labels) + kw.pop("extra", []),
            registry=reg, **kw,
        )  # fmt: skip
        self._requests = mk(Counter, "requests", "HTTP requests by route and status",
                            extra=["route", "status"])  # fmt: skip
        self.prompt_tokens = mk(Counter, "prompt_tokens", "Prompt tokens processed").labels(
            **labels
        )
        self.generation_tokens = mk(Counter, "generation_tokens", "Tokens generated").labels(
            **labels
        )
        self.running = mk(Gauge, "num_running_reqs", "Sequences running").labels(**labels)
        self.queued = mk(Gauge, "num_queue_reqs", "Sequences waiting").labels(**labels)
        self.kv_usage = mk(Gauge, "kv_cache_usage", "Fraction of KV blocks in use").labels(**labels)
        self.kv_used = mk(Gauge, "kv_blocks_used", "KV blocks in use").labels(**labels)
        self.kv_total = mk(Gauge, "kv_blocks_total", "KV blocks in the cache").labels(**labels)
        self.steps = mk(Counter, "engine_steps", "Engine steps (forward passes)").labels(**labels)
        self.step_seconds = mk(
            Counter, "engine_step_seconds", "Time spent in engine.step()"
        ).labels(**labels)
        self.preemptions = mk(Gauge, "preemptions", "Preemptions so far").labels(**labels)
        self.ttft = mk(Histogram, "time_to_first_token_seconds", "Time to first token",
                       buckets=_TTFT_BUCKETS).labels(**labels)  # fmt: skip
        self.itl = mk(Histogram, "inter_token_latency_seconds", "Time between tokens",
                      buckets=_ITL_BUCKETS).labels(**labels)  # fmt: skip
        self.e2e = mk(Histogram, "e2e_request_latency_seconds", "Request latency",
                      buckets=_E2E_BUCKETS).labels(**labels)  # fmt: skip
        self._labels = labels

    def request(self, route: str, status: int) -> None:
        """Count one finished HTTP request."""
        self._requests.labels(**self._labels, route=route, status=str(status)).inc()

    def observe_engine(self, stats: dict) -> None:
        """Copy the engine's queue and KV-cache occupancy into the gauges."""
        self.running.set(stats["running"])
        self.queued.set(stats["waiting"])
        self.kv_usage.set(stats["kv_usage"])
        self.kv_used.set(stats["kv_blocks_used"])
        self.kv_total.set(stats["kv_blocks_total"])
        self.preemptions.set(stats["preemptions"])

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
