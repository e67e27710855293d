"""Bare-model benchmark: UNet-328 forward frames/s per width and batch size, and the audio
encoder's time per window, on one device. No I/O, no JPEG, no sockets: this is the ceiling
the serving pipeline is measured against (DESIGN.md section 8).

    python -m workers.bench_model [--widths full,half,quarter] [--batches 1,2,4,8]
                                  [--device auto] [--seconds S] [--json out.json]

Weights are random (speed does not depend on them). Each cell runs ``--warmup`` untimed
forwards first (cuDNN autotuning, allocator growth, lazy init), then forwards until
``--seconds`` have passed and at least ``--min-iters`` ran, under ``torch.inference_mode``.
Defaults: fp16 on CUDA, fp32 on CPU (``--dtype``); channels_last on both (``--channels-last``;
it measured ~1.4x faster than NCHW on CPU too). On CUDA each timed call ends with
``torch.cuda.synchronize()``. Times are medians over the timed calls; the fastest call is
printed too ("best"), which is what the model can do when a shared machine is quiet.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import torch

from workers.audio_encoder import AudioEncoder
from workers.unet import IMAGE_SIZE, WIDTHS, UNet328, prepare_module, resolve_device


__all__ = ["EncoderResult", "Result", "bench_encoder", "bench_unet", "main"]


@dataclass(slots=True)
class Result:
    width: str
    batch: int
    iters: int
    ms_per_batch: float  # median
    ms_per_frame: float  # median
    frames_per_s: float  # from the median
    best_ms_per_frame: float  # fastest call: the machine's capacity when nobody else is busy
    speedup_vs_b1: float = 1.0  # median frames/s ÷ median frames/s at batch 1, same width
    cached_ms_per_frame: float | None = None  # decode only (image half cached), median


@dataclass(slots=True)
class EncoderResult:
    batch: int
    iters: int
    ms_per_batch: float  # median
    ms_per_window: float  # median
    windows_per_s: float  # from the median
    best_ms_per_window: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(
    fn: Callable[[], object], device: torch.device, warmup: int, seconds: float, min_iters: int
) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then until ``seconds`` have passed and at least
    ``min_iters`` ran; return each timed call's seconds. Callers report the median, which
    shrugs off the odd call slowed by a neighbour on a shared machine."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        t1 = time.perf_counter()
        times.append(t1 - t0)
        if len(times) >= min_iters and t1 - start >= seconds:
            return times


def _time_alternating(
    fns: Sequence[Callable[[], object]],
    device: torch.device,
    warmup: int,
    seconds: float,
    min_iters: int,
) -> list[list[float]]:
    """``_time`` for several functions called in turn, one list of seconds each: a
    neighbour that slows the machine for a while slows all of them alike."""
    times: list[list[float]] = [[] for _ in fns]
    turn = [0]

    def one() -> None:
        k = turn[0] % len(fns)
        turn[0] += 1
        t0 = time.perf_counter()
        fns[k]()
        _sync(device)
        times[k].append(time.perf_counter() - t0)

    _time(one, device, warmup * len(fns), seconds, min_iters * len(fns))
    return [t[warmup:] for t in times]


def bench_unet(
    width: str,
    batches: Sequence[int],
    device: torch.device,
    *,
    half: bool,
    channels_last: bool,
    seconds: float,
    warmup: int,
    min_iters: int,
    cached: bool = False,
) -> list[Result]:
    """Per batch size, the whole forward; with ``cached``, also ``decode`` alone (what a
    worker runs once ``workers.skipcache`` holds the frames' image half), timed in
    alternation with the whole forward so that both see the same machine."""
    model = cast(
        UNet328,
        prepare_module(UNet328(WIDTHS[width]), device, half=half, channels_last=channels_last),
    )
    dtype = torch.float16 if half else torch.float32
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    results: list[Result] = []
    with torch.inference_mode():
        for b in batches:
            image = torch.rand(b, 6, IMAGE_SIZE, IMAGE_SIZE, device=device, dtype=dtype)
            image = image.contiguous(memory_format=fmt)
            audio = torch.rand(b, 32, 16, 16, device=device, dtype=dtype)

            def forward() -> object:
                return model(image, audio)  # noqa: B023

            def decode() -> object:
                return model.decode(skips, audio)  # noqa: B023

            skips = model.encode_image(image)
            fns = [forward, decode] if cached else [forward]
            full, *rest = _time_alternating(fns, device, warmup, seconds, min_iters)
            ms = 1000.0 * statistics.median(full)
            best = 1000.0 * min(full) / b
            r = Result(width, b, len(full), ms, ms / b, 1000.0 * b / ms, best)
            if rest:
                r.cached_ms_per_frame = 1000.0 * statistics.median(rest[0]) / b
            results.append(r)
    base = next((r.frames_per_s for r in results if r.batch == 1), None)
    for r in results:
        r.speedup_vs_b1 = r.frames_per_s / base if base else float("nan")
    return results


def bench_encoder(
    batches: Sequence[int],
    device: torch.device,
    *,
    half: bool,
    channels_last: bool,
    seconds: float,
    warmup: int,
    min_iters: int,
) -> list[EncoderResult]:
    encoder = prepare_module(AudioEncoder(), device, half=half, channels_last=channels_last)
    dtype = torch.float16 if half else torch.float32
    out: list[EncoderResult] = []
    with torch.inference_mode():
        for b in batches:
            mel = torch.rand(b, 1, 80, 16, device=device, dtype=dtype) * 8 - 4
            times = _time(lambda: encoder(mel), device, warmup, seconds, min_iters)  # noqa: B023
            ms = 1000.0 * statistics.median(times)
            best = 1000.0 * min(times) / b
            out.append(EncoderResult(b, len(times), ms, ms / b, 1000.0 * b / ms, best))
    return out


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} torch threads"


def _load() -> float:
    """1-minute load average: on a shared machine, read the numbers next to it."""
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on Windows
        return float("nan")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.bench_model", description=__doc__)
    parser.add_argument("--widths", default="full,half,quarter")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per cell")
    parser.add_argument("--warmup", type=int, default=None, help="untimed forwards (1 cpu, 5 cuda)")
    parser.add_argument("--min-iters", type=int, default=2)
    parser.add_argument(
        "--dtype",
        choices=["auto", "fp32", "fp16"],
        default="auto",
        help="auto: fp16 on cuda, fp32 on cpu",
    )
    parser.add_argument(
        "--channels-last",
        choices=["on", "off"],
        default="on",
        help="NHWC weights and inputs (default on)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--encoder-batches", default="1,16", help="audio encoder batch sizes")
    parser.add_argument(
        "--image-cache",
        action="store_true",
        help="also time decode alone (the image half cached, workers.skipcache), alternated",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    arglist = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(arglist)

    widths = [w.strip() for w in args.widths.split(",") if w.strip()]
    unknown = [w for w in widths if w not in WIDTHS]
    if unknown:
        parser.error(f"unknown width {unknown[0]!r} (known: {', '.join(WIDTHS)})")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    half = args.dtype == "fp16" or (args.dtype == "auto" and cuda)
    if half and not cuda:
        parser.error("fp16 needs a cuda device")
    channels_last = args.channels_last == "on"
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    if cuda:
        torch.backends.cudnn.benchmark = True
    opts = dict(seconds=args.seconds, warmup=warmup, min_iters=args.min_iters)

    head = (
        f"device {device} ({machine(device)}), torch {torch.__version__}, "
        f"{'fp16' if half else 'fp32'}, channels_last {'on' if channels_last else 'off'}"
    )
    load_before = _load()
    print(f"{head}, load average {load_before:.2f}", flush=True)
    print(
        f"{'width':<8} {'params':>10} {'batch':>5} {'iters':>5} {'ms/batch':>9} "
        f"{'ms/frame':>9} {'frames/s':>9} {'x b1':>5} {'best ms/fr':>10}"
        + (f" {'cached ms/fr':>12} {'x':>5}" if args.image_cache else ""),
        flush=True,
    )
    results: list[Result] = []
    for width in widths:
        params = sum(p.numel() for p in UNet328(WIDTHS[width]).parameters())
        rows = bench_unet(
            width,
            _ints(args.batches),
            device,
            half=half,
            channels_last=channels_last,
            cached=args.image_cache,
            **opts,
        )
        for r in rows:
            cached = ""
            if r.cached_ms_per_frame is not None:
                ratio = r.ms_per_frame / r.cached_ms_per_frame
                cached = f" {r.cached_ms_per_frame:>12.1f} {ratio:>5.2f}"
            print(
                f"{r.width:<8} {params:>10,} {r.batch:>5} {r.iters:>5} {r.ms_per_batch:>9.1f} "
                f"{r.ms_per_frame:>9.1f} {r.frames_per_s:>9.2f} {r.speedup_vs_b1:>5.2f} "
                f"{r.best_ms_per_frame:>10.1f}{cached}",
                flush=True,
            )
        results.extend(rows)

    enc = bench_encoder(
        _ints(args.encoder_batches), device, half=half, channels_last=channels_last, **opts
    )
    print(
        f"\n{'audio encoder':<14} {'batch':>5} {'iters':>5} {'ms/batch':>9} {'ms/window':>9} "
        f"{'windows/s':>9} {'best ms/win':>11}"
    )
    for e in enc:
        print(
            f"{'':<14} {e.batch:>5} {e.iters:>5} {e.ms_per_batch:>9.2f} "
            f"{e.ms_per_window:>9.2f} {e.windows_per_s:>9.1f} {e.best_ms_per_window:>11.2f}"
        )

    if args.json:
        report = {
            "command": shlex.join(["python", "-m", "workers.bench_model", *arglist]),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "device": str(device),
            "machine": machine(device),
            "torch": torch.__version__,
            "dtype": "fp16" if half else "fp32",
            "channels_last": channels_last,
            "warmup": warmup,
            "load_average": [load_before, _load()],
            "unet": [asdict(r) for r in results],
            "audio_encoder": [asdict(e) for e in enc],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    print(f"load average after: {_load():.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
