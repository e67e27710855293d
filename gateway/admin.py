"""Admin operations over the WebSocket: load, unload and reload a model package at run time.

Why here and over the same WebSocket: the gateway is the one public door, with the Origin
check, the token and the size limits already in front of it; a second admin port would
need all of them again. Admin messages are refused unless the gateway has a token
(``LIPSYNC_TOKEN``): with a token configured, every connection has presented it at the
handshake (``gateway.security``), so any connection may administer; without one, nobody
may, since anyone who can reach the port could otherwise unload every model.

Each message becomes one broker request with ``opts["workers"]``; the broker fans it out
(``broker.fanout``) and answers once with every chosen worker's outcome. Workers announce
their new model set (READY) before answering, so a ``list_models`` sent after the answer
already sees the change. docs/protocol.md, section "Admin", is the contract.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from gateway.context import Request
from shared.browser import JsonRequest, dumps, valid_model_name
from shared.envelope import Op
from shared.errors import ErrorCode, ServiceError
from shared.opts import AdminOpts


__all__ = ["ADMIN_TTL_MS", "ADMIN_TYPES", "admin", "admin_error"]

logger = logging.getLogger("gateway.admin")

ADMIN_TYPES = ("load_package", "unload_package", "reload_package")
ADMIN_TTL_MS = 60_000
"""Loading a package decodes its videos on first load (seconds to a minute on a CPU); the
broker clamps deadlines to 60 s, and so does this."""
MAX_WORKERS = 10_000


def admin_error(request: JsonRequest, error: str) -> str:
    """The answer to an admin message that failed as a whole (no worker was asked)."""
    return dumps(
        {
            "type": "admin",
            "op": request.type,
            "success": False,
            "model_name": request.model_name,
            "error": error,
        }
    )


def _workers(value: Any) -> str | int:
    if value is None:
        return "all"
    if isinstance(value, bool):
        raise ServiceError(ErrorCode.BAD_REQUEST, "workers must be all, a count or a worker id")
    if isinstance(value, int):
        if not 1 <= value <= MAX_WORKERS:
            raise ServiceError(ErrorCode.BAD_REQUEST, f"workers must be 1..{MAX_WORKERS}")
        return value
    if isinstance(value, str) and 0 < len(value) <= 256:
        return int(value) if value.isdigit() and 0 < int(value) <= MAX_WORKERS else value
    raise ServiceError(ErrorCode.BAD_REQUEST, "workers must be all, a count or a worker id")


def _outcome(entry: Any) -> dict[str, Any]:
    """One worker's outcome as clients see it."""
    if not isinstance(entry, dict):
        return {"worker": "", "success": False, "error": "internal: bad outcome from broker"}
    out: dict[str, Any] = {"worker": str(entry.get("worker", ""))}
    if entry.get("ok") is True:
        out["success"] = True
        if isinstance(entry.get("metadata"), dict):
            out["metadata"] = entry["metadata"]
        if isinstance(entry.get("time_ms"), int | float):
            out["time_ms"] = entry["time_ms"]
    else:
        out["success"] = False
        out["error"] = f"{entry.get('code', 'internal')}: {entry.get('error', '')}"
    return out


async def admin(
    ask: Request,
    has_token: bool,
    on_change: Callable[[], None],
    peer: str,
    request: JsonRequest,
    t0: float,
) -> str:
    """Handle ``load_package``, ``unload_package`` or ``reload_package``: ``ask`` the
    broker, then ``on_change`` (the health cache is stale). Only a gateway with a token
    (``has_token``) takes them."""
    if not has_token:
        raise ServiceError(ErrorCode.UNAUTHORIZED, "admin operations need LIPSYNC_TOKEN")
    model = request.model_name
    if not model:
        raise ServiceError(ErrorCode.BAD_REQUEST, "model_name is required")
    if not valid_model_name(model):
        raise ServiceError(ErrorCode.BAD_REQUEST, "bad model name")
    workers = _workers(request.extra.get("workers"))
    opts = AdminOpts(workers=workers, reload=request.type == "reload_package")
    op = Op.UNLOAD_PACKAGE if request.type == "unload_package" else Op.LOAD_PACKAGE
    logger.info("%s: %s %s on %s workers", peer, request.type, model, workers)
    answer = await ask(op, model=model, opts=opts.to_map(), ttl_ms=ADMIN_TTL_MS)
    on_change()  # get_stats and /health see the change at once
    result = answer.header.result if isinstance(answer.header.result, dict) else {}
    entries = result.get("workers")
    outcomes = [_outcome(e) for e in entries] if isinstance(entries, list) else []
    failures = [o for o in outcomes if not o["success"]]
    body: dict[str, Any] = {
        "type": "admin",
        "op": request.type,
        "success": bool(outcomes) and not failures,
        "model_name": model,
        "workers": outcomes,
    }
    if failures:
        body["error"] = failures[0]["error"]
        logger.warning(
            "%s %s failed on %d of %d workers: %s",
            request.type,
            model,
            len(failures),
            len(outcomes),
            body["error"],
        )
    elif not outcomes:
        body["error"] = "internal: no worker outcome"
    return dumps(body)
