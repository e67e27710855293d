"""A suite report (JSON) as the Markdown tables of BENCHMARKS.md.

    python -m lipsync.bench.markdown bench-out/suite.json

Tables are generated, never typed: a number in BENCHMARKS.md can always be traced to the
JSON report it came from.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lipsync.bench.suite import (
    MAX_BATCH,
    NULL_SERVICE_MS,
    bare_reference,
    cpu_ms_per_frame,
    summary,
)


__all__ = ["markdown"]


def _md(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _cpu(run: dict[str, Any], role: str) -> float | None:
    values = [p["cpu_percent"] for p in run.get("processes", []) if p["role"] == role]
    values = [v for v in values if v is not None]
    return round(sum(values), 1) if values else None


def _run_row(name: str, run: dict[str, Any], ref: float | None = None) -> list[Any]:
    r = run["result"]
    lat = r["latency_ms"]
    fps = r.get("frames_per_s_fit") or r["frames_per_s"]
    cfg = run["config"]
    return [
        name,
        cfg["clients"],
        cfg["in_flight"] if cfg["mode"] == "closed" else 1,
        r["frames_per_s"],
        r.get("frames_per_s_fit"),
        None if not ref else round(fps / ref, 3),
        lat.get("p50"),
        lat.get("p95"),
        lat.get("p99"),
        r["errors"],
        r["lost"],
        _cpu(run, "gateway"),
        _cpu(run, "broker"),
        _cpu(run, "worker"),
        _cpu(run, "bench"),
        _round(cpu_ms_per_frame(run, ("worker", "gateway", "broker"))),
        run["machine"]["loadavg"][0],
    ]


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


RUN_HEADER = [
    "run", "clients", "in flight", "frames/s", "fitted", "ratio", "p50 ms", "p95 ms", "p99 ms",
    "errors", "lost", "gateway cpu %", "broker cpu %", "workers cpu %", "bench cpu %",
    "cpu ms/frame", "load",
]  # fmt: skip


def markdown(report: dict[str, Any]) -> str:
    steps = report["steps"]
    m = report["machine"]
    out = [
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}; {m['date']}; "
        f"load average at start {m['loadavg'][0]}, at end "
        f"{report.get('machine_end', {}).get('loadavg', ['?'])[0]}.",
        "",
        "### Summary",
        "",
        _md(
            [
                [r["target"], r["goal"], r["measured"], r["ratio"], _met(r["met"])]
                for r in summary(report)
            ],
            ["target", "goal", "measured", "ratio", "met?"],
        ),
    ]
    bare, taken = bare_reference(report)
    if "bare" in steps and "unet" in steps["bare"]:
        out += ["", "### Bare model (reference)", ""]
        after = (steps.get("pipeline") or {}).get("bare_after") or {}
        rows = [
            [
                f"UNet {when}, batch {u['batch']}",
                u["frames_per_s"],
                u["ms_per_frame"],
                u.get("best_ms_per_frame"),
                _round(u.get("cpu_ms_per_frame")),
            ]
            for when, bare in (("before", steps["bare"]), ("after", after))
            for u in bare.get("unet", [])
        ]
        rows += [
            [
                f"audio encoder, batch {e['batch']}",
                e["windows_per_s"],
                e["ms_per_window"],
                e.get("best_ms_per_window"),
                _round(e.get("cpu_ms_per_window")),
            ]
            for e in steps["bare"].get("audio_encoder", [])
        ]
        threads = steps["bare"].get("threads", "default")
        out.append(f"torch threads: {threads}")
        out.append("")
        out.append(
            _md(rows, ["", "frames (windows)/s", "ms/frame", "best ms/frame", "cpu ms/frame"])
        )
    pipe = steps.get("pipeline") or {}
    if any(k in pipe for k in ("closed_b_audio", "sequential_1")):
        out += [
            "",
            f"### Pipeline: 1 torch worker, quarter width, max batch {MAX_BATCH} "
            f"(ratio = frames/s / bare batch-{MAX_BATCH} mean {bare and round(bare, 2)})",
            "",
        ]
        names = {
            "closed_b_audio": "closed loop, layout B + audio (crop)",
            "closed_b_no_audio": "closed loop, layout B, no audio",
            "closed_a": "closed loop, layout A (composite)",
            "sequential_1": "sequential (one at a time)",
            "pipelined_1": "one client, 8 in flight",
        }
        rows = [_run_row(n, pipe[k], bare) for k, n in names.items() if "result" in pipe.get(k, {})]
        out.append(_md(rows, RUN_HEADER))
    ceiling = steps.get("ceiling") or {}
    if ceiling and "error" not in ceiling:
        out += ["", "### Infrastructure ceiling: 2 null workers, 20 KB JPEG, layout B", ""]
        rows = [
            _run_row(("with 30 KB audio up" if not k.isdigit() else f"{k} clients"), r)
            for k, r in ceiling.items()
        ]
        out.append(_md(rows, RUN_HEADER))
    wn = steps.get("workers_null") or {}
    if wn and "error" not in wn:
        one = wn.get("1", {}).get("result", {}).get("frames_per_s")
        out += [
            "",
            f"### Worker scaling, null backend, {NULL_SERVICE_MS:.0f} ms per frame "
            "(ratio to 1 worker)",
            "",
        ]
        out.append(_md([_run_row(f"{k} workers", r, one) for k, r in wn.items()], RUN_HEADER))
    sm = steps.get("scale_model") or {}
    tp = sm.get("throughput") or {}
    if tp:
        one = tp.get("1", {}).get("result", {})
        ref = one.get("frames_per_s_fit") or one.get("frames_per_s")
        out += ["", "### Worker scaling, real model, 1 torch thread each (ratio to 1 worker)", ""]
        out.append(_md([_run_row(f"{k} workers", r, ref) for k, r in tp.items()], RUN_HEADER))
    pl = steps.get("pipelining") or {}
    if pl and "error" not in pl:
        out += [
            "",
            f"### Pipelined against sequential clients, 1 null worker, "
            f"{NULL_SERVICE_MS:.0f} ms per frame (rows ending _2ms: 2 ms per frame)",
            "",
        ]
        out.append(_md([_run_row(k, r) for k, r in pl.items()], RUN_HEADER))
    lat = steps.get("latency") or {}
    if lat and "error" not in lat:
        out += ["", "### Latency at light load: 1 null worker, no batching wait", ""]
        rows = []
        if "gateway" in lat:
            g = lat["gateway"]["result"]["latency_ms"]
            rows.append(["WebSocket client, 25 req/s, through gateway + broker", g])
        d = lat.get("broker_direct")
        if d:
            rows.append(["broker client, 25 req/s, round trip", d["broker_rtt_ms"]])
            rows.append(["  worker's own time (its reply's timings)", d["worker_ms"]])
            rows.append(["  round trip - worker time, per request", d["broker_minus_worker_ms"]])
        s1 = lat.get("stream_1")
        if s1 and "result" in s1 and not s1.get("unavailable"):
            rows.append(["one paced stream, audio-in to frame-out", s1["result"]["latency_ms"]])
        out.append(
            _md(
                [[n, p.get("count"), p.get("p50"), p.get("p95"), p.get("p99")] for n, p in rows],
                ["", "n", "p50 ms", "p95 ms", "p99 ms"],
            )
        )
    if sm.get("rows"):
        dec = sm["decoded_bytes"]
        out += [
            "",
            f"### Memory per worker (torch, 1 thread), decoded frames {dec / 1e6:.0f} MB "
            "(MB; after every frame was read by the workers)",
            "",
        ]
        rows = []
        for r in sm["rows"]:
            pw = r["per_worker"]
            rows.append(
                [
                    r["workers"],
                    round(sum(w.get("rss", 0) for w in pw) / len(pw) / 1e6),
                    round(sum(w.get("pss", 0) for w in pw) / len(pw) / 1e6),
                    round(sum(w.get("uss", 0) for w in pw) / len(pw) / 1e6),
                    round(r["total_pss"] / 1e6),
                    None if r["added_pss"] is None else round(r["added_pss"] / 1e6),
                    None if r["added_pss"] is None else round(r["added_pss"] / dec, 2),
                    round(r["framecache_rss_sum"] / 1e6),
                    round(r["framecache_pss_sum"] / 1e6),
                ]
            )
        out.append(
            _md(
                rows,
                [
                    "workers",
                    "RSS/worker",
                    "PSS/worker",
                    "USS/worker",
                    "total PSS",
                    "added PSS",
                    "added / decoded",
                    "frame caches RSS (sum)",
                    "frame caches PSS (sum)",
                ],  # fmt: skip
            )
        )
    prof = steps.get("profile") or {}
    procs = {k: v for k, v in prof.items() if k not in ("load", "processes")}
    if procs:
        out += ["", "### Profile (py-spy, 5 clients x 8 in flight, null workers)", ""]
        for name, p in procs.items():
            top = ", ".join(f"{f} {s}%" for f, s in p["self"][:6])
            out.append(f"- **{name}** ({p['busy_samples']} busy samples): {top}")
    return "\n".join(out) + "\n"


def _met(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "-"}[met]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m lipsync.bench.markdown SUITE.json", file=sys.stderr)
        return 2
    print(markdown(json.loads(Path(args[0]).read_text())), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
