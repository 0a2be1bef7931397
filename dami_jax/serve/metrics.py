"""Prometheus metrics of the server, on a registry of its own (several apps can share a process)."""

from __future__ import annotations

import time

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               ProcessCollector, disable_created_metrics, generate_latest)

disable_created_metrics()  # no *_created series

_LAM_BUCKETS = tuple(round(0.1 * i, 1) for i in range(11))
_TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_OCC_BUCKETS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu seconds, open fds
        self.requests = Counter("dami_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("dami_prompt_tokens", "prompt tokens admitted", registry=r)
        self.completion_tokens = Counter("dami_completion_tokens", "tokens generated", registry=r)
        self.lam = Histogram("dami_lambda", "λ used per request", ["policy"], buckets=_LAM_BUCKETS, registry=r)
        self.queue_depth = Gauge("dami_queue_depth", "requests waiting for a row", registry=r)
        self.active_rows = Gauge("dami_active_rows", "rows (choices) in the last engine step", registry=r)
        self.pages_free = Gauge("dami_kv_pages_free", "KV pages free in the pool", registry=r)
        self.pages_used = Gauge("dami_kv_pages_used", "KV pages held by requests", registry=r)
        self.preemptions = Counter("dami_preemptions", "rows preempted for pages (recomputed later)", registry=r)
        self.ttft = Histogram("dami_time_to_first_token_seconds", "submit to first token",
                              buckets=_TIME_BUCKETS, registry=r)
        self.latency = Histogram("dami_request_latency_seconds", "whole request, by endpoint", ["endpoint"],
                                 buckets=_TIME_BUCKETS, registry=r)
        self.occupancy = Histogram("dami_batch_occupancy", "share of max_rows running per engine call",
                                   buckets=_OCC_BUCKETS, registry=r)
        self.steps = Counter("dami_engine_steps", "engine steps (a decode burst counts each of its steps)",
                             registry=r)
        self.rejected = Counter("dami_rejected", "requests refused by reason", ["reason"], registry=r)

    # Engine thread.
    def admitted(self, req, lam: float) -> None:
        self.prompt_tokens.inc(len(req.prompt))
        self.lam.labels(getattr(req.policy, "spec", None) or "explicit").observe(lam)

    def first_token(self, req) -> None:
        self.ttft.observe(req.t_first - req.t_submit)

    def step(self, rows: int, max_rows: int, steps: int) -> None:
        self.steps.inc(steps)
        self.active_rows.set(rows)
        self.occupancy.observe(rows / max_rows)

    def pages(self, free: int, used: int, preempted: int) -> None:
        self.pages_free.set(free)
        self.pages_used.set(used)
        self.preemptions.inc(preempted)

    def tokens(self, n: int) -> None:
        self.completion_tokens.inc(n)

    def queue(self, depth: int) -> None:
        self.queue_depth.set(depth)

    # HTTP side.
    def request(self, endpoint: str, status: int, started: float | None = None) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if started is not None:
            self.latency.labels(endpoint).observe(time.perf_counter() - started)

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
