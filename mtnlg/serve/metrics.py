"""What one server counts, in Prometheus' text format (``GET /metrics``).

    metrics = ServeMetrics(queue_depth=lambda: engine.waiting, occupancy=lambda: engine.occupancy)
    metrics.requests.labels("/v1/completions", "200").inc()
    body, content_type = metrics.render()

Each server has its own registry (two apps in one process count apart). The names:

* ``mtnlg_requests_total{endpoint, status}``: HTTP requests answered, by route and status;
* ``mtnlg_requests_in_flight``: API requests being answered now (probes and scrapes left out);
* ``mtnlg_queue_depth``: requests waiting for a slot in the running batch;
* ``mtnlg_batch_occupancy``: requests in the running batch now (at most ``--max-batch-size``);
* ``mtnlg_prompt_tokens_total{endpoint}``, ``mtnlg_completion_tokens_total{endpoint}``: tokens
  of the requests that completed (a prompt counts once however many choices it has);
* ``mtnlg_request_latency_seconds{endpoint}``: from the request's arrival to its last byte;
* ``mtnlg_time_to_first_token_seconds{endpoint}``: from arrival to the first generated token.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServeMetrics:
    def __init__(self, queue_depth: Callable[[], int], occupancy: Callable[[], int] = lambda: 0):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("mtnlg_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.in_flight = Gauge("mtnlg_requests_in_flight", "API requests being answered now", registry=r)
        self.queue_depth = Gauge("mtnlg_queue_depth", "Requests waiting for a slot in the running batch", registry=r)
        self.queue_depth.set_function(queue_depth)
        self.occupancy = Gauge("mtnlg_batch_occupancy", "Requests in the running batch now", registry=r)
        self.occupancy.set_function(occupancy)
        self.prompt_tokens = Counter("mtnlg_prompt_tokens", "Prompt tokens of completed requests", ["endpoint"],
                                     registry=r)
        self.completion_tokens = Counter("mtnlg_completion_tokens", "Generated tokens of completed requests",
                                         ["endpoint"], registry=r)
        self.latency = Histogram("mtnlg_request_latency_seconds", "From a request's arrival to its last byte",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("mtnlg_time_to_first_token_seconds", "From a request's arrival to its first token",
                              ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
