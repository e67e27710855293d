"""The demo avatar: drawing, speech synthesis, the package, and that it lip-syncs.

The lip-sync check plays real speech (espeak-ng, skipped when it is not installed) through
the engine on the package built from the committed weights, and measures the mouth on the
output frames. The full training run is behind ``slow``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from workers.demo.avatar import (
    FRAME_SIZE,
    Mouth,
    crop_328,
    draw_frame,
    face_rect,
    idle_poses,
    mouth_opening,
)
from workers.demo.evaluate import load_speech, pearson, sync_report
from workers.demo.speech import frame_db, frame_rms, opening_from_audio, synthesize


ROOT = Path(__file__).resolve().parents[1]

SPEECH = (
    '<speak>Hello, and welcome to the demo. <break time="900ms"/> '
    "The avatar opens its mouth when I speak, "
    '<break time="800ms"/> and closes it when I stop.</speak>'
)


def _mouth(opening: float, width: float = 1.0, pose_index: int = 0) -> float:
    pose = idle_poses(20, seed=0)[pose_index]
    return mouth_opening(crop_328(draw_frame(pose, Mouth(opening, width)), face_rect(pose)))


def test_drawn_mouth_opening_is_measurable_and_monotonic() -> None:
    values = [_mouth(o) for o in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert values[0] < 0.002  # closed: the lip line is not "dark"
    assert all(b > a for a, b in zip(values, values[1:], strict=False)), values
    assert values[-1] > 0.08


def test_face_rect_follows_the_head_and_stays_in_frame() -> None:
    poses = idle_poses(100, seed=0)
    rects = np.array([face_rect(p) for p in poses])
    assert (rects[:, 2] - rects[:, 0] == rects[:, 3] - rects[:, 1]).all()
    assert rects.min() >= 0 and rects[:, 2:].max() <= min(FRAME_SIZE)
    assert np.ptp(rects[:, 0]) > 2  # the head moves
    assert np.abs(np.diff(rects[:, 0])).max() <= 2  # smoothly, and loops without a jump
    assert abs(int(rects[0, 0]) - int(rects[-1, 0])) <= 2
    assert max(p.blink for p in poses) > 0.9


def test_synthetic_speech_has_pauses_and_opening_follows_loudness() -> None:
    speech = synthesize(12.0, seed=3)
    assert speech.audio.dtype == np.float32 and np.abs(speech.audio).max() <= 1.0
    assert speech.n_frames == 300
    db = frame_db(speech.audio)
    silent = db < -60
    assert 0.1 < silent.mean() < 0.6  # phrases and pauses
    assert (speech.opening[silent] < 0.05).all()
    assert speech.opening.max() > 0.6
    assert pearson(speech.opening, frame_rms(speech.audio)) > 0.7
    assert speech.width.min() < 0.85 and speech.width.max() > 1.1  # rounded and spread vowels
    again = synthesize(12.0, seed=3)
    assert np.array_equal(again.audio, speech.audio)


def test_opening_from_audio_closed_in_silence() -> None:
    quiet = np.random.default_rng(0).normal(0, 1e-4, 16000).astype(np.float32)
    assert opening_from_audio(quiet).max() == 0.0
    tone = (0.1 * np.sin(2 * np.pi * 220 * np.arange(16000) / 16000)).astype(np.float32)
    assert opening_from_audio(tone).min() > 0.5


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo package, built from the committed weights (seconds, no training)."""
    from workers.demo.build import WEIGHTS_FILE, build_demo_package

    if not WEIGHTS_FILE.is_file():
        pytest.skip(f"{WEIGHTS_FILE.name} not present: run `lipsync train-demo --save-weights`")
    models = tmp_path_factory.mktemp("demo-models")
    build_demo_package(models, name="demo", seed=0, progress=False)
    return models


def test_demo_package_is_a_valid_quarter_width_package(demo_models: Path) -> None:
    from workers.package import load_package

    pkg = load_package(demo_models, "demo")
    assert pkg.frame_count == 100
    assert tuple(pkg.channels) == (8, 16, 32, 64, 128)
    assert pkg.encoder_checkpoint is not None
    assert pkg.audio_features.shape == (100, 512)
    info = json.loads((demo_models / "demo" / "package_info.json").read_text())
    want = {"arch": "unet328", "audio_mode": "ave", "channels": [8, 16, 32, 64, 128]}
    assert info["model"] == want
    assert pkg.feather_px == 12 and info["paste"] == {"feather_px": 12}  # a soft seam
    assert not list(demo_models.glob(".demo.tmp-*"))


def test_demo_package_refuses_to_overwrite(demo_models: Path) -> None:
    from workers.demo.build import build_demo_package

    with pytest.raises(FileExistsError):
        build_demo_package(demo_models, name="demo", progress=False)


@pytest.fixture(scope="module")
def backend(demo_models: Path):
    from workers.engine import TorchBackend

    be = TorchBackend(demo_models, device="cpu", max_batch=4)
    be.load("demo")
    try:
        yield be
    finally:
        be.close()


def _render(backend, items) -> list[np.ndarray]:
    out = []
    for start in range(0, len(items), 4):
        chunk = items[start : start + 4]
        for image in backend.render(backend.forward("demo", chunk)):
            assert not isinstance(image, BaseException), image
            out.append(image)
    return out


def test_idle_frames_keep_the_mouth_closed(backend) -> None:
    from workers.backend import InferItem

    frames = _render(backend, [InferItem(frame_id=i, mode="crop") for i in range(0, 100, 9)])
    openings = [mouth_opening(f) for f in frames]
    assert max(openings) < 0.01, openings


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_mouth_follows_real_speech_through_the_engine(backend, tmp_path: Path) -> None:
    """espeak-ng speech, layout B (640 ms of audio per frame, centred on it), crop mode."""
    from workers.backend import InferItem

    wav = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-m", "-w", str(wav), SPEECH], check=True)
    audio = load_speech(wav)  # 16 kHz float
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    hop = 640  # samples per frame at 16 kHz, 25 fps
    n = len(audio) // hop
    padded = np.concatenate([np.zeros(8 * hop, "<i2"), pcm, np.zeros(8 * hop, "<i2")])
    items = [
        InferItem(
            frame_id=i % 100,
            mode="crop",
            audio=padded[i * hop : (i + 16) * hop].tobytes(),
            audio_sr=16000,
        )
        for i in range(n)
    ]
    report = sync_report(np.stack(_render(backend, items)), audio)
    assert report.r >= 0.6, report
    # Drawn openings for scale: 0.25 open measures 0.033, 0.1 open 0.009, closed 0.
    assert report.open_speech > 0.03, report  # the loudest quarter of frames: open
    assert report.open_silence < 0.005, report  # silence: closed


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_demo_quick_is_reproducible(tmp_path: Path) -> None:
    """``lipsync train-demo --quick`` twice with one seed: identical weights, a loadable
    package. (The full run takes minutes; its result is the committed file.)"""
    import torch

    states = []
    for k in range(2):
        models = tmp_path / f"m{k}"
        out = subprocess.run(
            [sys.executable, "-m", "lipsync", "train-demo", "--quick", "--models-dir", str(models)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=280,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        states.append(torch.load(models / "demo/checkpoint/best_trainloss.pth", weights_only=True))
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_committed_weights_come_from_the_current_training_defaults() -> None:
    """The committed file records the command and configuration that made it; they must be
    today's defaults (else re-run ``lipsync train-demo --seed 0 --save-weights``)."""
    from dataclasses import asdict

    import torch

    from workers.demo.build import WEIGHTS_FILE
    from workers.demo.train import TrainConfig

    meta = torch.load(WEIGHTS_FILE, map_location="cpu", weights_only=True)["meta"]
    assert meta["command"] == "lipsync train-demo --seed 0"
    assert meta["seed"] == 0 and meta["width"] == "quarter"
    assert meta["train"]["config"] == asdict(TrainConfig())
