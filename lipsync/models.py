"""``lipsync models list|load|unload|reload``: model management of a running system, through
the Python client (so through the gateway, its token and its limits, like any client). The
arguments are declared in ``lipsync.cli``.

Exit status: 0 when every chosen worker succeeded, 1 when any failed or the gateway refused
(no token, unknown model...), 2 when the gateway could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from lipsync.client import (
    AdminResult,
    ConnectionLost,
    LipsyncClient,
    LipsyncError,
    token_from_env,
)


__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    if args.action != "list" and not args.name:
        print(f"lipsync models {args.action}: a package NAME is required", file=sys.stderr)
        return 1
    try:
        return asyncio.run(_run(args))
    except ConnectionLost as exc:
        print(f"lipsync models: {exc}", file=sys.stderr)
        return 2
    except LipsyncError as exc:
        print(f"lipsync models {args.action}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"lipsync models {args.action}: {exc}", file=sys.stderr)
        return 1


async def _run(args: argparse.Namespace) -> int:
    token = args.token or token_from_env()
    workers: str | int = int(args.workers) if args.workers.isdigit() else args.workers
    async with LipsyncClient(args.url, token=token, timeout=args.timeout) as client:
        if args.action == "list":
            return await _list(client, args.json)
        call = {
            "load": client.load_package,
            "unload": client.unload_package,
            "reload": client.reload_package,
        }[args.action]
        result = await call(args.name, workers, timeout=args.timeout, check=False)
    _print_result(result, args.json)
    return 0 if result.success else 1


async def _list(client: LipsyncClient, as_json: bool) -> int:
    names = await client.list_models()
    stats = await client.stats()
    if as_json:
        rows = {
            n: {"workers": list(s.workers), "devices": list(s.devices), "requests": s.requests}
            for n in names
            if (s := stats.model_stats.get(n)) is not None
        }
        print(json.dumps({"models": names, "details": rows}, indent=2))
        return 0
    if not names:
        print("no models loaded")
    for name in names:
        s = stats.model_stats.get(name)
        if s is None:
            print(name)
            continue
        print(
            f"{name}  workers={','.join(s.workers) or '-'}  devices={','.join(s.devices) or '-'}"
            f"  requests={s.requests}  errors={s.errors}  p50={s.latency_ms.p50:g}ms"
            f"  fps={s.frames_per_s:g}"
        )
    return 0


def _print_result(result: AdminResult, as_json: bool) -> None:
    if as_json:
        print(
            json.dumps(
                {
                    "op": result.op,
                    "model_name": result.model_name,
                    "success": result.success,
                    "error": result.error,
                    "workers": [_outcome(w) for w in result.workers],
                },
                indent=2,
            )
        )
        return
    verb = {"load_package": "loaded", "unload_package": "unloaded"}.get(result.op, "reloaded")
    for w in result.workers:
        if w.success:
            frames = (w.metadata or {}).get("frame_count")
            extra = f", {frames} frames" if frames is not None else ""
            print(f"{w.worker}: {verb} {result.model_name} in {w.time_ms:.0f} ms{extra}")
        else:
            print(f"{w.worker}: FAILED: {w.error}")
    if not result.workers:
        print(f"{result.op} {result.model_name}: {result.error or 'no worker answered'}")


def _outcome(w: Any) -> dict[str, Any]:
    return {
        "worker": w.worker,
        "success": w.success,
        "error": w.error,
        "time_ms": w.time_ms,
        "metadata": w.metadata,
    }
