"""A tiny HTTP/1.1 GET for ``/health`` (and anything else the gateway serves as JSON).

Why not urllib or aiohttp: urllib blocks the event loop, and aiohttp is a dependency this
project does not otherwise need; the gateway answers ``Connection: close`` with a
``Content-Length``, so reading to EOF is all there is to it.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any
from urllib.parse import urlsplit

from lipsync.client.errors import ConnectionLost, ServerError, Timeout
from shared.errors import ErrorCode


__all__ = ["MAX_BODY_BYTES", "http_get_json"]

MAX_BODY_BYTES = 1 << 20


async def http_get_json(url: str, timeout: float) -> tuple[int, dict[str, Any]]:
    """(status, JSON object) of ``GET url``. Raises ConnectionLost, Timeout or ServerError
    (``internal`` when the body is not a JSON object)."""
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if secure else 80)
    path = parts.path or "/"
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=ssl.create_default_context() if secure else None
            )
            try:
                request = (
                    f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                    "Connection: close\r\nAccept: application/json\r\n\r\n"
                )
                writer.write(request.encode("latin-1"))
                await writer.drain()
                data = await reader.read(MAX_BODY_BYTES + 16384)
                while chunk := await reader.read(65536):
                    data += chunk
                    if len(data) > MAX_BODY_BYTES + 16384:
                        break
            finally:
                writer.close()
                try:
                    await writer.wait_closed()
                except OSError:
                    pass
    except TimeoutError:
        raise Timeout(f"no answer from {url} in {timeout:g} s") from None
    except OSError as exc:
        raise ConnectionLost(f"cannot reach {url}: {exc}") from exc
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
        parsed = json.loads(body)
    except (IndexError, ValueError):
        raise ServerError(ErrorCode.INTERNAL, f"{url}: not a JSON answer") from None
    if not isinstance(parsed, dict):
        raise ServerError(ErrorCode.INTERNAL, f"{url}: not a JSON object")
    return status, parsed
