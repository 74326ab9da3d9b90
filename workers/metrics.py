"""Prometheus metrics of one worker process, served on its own port when one is set."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

BUCKETS_S = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.calls = Counter("ultralight_worker_calls", "Calls run, by outcome", ["outcome"],
                             registry=self.registry)
        self.run_seconds = Histogram("ultralight_worker_call_seconds", "Time from claim to "
                                     "reply", buckets=BUCKETS_S, registry=self.registry)
        self.running = Gauge("ultralight_worker_running", "Calls running now",
                             registry=self.registry)
        self.warm = Gauge("ultralight_worker_warm_sandboxes", "Sandboxes started ahead",
                          registry=self.registry)

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)
