"""The gateway's Prometheus metrics, in a registry of its own.

Its own ``CollectorRegistry`` rather than the global one: a test (or a process) may run
several gateways, and each must count only its own traffic. Label values come from closed
sets (op names, error codes, message kinds), never from client input, so a client cannot
blow up the number of series.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily


__all__ = ["CONTENT_TYPE", "BrokerClientCollector", "GatewayMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2, 5)


class GatewayMetrics:
    """Counters, gauges and one latency histogram; :meth:`render` is the /metrics body."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "lipsync_gateway_requests",
            "Client requests answered, by op and outcome (ok or an error code).",
            ["op", "outcome"],
            registry=r,
        )
        self.latency = Histogram(
            "lipsync_gateway_request_seconds",
            "Time from a request's arrival to its answer being queued for the client.",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "lipsync_gateway_in_flight", "Requests waiting for the broker.", registry=r
        )
        self.connections = Gauge(
            "lipsync_gateway_connections", "Open WebSocket connections.", registry=r
        )
        self.connections_total = Counter(
            "lipsync_gateway_connections_accepted", "WebSocket connections accepted.", registry=r
        )
        self.refused = Counter(
            "lipsync_gateway_handshakes_refused",
            "WebSocket handshakes refused, by reason (origin, token, shutting_down).",
            ["reason"],
            registry=r,
        )
        self.dropped = Counter(
            "lipsync_gateway_dropped_frames",
            "Answers whose image was given up because the client did not read it in time, "
            "by kind: sent as the layout's error shape in the same slot (a, c, d), or left "
            "out (tagged stream frames, whose sequence numbers show the gap).",
            ["kind"],
            registry=r,
        )
        self.overflow_closes = Counter(
            "lipsync_gateway_overflow_closes",
            "Connections closed (1008) for holding more undelivered answers than allowed: "
            "a client pipelining without limit against a stall, or not reading at all.",
            registry=r,
        )
        self.reordered = Counter(
            "lipsync_gateway_reordered_answers",
            "Layout A answers that finished before an earlier request's and were held back.",
            registry=r,
        )
        self.bytes_out = Counter(
            "lipsync_gateway_bytes_out", "Bytes of WebSocket messages sent.", registry=r
        )
        self.messages_out = Counter(
            "lipsync_gateway_messages_out",
            "WebSocket messages sent, by kind (a, c, d, json).",
            ["kind"],
            registry=r,
        )
        self.malformed = Counter(
            "lipsync_gateway_malformed_messages",
            "Client messages that could not be read, by frame type (text, binary).",
            ["kind"],
            registry=r,
        )
        self.http = Counter(
            "lipsync_gateway_http_requests",
            "Plain HTTP requests, by route (static, health, metrics) and status.",
            ["route", "status"],
            registry=r,
        )
        self.broker_up = Gauge(
            "lipsync_gateway_broker_up", "1 while the broker answers heartbeats.", registry=r
        )
        self._answered: dict[tuple[str, str], Any] = {}
        self._latency: dict[str, Any] = {}
        self._sent: dict[str, Any] = {}

    # The per-request series through cached children: ``labels()`` is a lock and a dict
    # walk per call (1.2 us), and every answer touches three of them.

    def answered(self, op: str, outcome: str, seconds: float | None) -> None:
        """Count a request of ``op`` answered with ``outcome``; with the broker's part
        (``seconds`` not None), its latency too."""
        key = (op, outcome)
        counter = self._answered.get(key)
        if counter is None:
            counter = self._answered[key] = self.requests.labels(op, outcome)
        counter.inc()
        if seconds is not None:
            histogram = self._latency.get(op)
            if histogram is None:
                histogram = self._latency[op] = self.latency.labels(op)
            histogram.observe(seconds)

    def sent(self, kind: str, size: int) -> None:
        """A message of ``kind`` and ``size`` bytes handed to a client's socket."""
        self.bytes_out.inc(size)
        counter = self._sent.get(kind)
        if counter is None:
            counter = self._sent[kind] = self.messages_out.labels(kind)
        counter.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class BrokerClientCollector:
    """The broker client's own counters (``BrokerClient.counters``: sent, answered, errors,
    timeouts, cancelled, broker_lost, broker_restarts, unmatched, malformed) as one counter
    family, read at scrape time; the label values are the dict's fixed keys."""

    def __init__(self, counters: Callable[[], Mapping[str, int]]) -> None:
        self._counters = counters

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "lipsync_gateway_broker_client_events",
            "Requests to the broker and what became of them, as the gateway's broker client "
            "counts them (broker_lost: failed because the broker died, restarted or dropped "
            "the connection).",
            labels=["event"],
        )
        for event, n in self._counters().items():
            family.add_metric([event], n)
        yield family
