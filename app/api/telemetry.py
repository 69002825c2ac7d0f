"""Prometheus metrics, in a registry owned by one app instance so several apps (tests) never collide."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def batch_buckets(max_batch_size: int) -> tuple[float, ...]:
    """Powers of two up to the configured maximum, so the top bucket means "the batch was full"."""
    bounds = [1]
    while bounds[-1] < max_batch_size:
        bounds.append(min(bounds[-1] * 2, max_batch_size))
    return tuple(float(bound) for bound in bounds)


class Metrics:
    """The service's instruments; the request middleware and the batcher record into them."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_batch_size: int) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cxr_http_requests",
            "HTTP requests by route and status.",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cxr_http_request_duration_seconds",
            "Wall time from request start to response end.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "cxr_batch_size", "Images per forward pass.", buckets=batch_buckets(max_batch_size), registry=self.registry
        )
        self.inference_seconds = Histogram(
            "cxr_inference_duration_seconds",
            "Time of one batched forward pass, host to host.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge("cxr_queue_depth", "Images waiting for a forward pass.", registry=self.registry)
        self.batch_size_limit = Gauge(
            "cxr_batch_size_limit",
            "Images per forward pass at most, as chosen at startup (measured on the CPU, configured on a GPU).",
            registry=self.registry,
        )
        self.backend = Gauge(
            "cxr_backend_info",
            "The runtime and precision serving (value 1).",
            ["backend", "precision"],
            registry=self.registry,
        )
        self.predictions = Counter(
            "cxr_predictions", "Predictions returned, by label.", ["label"], registry=self.registry
        )
        self.rejected_images = Counter(
            "cxr_rejected_images",
            "Uploads that could not be used as images, by error code.",
            ["code"],
            registry=self.registry,
        )

        self.guard_failures = Counter(
            "cxr_input_guard_failures",
            "Images the input guard failed, by what was done: refused (reject mode) or flagged (flag mode).",
            ["action"],
            registry=self.registry,
        )
        self.decoder_replacements = Counter(
            "cxr_decoder_replacements",
            "Decoder worker processes replaced, by reason "
            "(crash, timeout, out_of_memory, large_decode, start_failed, died_idle).",
            ["reason"],
            registry=self.registry,
        )

    def record_decoder_replacement(self, reason: str) -> None:
        self.decoder_replacements.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
