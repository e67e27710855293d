"""The bare-model reference for the suite, with the CPU time it took.

    python -m lipsync.bench.bare --width quarter --batches 1,4 --threads 1 --seconds 4

Runs ``workers.bench_model.bench_unet`` and ``bench_encoder`` (their code, not a copy) and
adds what they do not report: CPU seconds per frame (``time.process_time`` around the
timed calls of each cell, after a warm-up call). On a shared machine a frames/s figure
moves with the neighbours' load, while the CPU a frame costs moves much less (with one
torch thread: no OpenMP spinning to count), so the suite also compares CPU per frame: the
bare model's against the whole pipeline's. Prints one JSON object, shaped like
``bench_model --json``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from typing import Any

import torch

from workers.bench_model import bench_encoder, bench_unet
from workers.unet import resolve_device


__all__ = ["main"]

WARMUP = 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lipsync.bench.bare", description=__doc__)
    parser.add_argument("--width", default="quarter")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    opts: dict[str, Any] = dict(
        half=False, channels_last=True, seconds=args.seconds, warmup=WARMUP, min_iters=2
    )
    unet, encoder = [], []
    warm: dict[str, Any] = {**opts, "seconds": 0.0, "min_iters": 1}
    timed: dict[str, Any] = {**opts, "warmup": 0}
    for b in (int(x) for x in args.batches.split(",")):
        # A first call warms the process up (allocator, oneDNN primitives for these
        # shapes); the second is timed without warm-up, so CPU counts timed calls only.
        bench_unet(args.width, [b], device, **warm)
        c0 = time.process_time()
        (r,) = bench_unet(args.width, [b], device, **timed)
        cpu = time.process_time() - c0
        unet.append({**asdict(r), "cpu_ms_per_frame": 1000 * cpu / (r.iters * b)})
        bench_encoder([b], device, **warm)
        c0 = time.process_time()
        (e,) = bench_encoder([b], device, **timed)
        cpu = time.process_time() - c0
        encoder.append({**asdict(e), "cpu_ms_per_window": 1000 * cpu / (e.iters * b)})
    report = {
        "width": args.width,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "loadavg": [round(x, 2) for x in __import__("os").getloadavg()],
        "unet": unet,
        "audio_encoder": encoder,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
