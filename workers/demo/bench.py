"""Demo avatar benchmark: lip-sync quality on real speech and CPU frames/s of the engine.

``python -m workers.demo.bench [--models-dir DIR] [--wav FILE] [--threads 2]``

Quality: espeak-ng speech (or ``--wav``) through ``TorchBackend`` in crop mode, one layout-B
request per frame (640 ms of PCM centred on the frame, the encoder's 16 windows computed per
request); mouth opening measured on the returned crops (``avatar.mouth_opening``) against
each frame's RMS energy (Pearson r), plus the opening in silent frames.

Speed: frames/s of ``forward`` + ``encode`` (JPEG) in crop mode, batch 1/2/4, for three
audio sources: the package's own features (no encoder), a stream in steady state (one new
feature row per frame, i.e. one encoder window per frame, as a worker's per-stream row
cache gives) and layout B (16 encoder windows per frame). The bare model forward at the
same batch is the reference measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.backend import InferItem
from workers.demo.avatar import mouth_opening
from workers.demo.evaluate import load_speech, sync_report
from workers.engine import TorchBackend
from workers.mel import mel_windows, melspectrogram


__all__ = ["main", "measure_fps", "measure_sync"]

DEFAULT_TEXT = (
    '<speak>Hello, and welcome to the lip sync demo. <break time="900ms"/> The avatar opens '
    'its mouth when I speak, <break time="700ms"/> and it closes it again when I stop. '
    '<break time="1200ms"/> Numbers like one, two, three, four, and five. '
    '<break time="800ms"/> That is all for now, thank you very much.</speak>'
)
HOP = 640  # samples per video frame at 16 kHz and 25 fps


def _layout_b_items(audio16k: np.ndarray, frames: int, n_loop: int) -> list[InferItem]:
    pcm = (np.clip(audio16k, -1, 1) * 32767).astype("<i2")
    padded = np.concatenate([np.zeros(8 * HOP, "<i2"), pcm, np.zeros(8 * HOP, "<i2")])
    return [
        InferItem(
            frame_id=i % n_loop,
            mode="crop",
            audio=padded[i * HOP : (i + 16) * HOP].tobytes(),
            audio_sr=16000,
        )
        for i in range(frames)
    ]


def _run(backend: TorchBackend, items: list[InferItem], batch: int) -> list[Any]:
    out: list[Any] = []
    for s in range(0, len(items), batch):
        out.extend(backend.encode(backend.forward("demo", items[s : s + batch])))
    return out


def measure_sync(backend: TorchBackend, audio16k: np.ndarray, batch: int = 4) -> dict[str, Any]:
    """Layout-B requests for every frame of ``audio16k``; r and openings on the crops."""
    import cv2

    n_loop = backend.models()["demo"].frame_count
    frames = len(audio16k) // HOP
    items = _layout_b_items(audio16k, frames, n_loop)
    crops = []
    for res in _run(backend, items, batch):
        if isinstance(res, BaseException):
            raise res
        crop = cv2.imdecode(np.frombuffer(res.jpeg, np.uint8), cv2.IMREAD_COLOR)
        if crop is None:
            raise ValueError("the engine answered with an unreadable JPEG")
        crops.append(crop)
    report = sync_report(np.stack(crops), audio16k)
    openings = [mouth_opening(c) for c in crops]
    return {"report": report, "crops": crops, "most_open": int(np.argmax(openings))}


def measure_fps(
    backend: TorchBackend,
    audio16k: np.ndarray,
    batches: tuple[int, ...] = (1, 2, 4),
    seconds: float = 6.0,
) -> list[dict[str, Any]]:
    """Frames/s per batch size and audio source (see the module docstring)."""
    m = backend._models["demo"]  # the bench reads the engine's loaded model directly
    n_loop = m.info.frame_count
    frames = len(audio16k) // HOP
    layout_b = _layout_b_items(audio16k, frames, n_loop)
    mel = melspectrogram(audio16k)
    windows = mel_windows(mel, frames)
    rows: list[dict[str, Any]] = []
    for batch in batches:
        row: dict[str, Any] = {"batch": batch}
        # Bare model: the UNet forward alone on a fixed batch (the reference).
        x = torch.rand(batch, 6, 320, 320)
        a = torch.rand(batch, 32, 16, 16)
        row["bare_model"] = _rate(lambda x=x, a=a: m.net(x, a), batch, seconds)
        own = [InferItem(frame_id=i % n_loop, mode="crop") for i in range(batch)]
        row["own_features"] = _rate(
            lambda own=own: backend.encode(backend.forward("demo", own)), batch, seconds
        )

        # Stream steady state: each frame brings one new feature row (one encoder window);
        # the other 15 rows of its window come from the stream's row cache, which costs
        # what the package's own table does.
        def stream_step(batch: int = batch, own: list[InferItem] = own) -> None:
            assert m.featurizer is not None
            m.featurizer.encode(windows[:batch])
            backend.encode(backend.forward("demo", own))

        row["stream"] = _rate(stream_step, batch, seconds)
        chunk = layout_b[:batch]
        row["layout_b"] = _rate(
            lambda chunk=chunk: backend.encode(backend.forward("demo", chunk)), batch, seconds
        )
        rows.append(row)
    return rows


def _rate(fn: Any, batch: int, seconds: float) -> float:
    with torch.inference_mode():
        fn()
        n = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn()
            n += 1
        return round(n * batch / (time.perf_counter() - start), 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models-dir", help="holds the demo package (default: build one in a temp dir)"
    )
    ap.add_argument("--wav", help="speech to play (default: espeak-ng of a built-in text)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=6.0, help="per fps measurement")
    ap.add_argument("--png", default="/tmp/demo_mouth_open.png", help="save the most open crop")
    ap.add_argument("--json", help="write the numbers here too")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="demo-bench-")
    try:
        models = Path(args.models_dir) if args.models_dir else Path(tmp) / "models"
        if not (models / "demo").is_dir():
            from workers.demo.build import build_demo_package

            build_demo_package(models, name="demo", progress=True)
        wav = args.wav
        if wav is None:
            wav = os.path.join(tmp, "speech.wav")
            subprocess.run(["espeak-ng", "-m", "-w", wav, DEFAULT_TEXT], check=True)
        audio = load_speech(wav)
        backend = TorchBackend(models, device="cpu", max_batch=4, threads=args.threads)
        backend.load("demo")
        sync = measure_sync(backend, audio)
        rep = sync["report"]
        import cv2

        cv2.imwrite(args.png, sync["crops"][sync["most_open"]])
        print(
            f"lip-sync on {rep.frames} frames ({rep.silent_frames} silent): r = {rep.r:.3f} "
            f"(speech frames only {rep.r_speech:.3f}); opening loud {rep.open_speech:.3f}, "
            f"silent {rep.open_silence:.4f}; most open frame saved to {args.png}"
        )
        fps = measure_fps(backend, audio, seconds=args.seconds)
        cpu = platform.processor() or platform.machine()
        print(f"crop mode, frames/s on {args.threads} thread(s), {cpu}:")
        print("batch  bare-model  own-features  stream(1 window/frame)  layout-B(16 windows/frame)")
        for row in fps:
            print(
                f"{row['batch']:5d}  {row['bare_model']:10.1f}  {row['own_features']:12.1f}  "
                f"{row['stream']:22.1f}  {row['layout_b']:26.1f}"
            )
        if args.json:
            numbers = {"sync": {k: getattr(rep, k) for k in rep.__slots__}, "fps": fps}
            Path(args.json).write_text(json.dumps(numbers, indent=2) + "\n")
        backend.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
