"""What a stream is given instead of the gateway: a function that asks the workers (the
broker client's ``request``) and one that sends a message to its connection."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol


__all__ = ["Answer", "RequestFn", "SendFn"]


class _Header(Protocol):
    @property
    def result(self) -> Any: ...
    @property
    def bounds(self) -> Sequence[float] | None: ...
    @property
    def worker(self) -> str: ...


class Answer(Protocol):
    """The part of ``gateway.brokerclient.Answer`` a stream reads."""

    @property
    def header(self) -> _Header: ...
    @property
    def payload(self) -> Sequence[bytes | bytearray | memoryview]: ...


class RequestFn(Protocol):
    """``BrokerClient.request``: one request to the workers, its answer or ServiceError."""

    def __call__(
        self,
        op: str,
        *,
        model: str = "",
        frame: int = -1,
        opts: dict[str, Any] | None = None,
        payload: Sequence[bytes] = (),
        ttl_ms: int = 2000,
    ) -> Awaitable[Answer]: ...


SendFn = Callable[[bytes | str], Awaitable[None]]
"""Sends one message (binary or text) to the stream's connection, in order."""
