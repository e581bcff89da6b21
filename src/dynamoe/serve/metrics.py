"""The server's Prometheus metrics, kept by prometheus_client in a registry of their own (one per server).

prometheus_client's metrics are safe to update from the engine thread and the event loop at once.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Everything the server measures; `render` gives the /metrics page."""

    content_type = CONTENT_TYPE_PLAIN_0_0_4  # of the page: the text format Prometheus scrapes

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter("dynamoe_requests_total", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=registry)
        self.request_seconds = Histogram("dynamoe_request_seconds", "time from request to full answer, by endpoint",
                                         ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)
        self.first_token_seconds = Histogram("dynamoe_time_to_first_token_seconds",
                                             "time from request to the first generated token (streams)",
                                             buckets=LATENCY_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("dynamoe_prompt_tokens_total", "prompt tokens run through the model", registry=registry)
        self.generated_tokens = Counter("dynamoe_generated_tokens_total", "tokens generated", registry=registry)
        self.experts = Counter("dynamoe_experts_total", "experts used, summed over positions (mean over MoE layers)",
                               registry=registry)
        self.positions = Counter("dynamoe_positions_total", "positions the model ran for finished requests",
                                 registry=registry)
        self.batch_rows = Histogram("dynamoe_batch_rows", "rows in each decode step the engine ran",
                                    buckets=BATCH_BUCKETS, registry=registry)
        self.batch_seconds = Histogram("dynamoe_batch_seconds", "time of each engine step (a prefill chunk, then a "
                                       "decode step)", buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_depth = Gauge("dynamoe_queue_depth", "requests waiting for the engine", registry=registry)
        self.cancelled_rows = Counter("dynamoe_cancelled_rows_total", "rows stopped early: client gone or timed out",
                                      registry=registry)
        mean_experts = Gauge("dynamoe_mean_experts_per_token", "experts per token over finished requests", registry=registry)
        mean_experts.set_function(self.mean_experts_per_token)

    def value(self, name: str, **labels: str) -> float:
        """The current value of one sample, e.g. value("dynamoe_requests_total", endpoint=..., status=...); 0 if absent."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def mean_experts_per_token(self) -> float:
        """Experts per token over every finished request so far (0 before the first)."""
        positions = self.value("dynamoe_positions_total")
        return self.value("dynamoe_experts_total") / positions if positions else 0.0

    def render(self) -> str:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry).decode()
