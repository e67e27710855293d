"""Reports: the machine a number was taken on, and a table a person can read.

Every number in BENCHMARKS.md comes with the machine, the date and the load average at the
time (the machine may be shared), so these travel in every JSON report.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


__all__ = ["cpu_model", "format_run", "machine", "table", "write_json"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "command": shlex.join(["lipsync", *sys.argv[1:]])
        if sys.argv and sys.argv[0].endswith("lipsync")
        else shlex.join(["python", *sys.argv]),
    }


def write_json(path: str | os.PathLike[str], report: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain-text table, columns right-aligned except the first."""
    cells = [[str(h) for h in header]] + [[_cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for n, r in enumerate(cells):
        pairs = enumerate(zip(r, widths, strict=True))
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.2f}"
    return str(value)


def format_run(report: dict[str, Any]) -> str:
    """One load run as a few readable lines."""
    r = report["result"]
    lat = r["latency_ms"]
    cfg = report["config"]
    what = (
        f"{cfg['mode']} x{cfg['clients']}"
        + (f", {cfg['in_flight']} in flight" if cfg["mode"] == "closed" else "")
        + (f", layout {cfg['layout']}" if cfg["mode"] != "stream" else "")
        + (", no audio" if cfg["mode"] != "stream" and not cfg["audio"] else "")
    )
    lines = [
        f"{what} against {cfg['url']} model {cfg['model']} "
        f"({r['window_s']:.1f} s window, load {report['machine']['loadavg'][0]})",
        table(
            [
                [
                    "all",
                    r["frames_per_s"],
                    lat.get("p50"),
                    lat.get("p95"),
                    lat.get("p99"),
                    r["server_ms"].get("p50"),
                    round(r["bytes_in_per_s"] / 1e6, 2),
                    r["sent"],
                    r["answered"],
                    r["errors"],
                    r["lost"],
                    r["dropped"],
                ]
            ],
            [
                "",
                "frames/s",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "server p50",
                "MB/s in",
                "sent",
                "answered",
                "errors",
                "lost",
                "dropped",
            ],
        ),
    ]
    if r["errors_by_kind"]:
        lines.append("errors: " + ", ".join(f"{k} {v}" for k, v in r["errors_by_kind"].items()))
    if r["unexpected"]:
        lines.append("unexpected: " + ", ".join(f"{k} {v}" for k, v in r["unexpected"].items()))
    if report.get("processes"):
        lines.append(
            table(
                [
                    [
                        p["role"],
                        p["pid"],
                        p["cpu_percent"],
                        _mb(p.get("rss")),
                        _mb(p.get("pss")),
                        _mb(p.get("uss")),
                    ]
                    for p in report["processes"]
                ],
                ["process", "pid", "cpu %", "rss MB", "pss MB", "uss MB"],
            )
        )
    return "\n".join(lines)


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / 1e6, 1)
