"""The broker's warm-up: the first seconds after a start, while workers register.

A broker that has just started knows no worker yet: for its first ``seconds`` (two
liveness periods by default: a worker notices a restart within one, and its reconnect
back-off lasts at most one more) a request for a model nobody holds waits in that model's
queue (a metadata request in ``parked``, as bounded) instead of failing ``unknown_model``;
a restart is then a pause for the streams going through it, not an error.
"""

from __future__ import annotations

from dataclasses import dataclass


__all__ = ["Parked", "Warmup"]


@dataclass(slots=True)
class Parked:
    """A metadata request waiting for a holder of its model to register."""

    gateway: bytes
    gid: int
    model: str
    deadline: float


class Warmup:
    """Whether the broker is still warming up, and the metadata requests waiting in it."""

    def __init__(self, seconds: float, started: float) -> None:
        self.seconds = seconds
        self.until = started + seconds
        self.warming = seconds > 0
        self.parked: list[Parked] = []

    def cancel(self, gateway: bytes, gid: int) -> bool:
        """Drop the parked request (gateway, gid); True if there was one."""
        kept = [k for k in self.parked if (k.gateway, k.gid) != (gateway, gid)]
        found = len(kept) < len(self.parked)
        self.parked = kept
        return found

    def take_parked(self) -> list[Parked]:
        parked, self.parked = self.parked, []
        return parked
