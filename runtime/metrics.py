"""Counters, gauges and histograms in the Prometheus text exposition format (version 0.0.4). No torch.

Small and thread-safe (the engine thread and the HTTP event loop both update them); written
here rather than taken from prometheus_client so the `serve` extra stays at the HTTP stack.

    reg = Registry()
    req = reg.counter("kvtrace_requests_total", "HTTP requests by status", ["status"])
    req.inc(status="200")
    reg.gauge("kvtrace_queue_depth", "requests waiting for a slot", fn=lambda: len(queue))
    ttft = reg.histogram("kvtrace_time_to_first_token_seconds", "...", buckets=(0.01, 0.1, 1))
    ttft.observe(0.03)
    text = reg.render()
"""
from __future__ import annotations

import math
import threading
from typing import Callable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# latency buckets, seconds: 1 ms .. 60 s
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _fmt(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    if float(v).is_integer():
        return str(int(v))
    return repr(float(v))


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_esc(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, kw) -> tuple[str, ...]:
        if set(kw) != set(self.label_names):
            raise ValueError(f"metric {self.name}: labels {sorted(kw)}, expected {list(self.label_names)}")
        return tuple(str(kw[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name, help, labels=()):
        super().__init__(name, help, labels)
        self._values: dict[tuple[str, ...], float] = {}
        if not self.label_names:
            self._values[()] = 0.0

    def inc(self, amount: float = 1.0, **labels) -> None:
        k = self._key(labels)
        with self._lock:
            self._values[k] = self._values.get(k, 0.0) + amount

    def value(self, **labels) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def lines(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.label_names, k)} {_fmt(v)}" for k, v in items]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name, help, fn: Callable[[], float]):
        super().__init__(name, help)
        self.fn = fn

    def lines(self) -> list[str]:
        return [f"{self.name} {_fmt(float(self.fn()))}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help, buckets: Sequence[float] = LATENCY_BUCKETS):
        super().__init__(name, help)
        self.bounds = tuple(sorted(float(b) for b in buckets)) + (math.inf,)
        self._counts = [0] * len(self.bounds)  # per bucket (not cumulative)
        self._sum = 0.0
        self._n = 0

    def observe(self, v: float) -> None:
        with self._lock:
            for i, b in enumerate(self.bounds):
                if v <= b:
                    self._counts[i] += 1
                    break
            self._sum += v
            self._n += 1

    @property
    def count(self) -> int:
        with self._lock:
            return self._n

    @property
    def mean(self) -> float:
        with self._lock:
            return self._sum / self._n if self._n else 0.0

    def lines(self) -> list[str]:
        with self._lock:
            counts, total, n = list(self._counts), self._sum, self._n
        out, acc = [], 0
        for b, c in zip(self.bounds, counts):
            acc += c
            out.append(f'{self.name}_bucket{{le="{_fmt(b)}"}} {acc}')
        out += [f"{self.name}_sum {_fmt(total)}", f"{self.name}_count {n}"]
        return out


class Registry:
    def __init__(self):
        self._metrics: list[_Metric] = []

    def _add(self, m):
        if any(x.name == m.name for x in self._metrics):
            raise ValueError(f"metric {m.name} registered twice")
        self._metrics.append(m)
        return m

    def counter(self, name, help, labels=()) -> Counter:
        return self._add(Counter(name, help, labels))

    def gauge(self, name, help, fn) -> Gauge:
        return self._add(Gauge(name, help, fn))

    def histogram(self, name, help, buckets=LATENCY_BUCKETS) -> Histogram:
        return self._add(Histogram(name, help, buckets))

    def render(self) -> str:
        lines = []
        for m in self._metrics:
            lines += m.header() + m.lines()
        return "\n".join(lines) + "\n"
