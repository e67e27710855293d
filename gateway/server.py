"""``lipsync gateway``: the WebSocket server, and plain HTTP on the same port.

One asyncio process (uvloop when available) runs python-websockets' server. Its
``process_request`` hook sees every HTTP request before the WebSocket handshake, so the same
port also serves the web client (``GET /`` and the files of ``web/``), ``GET /health`` and
``GET /metrics``; only ``/ws`` goes on to become a WebSocket, and only when its Origin and
token pass (:mod:`gateway.security`).

Shutdown (SIGTERM or SIGINT): stop accepting, answer what is in flight (or fail it once its
deadline passes), flush, then close every connection with 1001 (going away).
"""

from __future__ import annotations

import asyncio
import http
import logging
import signal
import time
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve as ws_serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from gateway.brokerclient import BrokerClient
from gateway.connection import Connection, peer_name
from gateway.context import ConnectionContext, GatewayTotals
from gateway.health import HealthCache
from gateway.metrics import (
    CONTENT_TYPE as METRICS_CONTENT_TYPE,
    BrokerClientCollector,
    GatewayMetrics,
)
from gateway.modelmetrics import BrokerCollector, ModelCollector
from gateway.security import Guard
from gateway.static import StaticFiles, default_web_dir
from gateway.streams import StreamHub
from shared.browser import dumps
from shared.config import GatewayConfig
from shared.logs import setup_logging


__all__ = ["WS_PATH", "Gateway", "run", "serve"]

logger = logging.getLogger("gateway")

WS_PATH = "/ws"
MAX_QUEUE = 16
"""Incoming messages buffered per connection before websockets stops reading the socket.
The receive loop hands each message off at once, so this rarely fills."""
WRITE_LIMIT = 256 * 1024
"""Bytes buffered in the transport before a send waits (the original proxy's write buffer).
Beyond it answers wait in the connection's outbox (``gateway.outbox``)."""
CLOSE_TIMEOUT_S = 5.0
DRAIN_GRACE_S = 2.0
"""On shutdown, how long past the request deadline to wait for answers in flight."""
BROKER_WAIT_S = 1.0


class Gateway:
    """What every connection shares: config, broker client, metrics, health, static files."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.broker = BrokerClient(config.broker)
        self.metrics = GatewayMetrics()
        self.metrics.broker_up.set_function(lambda: float(self.broker.broker_alive))
        self.health = HealthCache(self.broker)
        self.metrics.registry.register(ModelCollector(self._last_stats))
        self.metrics.registry.register(BrokerCollector(self._last_stats))
        self.metrics.registry.register(BrokerClientCollector(lambda: self.broker.counters))
        self.streams = StreamHub(registry=self.metrics.registry)
        self.static = StaticFiles(config.web_dir or default_web_dir())
        self.guard = Guard(
            host=config.host,
            port=config.port,
            allowed_origins=config.allowed_origins,
            token=config.token,
        )
        self.connections: set[Connection] = set()
        self.shutting_down = False
        self.started = time.monotonic()
        self.totals = GatewayTotals()
        self.context = ConnectionContext(
            config=config,
            metrics=self.metrics,
            request=self.broker.request,
            health=self.health,
            streams=self.streams,
            totals=self.totals,
            shutting_down=lambda: self.shutting_down,
            stats_fields=self.stats_fields,
        )

    def _last_stats(self) -> dict[str, Any] | None:
        status = self.health.cached
        return status.stats if status is not None else None

    async def start(self) -> None:
        await self.broker.start(wait_s=BROKER_WAIT_S)

    def bound(self, port: int) -> None:
        """The port actually bound (differs from the config's when that is 0)."""
        self.guard.port = port

    async def close(self) -> None:
        await self.health.close()
        await self.broker.close()

    def stats_fields(self) -> dict[str, Any]:
        """Gateway counters for ``get_stats``, under the original server's names first."""
        t = self.totals
        total = t.json_requests + t.binary_requests
        return {
            "total_requests": total,
            "binary_requests": t.binary_requests,
            "json_requests": t.json_requests,
            "binary_percentage": round(100 * t.binary_requests / total, 1) if total else 0.0,
            "average_time_ms": round(t.time_ms / t.answered, 2) if t.answered else 0.0,
            "connected_clients": len(self.connections),
            "in_flight": sum(len(c.tasks) for c in self.connections),
            "dropped_frames": t.dropped_frames,
        }

    # -- websockets hooks --------------------------------------------------------------

    async def handler(self, ws: ServerConnection) -> None:
        connection = Connection(self.context, ws)
        self.connections.add(connection)
        self.metrics.connections.inc()
        self.metrics.connections_total.inc()
        logger.info("%s connected", connection.peer)
        try:
            await connection.serve()
        finally:
            self.connections.discard(connection)
            self.metrics.connections.dec()

    async def process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        """Route an HTTP request: None lets the WebSocket handshake go on (``/ws`` only)."""
        path = request.path.split("?", 1)[0]
        if path == WS_PATH and request.method == "GET":
            refusal = self.guard.check(request.path, request.headers)
            if refusal is None and self.shutting_down:
                refusal_status, reason, text = 503, "shutting_down", "server shutting down\n"
            elif refusal is not None:
                refusal_status, reason, text = refusal.status, refusal.reason, refusal.message
            else:
                return None
            self.metrics.refused.labels(reason).inc()
            logger.info("%s refused (%s): %s", peer_name(ws), reason, text.strip())
            extra = [("WWW-Authenticate", "Bearer")] if refusal_status == 401 else []
            return _response(refusal_status, text.encode(), "text/plain; charset=utf-8", extra)
        if request.method != "GET":
            return self._http(
                "other", _response(405, b"method not allowed\n", extra=[("Allow", "GET")])
            )
        if path == "/health":
            return self._http("health", await self._health())
        if path == "/metrics":
            await self.health.status()  # fresh per-model series (cached 0.5 s)
            return self._http(
                "metrics", _response(200, self.metrics.render(), METRICS_CONTENT_TYPE)
            )
        if "upgrade" in request.headers.get("Connection", "").lower():
            return self._http("other", _response(404, b"websocket path is /ws\n"))
        found = self.static.get(request.path)
        return self._http("static", _response(found.status, found.body, found.content_type))

    def _http(self, route: str, response: Response) -> Response:
        self.metrics.http.labels(route, str(response.status_code)).inc()
        return response

    async def _health(self) -> Response:
        status = await self.health.status()
        body = {
            "healthy": status.healthy,
            "broker": status.broker,
            "workers": status.workers,
            "models": status.models,
            "connections": len(self.connections),
            "in_flight": sum(len(c.tasks) for c in self.connections),
            "uptime_s": round(time.monotonic() - self.started, 1),
        }
        if status.error:
            body["error"] = status.error
        text = (dumps(body) + "\n").encode()
        return _response(200 if status.healthy else 503, text, "application/json")

    # -- shutdown ----------------------------------------------------------------------

    async def shutdown(self, server: Server) -> None:
        """Stop accepting, let what is in flight finish, close every connection with 1001."""
        self.shutting_down = True
        server.close(close_connections=False)  # stops listening; handlers keep running
        connections = list(self.connections)
        in_flight = sum(len(c.tasks) for c in connections)
        logger.info(
            "shutting down: %d connections, %d requests in flight", len(connections), in_flight
        )
        if connections:
            drains = [asyncio.create_task(c.drain()) for c in connections]
            timeout = self.config.request_timeout_ms / 1000 + DRAIN_GRACE_S
            _, late = await asyncio.wait(drains, timeout=timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*drains, return_exceptions=True)
            await asyncio.gather(
                *(c.ws.close(1001, "server shutting down") for c in connections),
                return_exceptions=True,
            )
        await server.wait_closed()


def _response(
    status: int,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    extra: list[tuple[str, str]] | None = None,
) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-cache"),
            ("X-Content-Type-Options", "nosniff"),
            ("Connection", "close"),
            *(extra or []),
        ]
    )
    return Response(status, http.HTTPStatus(status).phrase, headers, body)


async def serve(config: GatewayConfig, stop: asyncio.Event | None = None) -> int:
    """Run the gateway until ``stop`` is set (by default: SIGTERM or SIGINT)."""
    gateway = Gateway(config)
    await gateway.start()
    loop = asyncio.get_running_loop()
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    try:
        async with ws_serve(
            gateway.handler,
            config.host,
            config.port,
            process_request=gateway.process_request,
            server_header="lipsync",
            compression=None,  # JPEG does not deflate; compression would only cost CPU
            max_size=config.max_message_bytes,
            max_queue=MAX_QUEUE,
            write_limit=WRITE_LIMIT,
            ping_interval=config.ping_interval_s or None,
            ping_timeout=config.ping_interval_s or None,
            close_timeout=CLOSE_TIMEOUT_S,
        ) as server:
            port = server.sockets[0].getsockname()[1] if server.sockets else config.port
            gateway.bound(port)
            logger.info(
                "listening on http://%s:%d (WebSocket %s), broker %s, web %s%s",
                config.host,
                port,
                WS_PATH,
                config.broker,
                gateway.static.root,
                ", token required" if config.token else "",
            )
            await stop.wait()
            await gateway.shutdown(server)
    finally:
        await gateway.close()
    logger.info("stopped")
    return 0


def run(config: GatewayConfig) -> int:
    """Entry point of ``lipsync gateway``: 0 after a clean stop, 1 if it cannot start."""
    setup_logging("gateway", config.log_level)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # websockets logs every handshake and HTTP response at INFO; ours are enough
        logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        runner = asyncio.run
    try:
        return int(runner(serve(config)))
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", config.host, config.port, exc)
        return 1
    except ValueError as exc:  # bad allowed_origins and the like
        logger.error("bad configuration: %s", exc)
        return 1
