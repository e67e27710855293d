"""The in-process half of the GPU benchmark: the bare model and the whole worker, one
device, no sockets. ``python -m lipsync.bench.gpu`` runs it (in a process of its own, so
that its memory is gone before the system half starts workers on the same GPU) and adds
the system half; it can also run alone:

    python -m workers.bench_gpu --models-dir M --model NAME [--device auto]
        [--batches 1,2,4,8,16,32] [--seconds 1.0] [--json out.json]

- **bare model**: UNet-328 at the package's width, frames/s per batch size, for fp32, fp16
  and fp16 replayed from CUDA graphs (``workers.graphs``; fp16 and graphs need CUDA). Each
  row also times ``decode`` alone: what a worker runs for a frame whose image half it has
  cached (``workers.skipcache``).
- **whole worker**: the real ``TorchBackend`` on the package (its defaults for the device:
  on CUDA resident frames, graphs, tensor paste-back, nvJPEG where installed), ``forward``
  on this thread and ``encode`` on a second one with two batches in flight, as the
  worker's runtime runs them, in crop and composite mode; frames/s, the host CPU per frame
  (the process's CPU time over the frames, every thread counted), and the time per frame of
  each stage (``prepare``: audio windows and staging; ``inference``; ``composite``:
  paste-back; ``encode``: JPEG). On CUDA the first three are device time between events
  on the worker's stream, which includes the device waiting for the host; on CPU they are
  host time.
- **memory**: on CUDA, the device memory one avatar adds when it is loaded and warmed up
  (``torch.cuda.memory_allocated`` and ``memory_reserved``), and the peak reserved by the
  process; on CPU, the resident set size added.

Prints one JSON object on its last line of output (and writes it with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import psutil
import torch

from workers.backend import InferItem, Mode
from workers.bench_model import _time, machine
from workers.engine import TorchBackend
from workers.graphs import StaticRunner
from workers.package import load_package
from workers.unet import IMAGE_SIZE, UNet328, prepare_module, resolve_device, width_name


__all__ = ["bench_bare", "bench_worker", "main"]

MODES: tuple[Mode, ...] = ("crop", "composite")
STAGES = ("prepare", "inference", "composite", "encode")


def _rate(times: list[float], batch: int) -> float:
    return round(batch / statistics.median(times), 2)


def bench_bare(
    channels: Sequence[int],
    batches: Sequence[int],
    device: torch.device,
    *,
    seconds: float,
    warmup: int,
) -> list[dict[str, Any]]:
    """Frames/s of the forward and of ``decode`` alone, per variant and batch size."""
    variants = [("fp32", False, False)]
    if device.type == "cuda":
        variants += [("fp16", True, False), ("fp16+graphs", True, True)]
    rows: list[dict[str, Any]] = []
    for name, half, graphs in variants:
        net = cast(UNet328, prepare_module(UNet328(channels), device, half=half))
        for b in batches:
            row = {"variant": name, "batch": b}
            row.update(_bare_cell(net, b, device, half, graphs, seconds, warmup))
            rows.append(row)
            print(json.dumps({"bare": row}), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _bare_cell(
    net: UNet328,
    b: int,
    device: torch.device,
    half: bool,
    graphs: bool,
    seconds: float,
    warmup: int,
) -> dict[str, Any]:
    dtype = torch.float16 if half else torch.float32
    with torch.inference_mode():
        image = torch.rand(b, 6, IMAGE_SIZE, IMAGE_SIZE, device=device, dtype=dtype)
        image = image.contiguous(memory_format=torch.channels_last)
        audio = torch.rand(b, 32, 16, 16, device=device, dtype=dtype)
        skips = net.encode_image(image)
        if graphs:
            whole = StaticRunner(net, [image, audio], [b], graphs=True)
            part = StaticRunner(
                lambda *t: net.decode(t[:-1], t[-1]), [*skips, audio], [b], graphs=True
            )
            inputs, part_inputs = [image, audio], [*skips, audio]
            t_fwd = _time(lambda: whole.run(inputs), device, warmup, seconds, 2)
            t_dec = _time(lambda: part.run(part_inputs), device, warmup, seconds / 2, 2)
            graphed: dict[str, Any] = {"graphed": whole.graphed and part.graphed}
            whole.release()
            part.release()
        else:
            t_fwd = _time(lambda: net(image, audio), device, warmup, seconds, 2)
            t_dec = _time(lambda: net.decode(skips, audio), device, warmup, seconds / 2, 2)
            graphed = {}
    return {
        "frames_per_s": _rate(t_fwd, b),
        "decode_frames_per_s": _rate(t_dec, b),
        "iters": len(t_fwd),
        **graphed,
    }


def bench_worker(
    backend: TorchBackend, model: str, mode: Mode, batch: int, seconds: float
) -> dict[str, Any]:
    """The worker's frames/s in ``mode`` at ``batch``: forward here, encode on a second
    thread, at most two batches between them (the runtime's ``ENCODE_DEPTH``)."""
    n = backend.models()[model].frame_count
    handoff: queue.Queue[Any] = queue.Queue(maxsize=2)
    stages = dict.fromkeys(STAGES, 0.0)
    count = {"frames": 0, "failed": 0, "batches": 0}
    lock = threading.Lock()
    next_id = 0

    def encoder() -> None:
        while True:
            fb = handoff.get()
            if fb is None:
                return
            results = backend.encode(fb)
            with lock:
                for key, ms in backend.stages(fb).items():
                    stages[key] += ms
                count["frames"] += sum(1 for r in results if not isinstance(r, BaseException))
                count["failed"] += sum(1 for r in results if isinstance(r, BaseException))
                count["batches"] += 1

    def submit() -> None:
        nonlocal next_id
        items = [InferItem(frame_id=(next_id + j) % n, mode=mode) for j in range(batch)]
        next_id += batch
        handoff.put(backend.forward(model, items))

    thread = threading.Thread(target=encoder, daemon=True)
    thread.start()
    warm = max(2, -(-n // batch))  # every frame seen once, every shape run
    for _ in range(warm):
        submit()
    while True:  # until the warm-up batches are encoded
        with lock:
            if count["batches"] >= warm:
                stages.update(dict.fromkeys(STAGES, 0.0))
                count.update(frames=0, failed=0, batches=0)
                break
        time.sleep(0.001)
    cpu0, t0 = time.process_time(), time.perf_counter()
    sent = 0
    while time.perf_counter() - t0 < seconds or sent < 3:
        submit()
        sent += 1
    handoff.put(None)
    thread.join()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    frames = max(1, count["frames"])
    per_frame = {k: round(v / frames, 3) for k, v in stages.items()}
    total = sum(per_frame.values()) or 1.0
    return {
        "mode": mode,
        "batch": batch,
        "frames": count["frames"],
        "failed": count["failed"],
        "frames_per_s": round(count["frames"] / wall, 2),
        "host_cpu_ms_per_frame": round(1000 * cpu / frames, 3),
        "stage_ms_per_frame": per_frame,
        "stage_share": {k: round(v / total, 3) for k, v in per_frame.items()},
    }


def _memory_now(device: torch.device) -> dict[str, int]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return {
            "allocated": torch.cuda.memory_allocated(device),
            "reserved": torch.cuda.memory_reserved(device),
        }
    return {"rss": psutil.Process().memory_info().rss}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.bench_gpu", description=__doc__)
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batches", default="1,2,4,8,16,32", help="batch sizes")
    parser.add_argument("--seconds", type=float, default=1.0, help="timed seconds per cell")
    parser.add_argument("--skip-bare", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    batches = [int(x) for x in args.batches.split(",") if x.strip()]
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    package = load_package(args.models_dir, args.model)
    report: dict[str, Any] = {
        "device": str(device),
        "machine": machine(device),
        "torch": torch.__version__,
        "width": width_name(package.channels) or "custom",
        "frame_size": list(package.frame_size),
        "frames": package.frame_count,
    }
    if not args.skip_bare:
        report["bare"] = bench_bare(
            package.channels, batches, device, seconds=args.seconds, warmup=5 if cuda else 1
        )
    before = _memory_now(device)
    backend = TorchBackend(args.models_dir, device=str(device), fp16=cuda, max_batch=max(batches))
    backend.load(args.model)
    backend.warmup()
    loaded = _memory_now(device)
    report["jpeg"] = backend.jpeg_encoder
    report["resident"] = backend.resident_videos(args.model)
    report["graphed"] = backend.graphed(args.model)
    rows = []
    for mode in MODES:
        for b in batches:
            row = bench_worker(backend, args.model, mode, b, args.seconds)
            rows.append(row)
            print(json.dumps({"worker": row}), flush=True)
    report["worker"] = rows
    report["skip_cache"] = backend.skip_cache_stats(args.model)
    after = _memory_now(device)
    report["memory"] = {
        "before": before,
        "avatar_loaded": {k: loaded[k] - before[k] for k in before},
        "after_runs": after,
    }
    if cuda:
        report["memory"]["peak_reserved"] = torch.cuda.max_memory_reserved(device)
    backend.close()
    line = json.dumps(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
