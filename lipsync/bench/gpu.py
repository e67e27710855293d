"""The GPU benchmark, end to end, in one command that prints one report:

    python -m lipsync.bench.gpu [--out DIR] [--device auto] [--budget-s 280]
    python -m lipsync.bench.gpu --tiny --device cpu      # a smoke run on a CPU

Steps, each measured in this one run so that every ratio compares numbers taken side by
side (DESIGN.md section 8):

1. a synthetic package, full-width UNet-328 with 1280x720 frames (``--tiny``: quarter
   width, 320x240, for CPUs and tests), made once in ``DIR/models``;
2. ``workers.bench_gpu`` in a process of its own: the bare model (fp32, fp16, fp16 + CUDA
   graphs) and the whole worker (forward + paste-back + JPEG, crop and composite, per
   batch size, the share of each stage and the host CPU per frame), and the memory one
   avatar takes;
3. the real system (``lipsync.bench.system``: broker + gateway + K workers on the device,
   K = 1, 2, 4): the number of concurrent 25 fps streams sustained with p99 extra latency
   under 100 ms (``lipsync.bench.capacity``), and frames/s of pipelined layout B clients,
   with each worker's host CPU per frame and (where ``nvidia-smi`` answers) its GPU memory.

Writes ``DIR/gpu_bench.json`` and ``DIR/gpu_bench.md`` (the section for BENCHMARKS.md) and
prints the markdown. ``--budget-s`` bounds the whole run (default 280 s, for a five-minute
slot): a step that would start past it is skipped and the report says so.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lipsync.bench.capacity import FPS, MAX_EXTRA_P99_MS, Trial, next_count, sustained
from lipsync.bench.report import machine
from lipsync.bench.system import System
from shared.streamtime import lookahead_ms


__all__ = ["Settings", "main", "markdown"]

PACKAGE = "gpubench"
STREAM_RATE = 16_000  # the load generator's stream audio rate (lipsync.bench.clients)


@dataclass(frozen=True, slots=True)
class Settings:
    device: str = "auto"
    width: str = "full"
    size: tuple[int, int] = (1280, 720)
    frames: int = 100
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    seconds: float = 1.0  # per in-process cell
    workers: tuple[int, ...] = (1, 2, 4)
    max_batch: int = 32  # of the system's workers
    trial_warmup: float = 1.5
    trial_seconds: float = 3.0
    trials: int = 5  # stream-count trials per worker count
    stream_limit: int = 1024
    b_clients: int = 16
    b_in_flight: int = 8
    b_seconds: float = 3.0
    budget_s: float = 280.0


TINY = Settings(
    width="quarter",
    size=(320, 240),
    frames=16,
    batches=(1, 2),
    seconds=0.5,
    workers=(1,),
    max_batch=2,
    trial_warmup=1.0,
    trial_seconds=2.0,
    trials=1,
    b_clients=1,
    b_in_flight=2,
    b_seconds=2.0,
)


class Run:
    def __init__(self, out: Path, s: Settings) -> None:
        self.out = out
        self.s = s
        self.t0 = time.monotonic()
        self.report: dict[str, Any] = {
            "machine": machine(),
            "settings": {k: getattr(s, k) for k in s.__dataclass_fields__},
            "skipped": [],
        }

    def left(self) -> float:
        return self.s.budget_s - (time.monotonic() - self.t0)

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f} s] {text}", flush=True)

    # -- steps -------------------------------------------------------------------------

    def package(self) -> Path:
        models = self.out / "models"
        w, h = self.s.size
        name = f"{PACKAGE}-{self.s.width}-{w}x{h}-{self.s.frames}"
        if not (models / name / "package_info.json").is_file():
            self.log(f"making package {name}")
            subprocess.run(
                [sys.executable, "-m", "lipsync", "make-package", str(models), "--name", name,
                 "--frames", str(self.s.frames), "--size", f"{w}x{h}", "--width", self.s.width],
                check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
        self.report["package"] = {"name": name, "width": self.s.width, "size": [w, h],
                                  "frames": self.s.frames}  # fmt: skip
        return models / name

    def in_process(self, package: Path) -> dict[str, Any]:
        self.log("bare model and whole worker (workers.bench_gpu)")
        path = self.out / "inprocess.json"
        cmd = [
            sys.executable, "-m", "workers.bench_gpu", "--models-dir", str(package.parent),
            "--model", package.name, "--device", self.s.device,
            "--batches", ",".join(map(str, self.s.batches)), "--seconds", str(self.s.seconds),
            "--json", str(path),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"workers.bench_gpu failed:\n{proc.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(path.read_text())
        self.report["in_process"] = result
        return result

    def system(self, package: Path, k: int, guess: int) -> dict[str, Any]:
        cuda = self.report["in_process"]["device"].startswith("cuda")
        device = self.report["in_process"]["device"]
        row: dict[str, Any] = {"workers": k}
        env = {"LIPSYNC_REQUEST_TIMEOUT_MS": "10000", "LIPSYNC_LOG_LEVEL": "INFO"}
        with System(self.out / "runs" / f"workers{k}", env=env) as system:
            system.start_core(max_in_flight=max(64, self.s.b_in_flight))
            for _ in range(k):
                system.add_worker(
                    package.parent, backend="torch", models=package.name, device=device,
                    fp16=cuda, max_batch=self.s.max_batch, max_delay_ms=2.0,
                )  # fmt: skip
            started = time.monotonic()
            system.wait_ready(k, timeout=max(60.0, min(300.0, self.left())))
            row["start_s"] = round(time.monotonic() - started, 1)
            row["gpu_memory_mib"] = gpu_memory(list(system.worker_pids().values()))
            pids = [p.pid for p in system.processes()]
            trials: list[Trial] = []
            runs: list[dict[str, Any]] = []
            while len(trials) < self.s.trials:
                n = next_count(trials, guess * k, self.s.stream_limit)
                if n is None or self.left() < self.s.trial_warmup + self.s.trial_seconds + 10:
                    break
                result = self.load(system, pids, "stream", n)
                shown = float(result["frames_per_s"])
                extra = result["extra_p99_ms"]
                trials.append(Trial(n, shown, extra, sustained(n, shown, extra)))
                runs.append({"streams": n, **result, "sustained": trials[-1].passed})
                verdict = "sustained" if trials[-1].passed else "not sustained"
                self.log(f"K={k}: {n} streams: {shown:.0f} frames/s shown, "
                         f"p99 extra {extra} ms -> {verdict}")  # fmt: skip
            best = max((t for t in trials if t.passed), key=lambda t: t.streams, default=None)
            row["streams_sustained"] = best.streams if best else 0
            row["extra_p99_ms"] = best.extra_p99_ms if best else None
            row["stream_trials"] = runs
            if self.left() > self.s.b_seconds + 10:
                b = self.load(system, pids, "closed", self.s.b_clients)
                row["layout_b"] = b
                self.log(f"K={k}: layout B pipelined: {b['frames_per_s']:.0f} frames/s")
            else:
                self.report["skipped"].append(f"layout B with {k} workers (time budget)")
        return row

    def load(self, system: System, pids: list[int], mode: str, clients: int) -> dict[str, Any]:
        """One load run in 1..4 ``lipsync bench`` processes (one Python client process
        tops out near a few thousand messages a second); their results combined."""
        procs_n = max(1, min(4, math.ceil(clients / 48)))
        share = [clients // procs_n + (i < clients % procs_n) for i in range(procs_n)]
        seconds = self.s.trial_seconds if mode == "stream" else self.s.b_seconds
        paths, running = [], []
        for i, n in enumerate(share):
            path = self.out / f"load-{mode}-{clients}-{i}.json"
            path.unlink(missing_ok=True)
            cmd = [
                sys.executable, "-m", "lipsync", "bench", "--url", system.url, "--mode", mode,
                "--clients", str(n), "--duration", str(seconds),
                "--warmup", str(self.s.trial_warmup), "--json", str(path),
                "--pids", ",".join(map(str, pids)),
            ]  # fmt: skip
            if mode == "closed":
                cmd += ["--layout", "B", "--in-flight", str(self.s.b_in_flight)]
            running.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE))  # fmt: skip
            paths.append(path)
        for proc in running:
            proc.wait(timeout=seconds + self.s.trial_warmup + 120)
        reports = [json.loads(p.read_text()) for p in paths if p.is_file()]
        if not reports:
            errs = b"".join(p.stderr.read() if p.stderr else b"" for p in running)
            raise RuntimeError(f"lipsync bench wrote no report:\n{errs.decode()[-2000:]}")
        return combine(reports, mode)


def combine(reports: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """One result from several load processes' reports: rates add up; the p99 is the
    largest of theirs (an upper bound of the p99 of all frames together)."""
    results = [r["result"] for r in reports]
    p99 = [r["latency_ms"].get("p99") for r in results if r["latency_ms"].get("count")]
    rate = sum(float(r["frames_per_s"]) for r in results)
    out: dict[str, Any] = {
        "frames_per_s": round(rate, 2),
        "answered": sum(r["answered"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "dropped": sum(r["dropped"] for r in results),
        "latency_p99_ms": max(p99) if p99 else None,
    }
    if mode == "stream":
        floor = lookahead_ms(FPS, STREAM_RATE)
        out["lookahead_ms"] = floor
        out["extra_p99_ms"] = round(max(p99) - floor, 1) if p99 else None
    # The processes all sample the same system's CPU: take the first one's sample.
    rows = reports[0].get("processes", [])
    workers = [r for r in rows if r.get("role") == "worker" and r.get("cpu_percent") is not None]
    everyone = [r for r in rows if r.get("cpu_percent") is not None]
    if rate > 0 and workers:
        out["worker_cpu_ms_per_frame"] = round(
            10 * sum(r["cpu_percent"] for r in workers) / rate, 3
        )
        out["system_cpu_ms_per_frame"] = round(
            10 * sum(r["cpu_percent"] for r in everyone) / rate, 3
        )
    return out


def gpu_memory(pids: Sequence[int]) -> dict[str, float] | None:
    """MiB of GPU memory per worker process, from ``nvidia-smi`` (None without it)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        text = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout  # fmt: skip
    except (subprocess.SubprocessError, OSError):
        return None
    used = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            used[int(parts[0])] = float(parts[1])
    return {str(pid): used[pid] for pid in pids if pid in used}


# -- the report ---------------------------------------------------------------------------


def _md(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def markdown(report: dict[str, Any]) -> str:
    ip = report.get("in_process", {})
    m = report["machine"]
    out = [
        f"- Command: `{m['command']}`",
        f"- Machine: {ip.get('machine', '?')} ({ip.get('device', '?')}), host {m['cpu']}, "
        f"{m['cores']} cores; Python {m['python']}, torch {ip.get('torch', '?')}; "
        f"JPEG {ip.get('jpeg', '?')}; decode {'CUDA graphs' if ip.get('graphed') else 'eager'}",
        f"- Date: {m['date']}; load average at start {m['loadavg'][0]}",
        f"- Package: {report.get('package', {})}",
        f"- Whole run: {report.get('seconds', '?')} s",
        "",
    ]
    bare = ip.get("bare", [])
    variants = list(dict.fromkeys(r["variant"] for r in bare))
    by = {(r["variant"], r["batch"]): r for r in bare}
    batches = sorted({r["batch"] for r in bare})
    out.append("**Bare model**, frames/s (decode alone, the image half cached, in brackets)")
    out.append("")
    out.append(
        _md(
            [
                [b]
                + [
                    f"{by[(v, b)]['frames_per_s']:,.0f} ({by[(v, b)]['decode_frames_per_s']:,.0f})"
                    if (v, b) in by
                    else None
                    for v in variants
                ]
                for b in batches
            ],
            ["batch", *variants],
        )
    )
    best = {key: _best_bare(bare, key) for key in ("frames_per_s", "decode_frames_per_s")}
    hits = _hit_rate(ip)
    out += ["", "**Whole worker** (forward + paste-back + JPEG; ratios to the best bare "
            "variant at the same batch size, whole forward and decode alone; the worker's "
            f"image-half cache answered {hits:.0%} of its frames, so its model work is "
            f"{'mostly decode alone' if hits > 0.5 else 'mostly the whole forward'}; "
            "stage shares of the summed stage times)", ""]  # fmt: skip
    rows = []
    for r in ip.get("worker", []):
        shares = r["stage_share"]
        rows.append([
            r["mode"], r["batch"], r["frames_per_s"],
            _ratio(r["frames_per_s"], best["frames_per_s"].get(r["batch"])),
            _ratio(r["frames_per_s"], best["decode_frames_per_s"].get(r["batch"])),
            r["host_cpu_ms_per_frame"],
            *(f"{100 * shares[s]:.0f} %" for s in ("prepare", "inference", "composite", "encode")),
        ])  # fmt: skip
    out.append(_md(rows, ["mode", "batch", "frames/s", "÷ bare", "÷ bare decode",
                          "host CPU ms/frame", "prepare", "inference", "composite",
                          "encode"]))  # fmt: skip
    mem = ip.get("memory", {})
    resident = ", ".join(ip.get("resident", [])) or "none"
    out += ["", f"**Memory**: one avatar adds {_mib_text(mem.get('avatar_loaded'))} "
            f"(frames resident: {resident}); peak reserved by the worker process "
            f"{_mib(mem.get('peak_reserved'))}", ""]  # fmt: skip
    sys_rows = []
    for r in report.get("system", []):
        b = r.get("layout_b") or {}
        trials = r.get("stream_trials", [])
        sys_rows.append([
            r["workers"], r["streams_sustained"], r.get("extra_p99_ms"),
            ", ".join(f"{t['streams']}{'✓' if t['sustained'] else '✗'}" for t in trials),
            b.get("frames_per_s"), b.get("latency_p99_ms"),
            (trials[-1] if trials else {}).get("worker_cpu_ms_per_frame"),
            b.get("worker_cpu_ms_per_frame"),
            json.dumps(r.get("gpu_memory_mib")) if r.get("gpu_memory_mib") else None,
        ])  # fmt: skip
    out += [f"**Through the system** (broker + gateway + K workers; a count of 25 fps streams "
            f"is sustained at ≥ 95 % of its frames shown and p99 extra latency < "
            f"{MAX_EXTRA_P99_MS:.0f} ms)", ""]  # fmt: skip
    out.append(_md(sys_rows, ["K", "streams sustained", "p99 extra ms", "trials",
                              "layout B frames/s", "B p99 ms", "worker CPU ms/frame (streams)",
                              "worker CPU ms/frame (B)", "GPU MiB per worker"]))  # fmt: skip
    out += ["", "**Targets**", "", _md(targets(report), ["target", "measured", "ratio", "met?"])]
    if report.get("skipped"):
        out += ["", "Skipped (time budget): " + "; ".join(report["skipped"])]
    return "\n".join(out) + "\n"


def targets(report: dict[str, Any]) -> list[list[Any]]:
    ip = report.get("in_process", {})
    bare = [r for r in ip.get("bare", []) if r["variant"] != "fp32"] or ip.get("bare", [])
    best = max(bare, key=lambda r: r["frames_per_s"], default=None)
    bare_fps = best["frames_per_s"] if best else None
    rows: list[list[Any]] = []
    if best and bare_fps is not None:
        rows.append(["bare model fp16 ≥ 2,500 frames/s at its best batch",
                     f"{bare_fps:,.0f} ({best['variant']}, batch {best['batch']})",
                     _ratio(bare_fps, 2500), _yes(bare_fps >= 2500)])  # fmt: skip
    # The reference is what the worker ran: decode alone where its image-half cache
    # answered most frames, else the whole forward.
    key = "decode_frames_per_s" if _hit_rate(ip) > 0.5 else "frames_per_s"
    ref = max(bare, key=lambda r: r[key], default=None)
    for mode, need in (("crop", 0.8), ("composite", 0.5)):
        runs = [r for r in ip.get("worker", []) if r["mode"] == mode]
        top = max(runs, key=lambda r: r["frames_per_s"], default=None)
        if top and ref:
            ratio = top["frames_per_s"] / ref[key]
            what = "decode alone" if key != "frames_per_s" else "forward"
            rows.append([f"whole worker, {mode}: ≥ {need} of the bare model",
                         f"{top['frames_per_s']:,.0f} (batch {top['batch']}) / "
                         f"{ref[key]:,.0f} frames/s (bare {what}, {ref['variant']}, batch "
                         f"{ref['batch']})", round(ratio, 2), _yes(ratio >= need)])  # fmt: skip
    streams = max((r["streams_sustained"] for r in report.get("system", [])), default=None)
    if streams is not None:
        rows.append(["≥ 100 concurrent 25 fps streams, p99 extra < 100 ms", streams,
                     _ratio(streams, 100), _yes(streams >= 100)])  # fmt: skip
    cpu = min((r["host_cpu_ms_per_frame"] for r in ip.get("worker", []) if r["mode"] == "crop"),
              default=None)  # fmt: skip
    if cpu is not None:
        rows.append(["host CPU per frame < 0.2 ms (whole worker, crop, best batch)",
                     f"{cpu:.3f} ms", _ratio(cpu, 0.2), _yes(cpu < 0.2)])  # fmt: skip
    return rows


def _best_bare(bare: list[dict[str, Any]], key: str) -> dict[int, float]:
    """Per batch size, the best variant's ``key``."""
    out: dict[int, float] = {}
    for r in bare:
        out[r["batch"]] = max(out.get(r["batch"], 0.0), float(r[key]))
    return out


def _hit_rate(ip: dict[str, Any]) -> float:
    stats = ip.get("skip_cache") or {}
    seen = stats.get("hits", 0) + stats.get("misses", 0)
    return stats.get("hits", 0) / seen if seen else 0.0


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def _mib_text(delta: dict[str, int] | None) -> str:
    if not delta:
        return "-"
    return ", ".join(f"{k} {_mib(v)}" for k, v in delta.items())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lipsync.bench.gpu", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("gpu-bench"))
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N, cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny package (CPU smoke run)")
    parser.add_argument("--workers", help="worker counts, e.g. 1,2,4")
    parser.add_argument("--budget-s", type=float, default=None, help="bound on the whole run")
    args = parser.parse_args(argv)
    s = replace(TINY if args.tiny else Settings(), device=args.device)
    if args.workers:
        s = replace(s, workers=tuple(int(x) for x in args.workers.split(",")))
    if args.budget_s is not None:
        s = replace(s, budget_s=args.budget_s)
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args.out, s)
    run.report["machine"]["command"] = shlex.join(
        ["python", "-m", "lipsync.bench.gpu", *(sys.argv[1:] if argv is None else argv)]
    )
    package = run.package()
    ip = run.in_process(package)
    crop = [r for r in ip["worker"] if r["mode"] == "crop"]
    top = max((r["frames_per_s"] for r in crop), default=FPS)
    guess = max(1, int(0.6 * top / FPS))  # streams one worker might hold, discounted
    run.report["system"] = []
    for k in s.workers:
        if run.left() < 40:
            run.report["skipped"].append(f"system with {k} workers (time budget)")
            continue
        run.log(f"system with {k} workers")
        run.report["system"].append(run.system(package, k, guess))
    run.report["seconds"] = round(time.monotonic() - run.t0, 1)
    (args.out / "gpu_bench.json").write_text(json.dumps(run.report, indent=2) + "\n")
    text = markdown(run.report)
    (args.out / "gpu_bench.md").write_text(text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
