"""Prometheus metrics in the text exposition format, with no dependency: counters, gauges, histograms.

Every metric is safe to update from the engine thread and the server's event loop at once.
"""

from __future__ import annotations

import bisect
import math
import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

Labels = tuple[tuple[str, str], ...]


def _labels_text(labels: Labels, extra: str = "") -> str:
    parts = [f'{name}="{_escape(value)}"' for name, value in labels] + ([extra] if extra else [])
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    """A monotonically increasing count, optionally split by labels."""

    kind = "counter"

    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help_text = name, help_text
        self._values: dict[Labels, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        """Add amount (>= 0) to the series of these labels."""
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        """The current value of one series (0 if never incremented)."""
        with self._lock:
            return self._values.get(tuple(sorted(labels.items())), 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            values = dict(self._values) or {(): 0.0}
        return [f"{self.name}{_labels_text(key)} {_number(value)}" for key, value in sorted(values.items())]


class Gauge(Counter):
    """A value that goes up and down."""

    kind = "gauge"

    def set(self, value: float) -> None:
        """Replace the (unlabelled) value."""
        with self._lock:
            self._values[()] = float(value)


class Histogram:
    """Observations counted into cumulative buckets, with their sum and count, optionally split by labels."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help_text, self.buckets = name, help_text, buckets
        self._series: dict[Labels, tuple[list[int], list[float]]] = {}  # per labels: bucket counts, [sum, count]
        self._lock = threading.Lock()

    def observe(self, value: float, **labels: str) -> None:
        """Count one observation."""
        key = tuple(sorted(labels.items()))
        with self._lock:
            counts, totals = self._series.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0, 0.0]))
            counts[bisect.bisect_left(self.buckets, value)] += 1
            totals[0] += value
            totals[1] += 1

    def count(self, **labels: str) -> int:
        """How many observations one series holds."""
        with self._lock:
            series = self._series.get(tuple(sorted(labels.items())))
            return 0 if series is None else int(series[1][1])

    def samples(self) -> list[str]:
        lines = []
        with self._lock:
            series = {key: (list(counts), list(totals)) for key, (counts, totals) in self._series.items()}
        for key, (counts, (total, n)) in sorted(series.items()):
            cumulative = 0
            for bound, count in zip((*self.buckets, math.inf), counts):
                cumulative += count
                le = 'le="' + _number(bound) + '"'
                lines.append(f"{self.name}_bucket{_labels_text(key, le)} {cumulative}")
            lines += [f"{self.name}_sum{_labels_text(key)} {_number(total)}", f"{self.name}_count{_labels_text(key)} {_number(n)}"]
        return lines


class Metrics:
    """Everything the server measures; `render` gives the /metrics page."""

    def __init__(self) -> None:
        self.requests = Counter("dynamoe_requests_total", "HTTP requests answered, by endpoint and status code")
        self.request_seconds = Histogram("dynamoe_request_seconds", "time from request to full answer, by endpoint",
                                         LATENCY_BUCKETS)
        self.first_token_seconds = Histogram("dynamoe_time_to_first_token_seconds",
                                             "time from request to the first generated token (streams)", LATENCY_BUCKETS)
        self.prompt_tokens = Counter("dynamoe_prompt_tokens_total", "prompt tokens run through the model")
        self.generated_tokens = Counter("dynamoe_generated_tokens_total", "tokens generated")
        self.experts = Counter("dynamoe_experts_total", "experts used, summed over positions (mean over MoE layers)")
        self.positions = Counter("dynamoe_positions_total", "positions the model ran for finished requests")
        self.batch_rows = Histogram("dynamoe_batch_rows", "rows per batch the engine ran", BATCH_BUCKETS)
        self.batch_seconds = Histogram("dynamoe_batch_seconds", "time to run one batch", LATENCY_BUCKETS)
        self.queue_depth = Gauge("dynamoe_queue_depth", "requests waiting for the engine")
        self.cancelled_rows = Counter("dynamoe_cancelled_rows_total", "rows stopped early: client gone or timed out")

    def mean_experts_per_token(self) -> float:
        """Experts per token over every finished request so far (0 before the first)."""
        positions = self.positions.value()
        return self.experts.value() / positions if positions else 0.0

    def render(self) -> str:
        """The Prometheus text exposition of every metric."""
        lines: list[str] = []
        for metric in vars(self).values():
            lines += [f"# HELP {metric.name} {metric.help_text}", f"# TYPE {metric.name} {metric.kind}", *metric.samples()]
        lines += ["# HELP dynamoe_mean_experts_per_token experts per token over finished requests",
                  "# TYPE dynamoe_mean_experts_per_token gauge",
                  f"dynamoe_mean_experts_per_token {_number(self.mean_experts_per_token())}"]
        return "\n".join(lines) + "\n"
