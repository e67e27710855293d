"""The torch engine against an independent re-computation of DESIGN.md section 5.

The reference below reads the package with plain OpenCV / numpy / torch.load (not through
workers.package or workers.framecache) and follows the design text step by step; the
engine's pixels must equal it exactly before JPEG. The network runs on the same batch with
the same module preparation, so that float rounding is the same on both sides.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from shared.config import WorkerConfig
from shared.errors import ErrorCode, ServiceError
from workers.audio import AudioFeaturizer
from workers.backend import InferItem, InferResult
from workers.checkpoint import load_audio_encoder
from workers.engine import TorchBackend
from workers.framecache import decode_video
from workers.unet import UNet328, prepare_module


ROOT = Path(__file__).resolve().parents[1]
VIDEOS = {
    "full_body": "full_body_video.mp4",
    "crops_328": "crops_328_video.mp4",
    "rois_320": "rois_320_video.mp4",
    "model_inputs": "model_inputs_video.mp4",
}


# -- the reference ------------------------------------------------------------------------


class Reference:
    """Section 5, written out plainly for one package directory."""

    def __init__(self, package: Path) -> None:
        self.videos = {kind: decode_video(package / file) for kind, file in VIDEOS.items()}
        rects = json.loads((package / "cache" / "crop_rectangles.json").read_text())
        self.rects = {int(k): v["rect"] for k, v in rects.items()}
        self.features = np.load(package / "aud_ave.npy")
        info = json.loads((package / "package_info.json").read_text())
        net = UNet328(info["model"]["channels"])
        state = torch.load(package / "checkpoint" / "best_trainloss.pth", weights_only=True)
        net.load_state_dict(state, strict=True)
        self.net = prepare_module(net, "cpu")

    def audio(self, i: int) -> np.ndarray:
        rows = [
            self.features[j] if 0 <= j < len(self.features) else np.zeros(512, np.float32)
            for j in range(i - 8, i + 8)
        ]
        return np.stack(rows).astype(np.float32).reshape(32, 16, 16)

    def predict(self, frames: list[int], audio: list[np.ndarray]) -> np.ndarray:
        images = np.stack(
            [
                np.concatenate([self.videos["rois_320"][i], self.videos["model_inputs"][i]], 2)
                for i in frames
            ]
        )
        x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        x = x.to(torch.float32) / 255
        with torch.inference_mode():
            out = self.net(x, torch.from_numpy(np.stack(audio))).numpy()
        return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)

    def render(self, i: int, pred: np.ndarray, mode: str) -> np.ndarray:
        x1, y1, x2, y2 = self.rects[i]
        crop = self.videos["crops_328"][i].copy()
        crop[4:324, 4:324] = pred
        face = cv2.resize(crop, (x2 - x1, y2 - y1), interpolation=cv2.INTER_CUBIC)
        if mode == "crop":
            return face
        frame = self.videos["full_body"][i].copy()
        frame[y1:y2, x1:x2] = face
        return frame


def pcm_clip(seed: int, sr: int = 16000) -> bytes:
    """640 ms of a voiced, noisy signal as int16 PCM."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(0.64 * sr)) / sr
    y = 0.3 * np.sin(2 * np.pi * 150 * t) * np.sin(2 * np.pi * 3 * t) ** 2
    y += 0.02 * rng.standard_normal(len(t))
    return (y * 32767).astype("<i2").tobytes()


def code_of(result) -> ErrorCode:
    assert isinstance(result, ServiceError), result
    return result.code


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_package) -> Path:
    return tiny_package


@pytest.fixture(scope="module")
def backend(models):
    b = TorchBackend(models, device="cpu", max_batch=4)
    b.load("tiny")
    yield b
    b.close()


@pytest.fixture(scope="module")
def reference(models, backend) -> Reference:
    return Reference(models / "tiny")


def run_script(code: str, *args: object, env: dict[str, str]) -> dict:
    """Run ``code`` in a fresh Python process (its own torch and numpy) from the repo root;
    return the JSON object its last line of output holds."""
    out = subprocess.run(
        [sys.executable, "-c", code, *(str(a) for a in args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def copy_package(models: Path, dest: Path, name: str = "tiny") -> Path:
    """A private copy (frame caches excluded, so that the copy builds its own)."""
    target = dest / name
    shutil.copytree(models / "tiny", target, ignore=shutil.ignore_patterns("*.framecache*"))
    return target


# -- tests ------------------------------------------------------------------------------


def test_model_info(backend, reference):
    info = backend.models()["tiny"]
    assert info.frame_count == 16 and info.fps == 25.0
    assert info.size == (320, 240)
    assert info.bounds == tuple(float(v) for v in reference.rects[0])
    assert info.width == "quarter" and info.audio is True
    assert backend.name == "torch" and backend.device == "cpu"


def test_batch_matches_reference_and_errors_stay_in_their_slot(backend, reference):
    """First, middle and last frame, in both modes, equal section 5 pixel for pixel;
    bad items in the same batch fail alone."""
    items = [
        InferItem(frame_id=0, mode="composite"),
        InferItem(frame_id=16),  # one past the end
        InferItem(frame_id=8, mode="crop", quality=60),
        InferItem(frame_id=-1),
        InferItem(frame_id=2, quality=101),
        InferItem(frame_id=2, mode="sideways"),  # type: ignore[arg-type]
        InferItem(frame_id=15, mode="composite"),
    ]
    batch = backend.forward("tiny", items)
    codes = [None if e is None else code_of(e) for e in batch.errors]
    assert codes == [
        None,
        ErrorCode.FRAME_OUT_OF_RANGE,
        None,
        ErrorCode.FRAME_OUT_OF_RANGE,
        ErrorCode.BAD_REQUEST,
        ErrorCode.BAD_REQUEST,
        None,
    ]
    good = [0, 2, 6]
    frames = [items[k].frame_id for k in good]
    pred = reference.predict(frames, [reference.audio(i) for i in frames])

    images = backend.render(batch)
    for j, k in enumerate(good):
        expected = reference.render(items[k].frame_id, pred[j], items[k].mode)
        assert images[k].dtype == np.uint8
        assert np.array_equal(images[k], expected), f"item {k} (frame {items[k].frame_id})"
    for k in (1, 3, 4, 5):
        assert images[k] is batch.errors[k]

    results = backend.encode(batch)
    for k in good:
        result = results[k]
        assert isinstance(result, InferResult)
        x1, y1, x2, y2 = reference.rects[items[k].frame_id]
        assert result.bounds == (float(x1), float(y1), float(x2), float(y2))
        assert result.shape == "320x320x3"
        assert set(result.timings) == {"prepare", "inference", "composite", "encode"}
        decoded = cv2.imdecode(np.frombuffer(result.jpeg, np.uint8), cv2.IMREAD_COLOR)
        if items[k].mode == "crop":
            assert decoded.shape == (y2 - y1, x2 - x1, 3)  # only the rect's pixels
        else:
            assert decoded.shape == (240, 320, 3)
        # the JPEG is the rendered image, at the item's quality
        quality = items[k].quality
        ok, expected_jpeg = cv2.imencode(".jpg", images[k], [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert ok and result.jpeg == expected_jpeg.tobytes()
    assert [code_of(results[k]) for k in (1, 3, 4, 5)] == [
        ErrorCode.FRAME_OUT_OF_RANGE,
        ErrorCode.FRAME_OUT_OF_RANGE,
        ErrorCode.BAD_REQUEST,
        ErrorCode.BAD_REQUEST,
    ]


def test_unknown_model_fails_every_item(backend):
    batch = backend.forward("ghost", [InferItem(0), InferItem(1)])
    results = backend.encode(batch)
    assert [code_of(r) for r in results] == [ErrorCode.UNKNOWN_MODEL] * 2
    with pytest.raises(ServiceError) as info:
        backend.video_frame("ghost", 0, "full_body", 80)
    assert info.value.code == ErrorCode.UNKNOWN_MODEL


def test_items_with_audio(backend, reference, models):
    """An item carrying PCM uses the window computed from it (row 8 = the frame); a bad
    clip fails alone; an item without audio still uses the package's table."""
    clip = pcm_clip(1)
    items = [
        InferItem(frame_id=5, mode="crop", audio=clip, audio_sr=16000),
        InferItem(frame_id=5, mode="crop", audio=b"", audio_sr=16000),
        InferItem(frame_id=5, mode="crop", audio=clip, audio_sr=12345),
        InferItem(frame_id=5, mode="crop"),
    ]
    batch = backend.forward("tiny", items)
    assert [None if e is None else code_of(e) for e in batch.errors] == [
        None,
        ErrorCode.BAD_REQUEST,
        ErrorCode.BAD_REQUEST,
        None,
    ]
    featurizer = AudioFeaturizer(
        load_audio_encoder(models / "tiny/checkpoint/audio_visual_encoder.pth")
    )
    live = featurizer.window_from_pcm(clip, 16000)
    pred = reference.predict([5, 5], [live, reference.audio(5)])
    images = backend.render(batch)
    assert np.array_equal(images[0], reference.render(5, pred[0], "crop"))
    assert np.array_equal(images[3], reference.render(5, pred[1], "crop"))
    assert not np.array_equal(images[0], images[3])  # the audio made a difference


def test_audio_without_encoder_fails_only_that_item(models, tmp_path):
    pkg = copy_package(models, tmp_path)
    (pkg / "checkpoint" / "audio_visual_encoder.pth").unlink()
    backend = TorchBackend(tmp_path, device="cpu")
    try:
        assert backend.load("tiny").audio is False
        batch = backend.forward(
            "tiny", [InferItem(frame_id=1, audio=pcm_clip(2), audio_sr=16000), InferItem(1)]
        )
        results = backend.encode(batch)
        assert code_of(results[0]) == ErrorCode.AUDIO_UNSUPPORTED
        assert isinstance(results[1], InferResult)
    finally:
        backend.close()


def test_video_frames(backend, reference):
    for kind, frames in reference.videos.items():
        jpeg = backend.video_frame("tiny", 7, kind, 95)
        decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert decoded.shape == frames[7].shape
        assert np.abs(decoded.astype(int) - frames[7].astype(int)).mean() < 4
    cases = [
        ((7, "face", 80), ErrorCode.UNKNOWN_VIDEO),
        ((16, "full_body", 80), ErrorCode.FRAME_OUT_OF_RANGE),
        ((-1, "rois_320", 80), ErrorCode.FRAME_OUT_OF_RANGE),
        ((0, "rois_320", 0 - 5), ErrorCode.BAD_REQUEST),
    ]
    for args, code in cases:
        with pytest.raises(ServiceError) as info:
            backend.video_frame("tiny", *args)
        assert info.value.code == code, args


def test_from_config_skips_broken_package(models, tmp_path, caplog):
    """One broken package is logged with its reason; the others load; load() says why."""
    copy_package(models, tmp_path, "good")
    broken = copy_package(models, tmp_path, "broken")
    (broken / "rois_320_video.mp4").unlink()
    config = WorkerConfig(models_dir=str(tmp_path), device="cpu", max_batch=2)
    with caplog.at_level("ERROR", logger="workers.engine"):
        backend = TorchBackend.from_config(config)
    try:
        assert set(backend.models()) == {"good"}
        assert "broken: rois_320_video.mp4: missing" in caplog.text
        with pytest.raises(ServiceError) as info:
            backend.load("broken")
        assert info.value.code == ErrorCode.BAD_REQUEST
        assert "rois_320_video.mp4: missing" in info.value.message
        for name, code in [("ghost", ErrorCode.UNKNOWN_MODEL), ("../x", ErrorCode.BAD_REQUEST)]:
            with pytest.raises(ServiceError) as info:
                backend.load(name)
            assert info.value.code == code, name
        backend.warmup()  # one batch per model; the model stays
        assert set(backend.models()) == {"good"}
    finally:
        backend.close()

    only = TorchBackend.from_config(
        WorkerConfig(models_dir=str(tmp_path), device="cpu", models="good, ghost")
    )
    assert set(only.models()) == {"good"}
    only.close()


def test_unload_keeps_batches_in_flight_and_reload_maps_the_cache(models, tmp_path):
    copy_package(models, tmp_path)
    backend = TorchBackend(tmp_path, device="cpu")
    backend.load("tiny")
    assert all(backend.decoded_videos("tiny").values())  # a fresh copy: decoded here
    batch = backend.forward("tiny", [InferItem(3, mode="crop")])
    backend.unload("tiny")
    assert backend.models() == {}
    result = backend.encode(batch)[0]  # forward's state outlives the unload
    assert isinstance(result, InferResult) and result.jpeg[:2] == b"\xff\xd8"
    assert code_of(backend.forward("tiny", [InferItem(0)]).errors[0]) == ErrorCode.UNKNOWN_MODEL
    with pytest.raises(ServiceError) as info:
        backend.unload("tiny")
    assert info.value.code == ErrorCode.UNKNOWN_MODEL
    backend.load("tiny")
    assert not any(backend.decoded_videos("tiny").values())  # mapped, not decoded again
    backend.load("tiny")  # reload in place
    assert list(backend.models()) == ["tiny"]
    backend.close()


LOADER = """
import json, os, sys
from workers.engine import TorchBackend
backend = TorchBackend(sys.argv[1], device="cpu")
backend.load("tiny")
cache = os.path.join(sys.argv[1], "tiny", "cache")
stats = {f: os.stat(os.path.join(cache, f)) for f in os.listdir(cache) if f.endswith("cache")}
print(json.dumps({
    "decoded": backend.decoded_videos("tiny"),
    "caches": {f: [st.st_ino, st.st_mtime_ns] for f, st in sorted(stats.items())},
}))
"""


def test_worker_processes_share_the_frame_cache(models, tmp_path):
    """Two worker processes load one package: the first decodes, the second maps the
    first one's files (same inodes, untouched)."""

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    copy_package(models, tmp_path)
    first = run_script(LOADER, tmp_path, env=env)
    second = run_script(LOADER, tmp_path, env=env)
    assert first["decoded"] == dict.fromkeys(VIDEOS, True)
    assert second["decoded"] == dict.fromkeys(VIDEOS, False)
    assert len(first["caches"]) == 4
    assert second["caches"] == first["caches"]


THREAD_SETTINGS = """
import json, os, sys
from shared.config import WorkerConfig
from workers.main import make_backend
backend = make_backend(WorkerConfig(models_dir=sys.argv[1], device="cpu"))
info = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS")}
try:  # what OpenBLAS itself runs with, where threadpoolctl is installed
    from threadpoolctl import threadpool_info
    pools = threadpool_info()
    info["openblas"] = [p["num_threads"] for p in pools if p["internal_api"] == "openblas"]
except ImportError:
    info["openblas"] = None
print(json.dumps(info))
"""


@pytest.mark.parametrize("preset", [{}, {"OPENBLAS_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"}])
def test_torch_worker_keeps_helper_threads_from_spinning(models, preset):
    """The torch worker sets OpenMP's wait policy and OpenBLAS's thread count before torch
    and numpy load (spinning helper threads halved stream throughput on 2 cores,
    BENCHMARKS.md); an operator's own setting wins."""
    ours = ("OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY")
    env = {k: v for k, v in os.environ.items() if k not in ours}
    info = run_script(THREAD_SETTINGS, models, env={**env, **preset})
    want = preset or {"OPENBLAS_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    assert info["OPENBLAS_NUM_THREADS"] == want["OPENBLAS_NUM_THREADS"]
    assert info["OMP_WAIT_POLICY"] == want["OMP_WAIT_POLICY"]
    if info["openblas"]:
        assert set(info["openblas"]) == {int(want["OPENBLAS_NUM_THREADS"])}
