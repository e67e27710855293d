"""Stream counters and the audio-in → frame-out latency histogram of one gateway, also
exported to Prometheus when given the gateway's registry (docs/streams.md, "Timing": label
values come from a closed set only)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.streams.clock import Act, Decision, Why
from shared.modelstats import LatencyHistogram, LogBuckets


if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry


__all__ = ["LATENCY_BUCKETS", "StreamMetrics"]

LATENCY_BUCKETS = LogBuckets.spanning(1.0, 60_000.0, 1.02)
"""1 ms .. 60 s, 2 % apart: the latency's quantiles to within 2 % (558 counters)."""

_DROP_EVENTS = {Why.SKIPPED: "skipped", Why.TOO_LATE: "too_late"}
"""Drops counted apart (as well as in ``dropped``)."""


class StreamMetrics:
    """Counters by event (``lipsync_gateway_stream_events_total{event}``: a series appears
    once its event first happens), open streams, and the latency of frames sent."""

    COUNTERS = (
        "streams_started",
        "streams_refused",
        "streams_ended",
        "streams_failed",
        "interrupts",
        "frames_sent",
        "idle_frames",
        "inferred",  # infer requests sent
        "idle_fetches",  # raw full frames fetched for composite idle frames (cache misses)
        "dropped",
        "skipped",  # dropped without asking (part of "dropped"): the workers are behind
        "too_late",  # dropped before its time: a worker would have had it ready too late
        "delayed",  # a late frame pushed its stream's playout back one frame time
        "caught_up",  # frames a stream's playout moved forward after a second of early frames
        "audio_chunks",
        "audio_rejected",  # malformed chunks, chunks for unknown streams, audio after stop
    )

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.latency = LatencyHistogram(LATENCY_BUCKETS)
        self.counters = dict.fromkeys(self.COUNTERS, 0)
        self.active = 0
        self._prom: dict[str, Any] = {}
        if registry is not None:
            from prometheus_client import Counter, Gauge, Histogram

            self._prom = {
                "latency": Histogram(
                    "lipsync_gateway_stream_latency_seconds",
                    "Stream frames: arrival of the last audio sample a frame needs to the frame "
                    "being sent.",
                    buckets=(0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5),
                    registry=registry,
                ),
                "events": Counter(
                    "lipsync_gateway_stream_events",
                    "Stream events: frames sent, idle frames, infer requests, drops, streams.",
                    ["event"],
                    registry=registry,
                ),
                "active": Gauge(
                    "lipsync_gateway_streams", "Streams open on this gateway.", registry=registry
                ),
            }

    def add(self, name: str, n: int = 1) -> None:
        self.counters[name] += n
        if self._prom:
            self._prom["events"].labels(name).inc(n)

    def decided(self, decision: Decision) -> None:
        """Count what a stream's pacer decided (``StreamCore.decide``)."""
        act = decision.act
        if act is Act.SEND:
            self.add("frames_sent")
            if decision.frame is not None and decision.frame.idle:
                self.add("idle_frames")
            if decision.caught_up:
                self.add("caught_up", decision.caught_up)
        elif act is Act.DROP or act is Act.FAIL:
            event = _DROP_EVENTS.get(decision.why) if decision.why is not None else None
            if event is not None:
                self.add(event)
            self.add("dropped")
        elif act is Act.DELAY:
            self.add("delayed")

    def observe_latency(self, seconds: float) -> None:
        self.latency.add(seconds * 1000)
        if self._prom:
            self._prom["latency"].observe(seconds)

    def set_active(self, n: int) -> None:
        self.active = n
        if self._prom:
            self._prom["active"].set(n)

    def snapshot(self) -> dict[str, Any]:
        return {"active": self.active, **self.counters, "latency": self.latency.snapshot()}
