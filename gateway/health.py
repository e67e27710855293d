"""What /health reports: can this gateway serve a frame right now?

Healthy means the broker answers heartbeats and at least one worker holds a model. The
answer comes from the broker's ``stats`` op with a short deadline, cached for half a
second and shared by concurrent callers, so a load balancer probing hard costs the broker
at most two small requests a second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from shared.errors import ServiceError


__all__ = ["BrokerStatus", "HealthCache"]

logger = logging.getLogger(__name__)

STATS_TTL_MS = 500
CACHE_S = 0.5


class _Broker(Protocol):
    @property
    def broker_alive(self) -> bool: ...

    async def request(self, op: str, *, ttl_ms: int = ...) -> Any: ...


@dataclass(frozen=True, slots=True)
class BrokerStatus:
    broker: bool
    workers: int = 0
    models: list[str] = field(default_factory=list)
    error: str = ""
    stats: dict[str, Any] = field(default_factory=dict)  # the broker's whole stats answer

    @property
    def healthy(self) -> bool:
        return self.broker and self.workers > 0 and bool(self.models)


class HealthCache:
    def __init__(self, broker: _Broker, *, cache_s: float = CACHE_S) -> None:
        self.broker = broker
        self.cache_s = cache_s
        self._status: BrokerStatus | None = None
        self._at = 0.0
        self._fetch: asyncio.Task[BrokerStatus] | None = None

    @property
    def cached(self) -> BrokerStatus | None:
        """The last status fetched, however old (for /metrics collectors)."""
        return self._status

    def invalidate(self) -> None:
        """Forget the cached status (the model set just changed: admin ops)."""
        self._status = None

    async def status(self) -> BrokerStatus:
        if self._status is not None and time.monotonic() - self._at < self.cache_s:
            return self._status
        if self._fetch is None or self._fetch.done():
            self._fetch = asyncio.create_task(self._query(), name="health-stats")
        # shield: one caller giving up (its client hung up) must not cancel the others'
        return await asyncio.shield(self._fetch)

    async def close(self) -> None:
        if self._fetch is not None and not self._fetch.done():
            self._fetch.cancel()
            try:
                await self._fetch
            except asyncio.CancelledError:
                pass

    async def _query(self) -> BrokerStatus:
        status = await self._ask()
        self._status, self._at = status, time.monotonic()
        return status

    async def _ask(self) -> BrokerStatus:
        if not self.broker.broker_alive:
            return BrokerStatus(False, error="broker unavailable")
        try:
            answer = await self.broker.request("stats", ttl_ms=STATS_TTL_MS)
        except ServiceError as exc:
            return BrokerStatus(self.broker.broker_alive, error=f"{exc.code.value}: {exc}")
        result = answer.header.result if isinstance(answer.header.result, dict) else {}
        workers = result.get("workers")
        models = result.get("models")
        return BrokerStatus(
            True,
            workers=len(workers) if isinstance(workers, list) else 0,
            models=sorted(
                str(name)
                for name, info in (models.items() if isinstance(models, dict) else ())
                if not isinstance(info, dict) or info.get("workers", [None])
            ),
            stats=result,
        )
