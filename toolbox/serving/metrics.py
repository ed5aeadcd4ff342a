"""Prometheus metrics of one server (a registry per app, so tests can run several in one process)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The server's counters, gauges and histograms (all named `toolbox_*`)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "toolbox_requests", "HTTP requests by endpoint, method and status code.",
            ["endpoint", "method", "status"], registry=r,
        )
        self.request_latency = Histogram(
            "toolbox_request_duration_seconds", "Time from request start to the last byte of the response.",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "toolbox_time_to_first_token_seconds", "Time from admission to a request's first generated token.",
            buckets=TTFT_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter("toolbox_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter("toolbox_generation_tokens", "Tokens generated.", registry=r)
        self.queue_depth = Gauge("toolbox_queue_depth", "Sequences admitted and waiting for a place in the batch.", registry=r)
        self.running = Gauge("toolbox_running_sequences", "Sequences in the running batch.", registry=r)
        self.batch_size = Histogram(
            "toolbox_batch_size", "Sequences advanced by one engine step.", buckets=BATCH_BUCKETS, registry=r,
        )
        self.rejected = Counter("toolbox_rejected_requests", "Requests refused because the queue was full.", registry=r)
        self.model_loaded = Gauge("toolbox_model_loaded", "1 once the model is loaded and serving.", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
