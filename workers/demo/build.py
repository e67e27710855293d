"""Build the demo package: draw the idle loop, write the videos, train (or load the
committed weights), encode the idle audio, write weights and features, rename into place.

The package is the section-6 layout, quarter width. Its own frames all have the mouth
closed; ``aud_ave.npy`` holds the trained encoder's features of a quiet recording (a faint
noise floor, not digital zeros: an all-zero window is not what the encoder calls silence),
so frames served without audio show the avatar idle with its mouth shut.

Weights: ``workers/demo/demo_weights.pth`` (committed, fp16, made by
``lipsync train-demo --seed 0 --save-weights``) is used when present and made with the
same seed; otherwise the package is trained here, which takes a few minutes on a laptop
CPU and shows a progress bar.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.audio_encoder import AudioEncoder
from workers.demo.avatar import FRAME_SIZE, RECT_SIDE
from workers.demo.dataset import IdleLoop, render_idle, speech_clips
from workers.demo.progress import Progress
from workers.demo.train import TrainConfig, train
from workers.framecache import decode_video
from workers.make_package import PackageVideos, save_checkpoints, write_metadata
from workers.mel import FPS, mel_windows, melspectrogram
from workers.package import (
    AUDIO_FEATURES,
    VIDEO_FILES,
    check_model_name,
)
from workers.unet import WIDTHS, UNet328


__all__ = [
    "DEMO_FEATHER_PX",
    "DEMO_FRAMES",
    "WEIGHTS_FILE",
    "build_demo_package",
    "idle_features",
    "load_weights",
    "save_weights",
    "train_weights",
    "write_videos",
]

DEMO_FRAMES = 100
"""Idle loop length: 4 s at 25 fps."""

DEMO_FEATHER_PX = 12
"""The demo pastes its face square with a feathered edge (``workers.paste``): with the
hard edge SyncTalk uses, a lighter square shows around the mouth of the small model."""

WEIGHTS_FILE = Path(__file__).resolve().parent / "demo_weights.pth"
"""The committed weights (fp16 UNet + encoder state dicts and how they were made)."""


def write_videos(path: Path, loop: IdleLoop) -> None:
    """The four videos of the package, written like every other package of ours."""
    with PackageVideos(path, FRAME_SIZE) as videos:
        for full, crop in zip(loop.full, loop.crops, strict=True):
            videos.write(full, crop)


def idle_features(encoder: AudioEncoder, n_frames: int, seed: int = 0) -> np.ndarray:
    """``aud_ave.npy`` for the idle loop: the encoder's features of a faint noise floor."""
    rng = np.random.default_rng(seed + 7)
    samples = int((n_frames + 8) * 16_000 / FPS)
    quiet = rng.normal(0.0, 10 ** (-72 / 20), samples).astype(np.float32)
    windows = mel_windows(melspectrogram(quiet, 16_000), n_frames, FPS)
    encoder.eval()
    with torch.no_grad():
        feats = encoder(torch.from_numpy(windows).unsqueeze(1)).numpy()
    return np.ascontiguousarray(feats, dtype=np.float32)


def train_weights(
    loop: IdleLoop,
    rois: np.ndarray,
    masked: np.ndarray,
    config: TrainConfig,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[UNet328, AudioEncoder, dict[str, Any]]:
    """Synthesise the speech and train; returns the networks and the training log."""
    clips = speech_clips(config.speech_seconds, config.clip_seconds, config.seed)
    result = train(rois, masked, loop.poses, clips, config, progress=progress, log=log)
    return result.unet, result.encoder, result.log


def save_weights(path: Path, unet: UNet328, encoder: AudioEncoder, meta: dict[str, Any]) -> None:
    """Both state dicts in fp16 (half the bytes; they load into fp32 modules unchanged)."""

    def half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}

    blob = {"unet": half(unet.state_dict()), "encoder": half(encoder.state_dict()), "meta": meta}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def load_weights(path: Path = WEIGHTS_FILE) -> tuple[UNet328, AudioEncoder, dict[str, Any]]:
    """Read weights saved by ``save_weights`` into fp32 modules in eval mode."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    meta = dict(blob.get("meta", {}))
    unet = UNet328(WIDTHS[meta.get("width", "quarter")])
    unet.load_state_dict(blob["unet"], strict=True)
    encoder = AudioEncoder()
    encoder.load_state_dict(blob["encoder"], strict=True)
    return unet.eval(), encoder.eval(), meta


def _stderr(msg: str) -> None:
    print(f"demo: {msg}", file=sys.stderr, flush=True)


def build_demo_package(
    models_dir: str | os.PathLike[str],
    name: str = "demo",
    seed: int = 0,
    progress: bool = True,
    *,
    retrain: bool = False,
    config: TrainConfig | None = None,
    save_to: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the demo package ``models_dir/name`` and return its path.

    Uses the committed weights when they exist for ``seed`` (seconds), else trains them
    (minutes; ``retrain=True`` always trains). ``save_to`` also writes the trained weights
    there (what refreshes the committed file). Built in a hidden directory and renamed
    into place; an existing package is kept unless ``overwrite``.
    """
    check_model_name(name)
    root = Path(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists")
    say = _stderr if progress else (lambda _m: None)
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.monotonic()
    try:
        (tmp / "cache").mkdir(parents=True)
        (tmp / "checkpoint").mkdir()
        loop = render_idle(DEMO_FRAMES, seed)
        write_videos(tmp, loop)
        cfg = config or TrainConfig(seed=seed)
        meta: dict[str, Any]
        committed = None if retrain or config is not None else _committed(seed, say)
        if committed is not None:
            unet, encoder, meta = committed
            say(f"using the committed weights ({WEIGHTS_FILE.name})")
        else:
            say("training the demo avatar on this CPU (a few minutes, once)")
            rois = decode_video(tmp / VIDEO_FILES["rois_320"])
            masked = decode_video(tmp / VIDEO_FILES["model_inputs"])
            bar = Progress(cfg.units(), enabled=progress)
            unet, encoder, history = train_weights(loop, rois, masked, cfg, bar, say)
            bar.close(f"done in {history['seconds']:.0f}s")
            meta = {
                "seed": seed,
                "width": cfg.width,
                "torch": str(torch.__version__),
                "command": f"lipsync train-demo --seed {seed}",
                "train": history,
            }
            if save_to is not None:
                save_weights(Path(save_to), unet, encoder, meta)
                say(f"weights saved to {save_to}")
        np.save(tmp / AUDIO_FEATURES, idle_features(encoder, len(loop), seed))
        save_checkpoints(tmp, unet, encoder)
        demo = {"seed": seed, "weights": meta.get("command", "")}
        extra = {
            "demo": {"frame_size": list(FRAME_SIZE), "rect_side": RECT_SIDE, **demo},
            "paste": {"feather_px": DEMO_FEATHER_PX},
        }
        write_metadata(tmp, name, loop.rects, "quarter", extra)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"package {final} ready in {time.monotonic() - t0:.0f}s")
    return final


def _committed(
    seed: int, say: Callable[[str], None]
) -> tuple[UNet328, AudioEncoder, dict[str, Any]] | None:
    """The committed weights when they exist and were made with ``seed`` (read once)."""
    if not WEIGHTS_FILE.is_file():
        return None
    try:
        unet, encoder, meta = load_weights(WEIGHTS_FILE)
    except Exception as exc:  # unreadable or old file: train instead, and say why
        say(f"cannot use {WEIGHTS_FILE.name} ({type(exc).__name__}: {exc}); training instead")
        return None
    return (unet, encoder, meta) if meta.get("seed") == seed else None
