"""Prometheus text exposition (format 0.0.4) for ``tuwen serve``'s ``/metrics``, without extra dependencies."""
from __future__ import annotations

import bisect
import threading
from typing import Callable

__all__ = ["Metrics"]

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _labels(d: dict[str, str]) -> str:
    if not d:
        return ""
    esc = {k: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in d.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(esc.items())) + "}"


class _Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(float(b) for b in buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.n += 1

    def lines(self, name: str, labels: dict[str, str]) -> list[str]:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f"{name}_bucket{_labels({**labels, 'le': f'{b:g}'})} {acc}")
        out.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {self.n}")
        out.append(f"{name}_sum{_labels(labels)} {self.sum:.6f}")
        out.append(f"{name}_count{_labels(labels)} {self.n}")
        return out


class Metrics:
    """Counters and histograms updated from the event loop and the batcher thread (one lock)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}          # (endpoint, status code) → count
        self.latency: dict[str, _Histogram] = {}                 # endpoint → seconds
        self.batch_rows = _Histogram(BATCH_BUCKETS)              # images per decode step
        self.step_seconds = 0.0
        self.cancelled = 0
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def gauge(self, name: str, help_text: str, fn: Callable[[], float]) -> None:
        self.gauges[name] = (help_text, fn)

    def request(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        with self._lock:
            key = (endpoint, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            if seconds is not None and status < 400:
                self.latency.setdefault(endpoint, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def step(self, rows: int, images: int, seconds: float) -> None:
        with self._lock:
            self.batch_rows.observe(images)
            self.step_seconds += seconds

    def cancel(self) -> None:
        with self._lock:
            self.cancelled += 1

    def render(self) -> str:
        with self._lock:
            out = ["# HELP tuwen_requests_total HTTP requests by endpoint and status code.",
                   "# TYPE tuwen_requests_total counter"]
            for (ep, code), n in sorted(self.requests.items()):
                out.append(f"tuwen_requests_total{_labels({'endpoint': ep, 'code': code})} {n}")
            out += ["# HELP tuwen_request_latency_seconds Latency of successful requests.",
                    "# TYPE tuwen_request_latency_seconds histogram"]
            for ep, h in sorted(self.latency.items()):
                out += h.lines("tuwen_request_latency_seconds", {"endpoint": ep})
            out += ["# HELP tuwen_batch_size Images decoded together in one decode step.",
                    "# TYPE tuwen_batch_size histogram"]
            out += self.batch_rows.lines("tuwen_batch_size", {})
            out += ["# HELP tuwen_decode_seconds_total Time spent in decode steps.",
                    "# TYPE tuwen_decode_seconds_total counter", f"tuwen_decode_seconds_total {self.step_seconds:.6f}",
                    "# HELP tuwen_cancelled_requests_total Requests dropped (client gone or timed out).",
                    "# TYPE tuwen_cancelled_requests_total counter", f"tuwen_cancelled_requests_total {self.cancelled}"]
        for name, (help_text, fn) in sorted(self.gauges.items()):
            kind = "counter" if name.endswith("_total") else "gauge"
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {float(fn()):g}"]
        return "\n".join(out) + "\n"
