"""Synthetic packages: the section-6 layout, SyncTalk's preprocessing, determinism."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from workers.checkpoint import load_audio_encoder, load_unet
from workers.framecache import decode_video
from workers.make_package import MASK_RECT, _rects, make_package
from workers.package import load_package
from workers.unet import WIDTHS


ROOT = Path(__file__).resolve().parents[1]
FILES = [
    "package_info.json",
    "full_body_video.mp4",
    "crops_328_video.mp4",
    "rois_320_video.mp4",
    "model_inputs_video.mp4",
    "aud_ave.npy",
    "cache/crop_rectangles.json",
    "checkpoint/best_trainloss.pth",
    "checkpoint/audio_visual_encoder.pth",
]


def digests(package: Path) -> dict[str, str]:
    return {f: hashlib.sha256((package / f).read_bytes()).hexdigest() for f in FILES}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_package(tmp_path_factory.mktemp("m"), name="small", frames=6, seed=3)


def test_same_seed_same_bytes(tmp_path, small):
    """Two builds with one seed are byte-identical, file by file; another seed differs.
    Seeding the build leaves the caller's torch RNG where it was."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = make_package(tmp_path / "a", name="small", frames=6, seed=3)
    assert torch.equal(torch.rand(3), expected)
    assert digests(again) == digests(small)
    other = make_package(tmp_path / "b", name="small", frames=6, seed=4)
    changed = {f for f, d in digests(other).items() if d != digests(small)[f]}
    assert {"aud_ave.npy", "checkpoint/best_trainloss.pth", "full_body_video.mp4"} <= changed


def test_layout_and_metadata(small):
    """Every file of section 6 is there, and package_info describes them."""
    for f in FILES:
        assert (small / f).is_file(), f
    info = json.loads((small / "package_info.json").read_text())
    assert info["package_version"] == "2.0"
    assert info["dataset_name"] == "small"
    assert info["videos"]["full_body_img"] == {
        "video_file": "full_body_video.mp4",
        "frame_count": 6,
        "fps": 25,
    }
    assert info["model"] == {
        "arch": "unet328",
        "audio_mode": "ave",
        "channels": list(WIDTHS["quarter"]),
    }
    package = load_package(small.parent, "small")
    assert package.frame_count == 6
    assert package.frame_size == (320, 240)


def test_videos_follow_synctalk_preprocessing(small):
    """crops are 328, rois = crop[4:324, 4:324], model inputs = rois with the mouth mask."""
    full = decode_video(small / "full_body_video.mp4")
    crops = decode_video(small / "crops_328_video.mp4")
    rois = decode_video(small / "rois_320_video.mp4")
    masked = decode_video(small / "model_inputs_video.mp4")
    assert full.shape == (6, 240, 320, 3)
    assert crops.shape == (6, 328, 328, 3)
    assert rois.shape == masked.shape == (6, 320, 320, 3)
    # mp4 is lossy: compare decoded frames with a tolerance, never drawn ones
    diff = np.abs(rois.astype(int) - crops[:, 4:324, 4:324].astype(int))
    assert diff.mean() < 3
    x, y, w, h = MASK_RECT
    assert masked[:, y + 4 : y + h - 4, x + 4 : x + w - 4].mean() < 3  # black inside
    border = np.abs(masked[:, 316:, :].astype(int) - rois[:, 316:, :].astype(int))
    assert border.mean() < 4  # untouched outside the mask
    assert rois.std() > 20  # a picture, not a flat frame
    assert not np.array_equal(full[0], full[-1])  # frames differ


def test_rects_square_inside_and_drifting(small):
    """Rects are square, about half the height, inside the frame, and drift a little."""
    rects = load_package(small.parent, "small").rects
    sides = rects[:, 2] - rects[:, 0]
    assert np.array_equal(sides, rects[:, 3] - rects[:, 1])
    assert 100 <= sides[0] <= 130
    for size in [(320, 240), (640, 360), (64, 64), (1280, 720)]:
        w, h = size
        rects = _rects(np.random.default_rng(1), 60, size)
        assert (rects[:, :2] >= 0).all() and (rects[:, 2] <= w).all() and (rects[:, 3] <= h).all()
        assert np.array_equal(rects[:, 2] - rects[:, 0], rects[:, 3] - rects[:, 1])
        assert np.abs(np.diff(rects, axis=0)).max() <= 3
        if min(w, h) >= 240:
            assert len({tuple(r) for r in rects.tolist()}) > 3


def test_audio_features_nonnegative_and_smooth(small):
    feats = np.load(small / "aud_ave.npy")
    assert feats.dtype == np.float32 and feats.shape == (6, 512)
    assert feats.min() >= 0 and feats.max() > 1
    assert np.abs(np.diff(feats, axis=0)).mean() < feats.mean()


def test_weights_load_strictly(small):
    """The UNet loads strictly at its declared width; the encoder file has no prefix."""
    net = load_unet(small / "checkpoint/best_trainloss.pth", "quarter")
    assert net.width == "quarter"
    raw = torch.load(small / "checkpoint/audio_visual_encoder.pth", weights_only=True)
    assert "0.conv_block.0.weight" in raw
    assert not any(k.startswith("audio_encoder.") for k in raw)
    load_audio_encoder(small / "checkpoint/audio_visual_encoder.pth")


def test_model_responds_to_image_and_audio(small):
    """Calibrated batch norms: the random UNet's output varies with the image and with the
    audio (uncalibrated, it is a flat grey that no audio changes)."""
    net = load_unet(small / "checkpoint/best_trainloss.pth", "quarter")
    rois = decode_video(small / "rois_320_video.mp4")[:2]
    masked = decode_video(small / "model_inputs_video.mp4")[:2]
    image = torch.from_numpy(np.concatenate([rois, masked], axis=3)).permute(0, 3, 1, 2) / 255
    rows = np.load(small / "aud_ave.npy")[np.arange(16) % 6]  # 16 rows of the 6 there are
    audio = torch.from_numpy(rows.reshape(1, 32, 16, 16))
    with torch.inference_mode():
        out = net(image, audio.expand(2, -1, -1, -1))
        quiet = net(image, torch.zeros_like(audio).expand(2, -1, -1, -1))
    pixels = (out * 255).round()
    assert pixels.std() > 20
    assert ((quiet * 255).round() != pixels).float().mean() > 0.1
    encoder = load_audio_encoder(small / "checkpoint/audio_visual_encoder.pth")
    with torch.inference_mode():
        feats = encoder(torch.randn(4, 1, 80, 16))
    assert feats.std() > 0.1


def test_refuses_to_overwrite(small):
    with pytest.raises(FileExistsError):
        make_package(small.parent, name="small", frames=2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "../evil"},
        {"name": "a/b"},
        {"width": "tiny"},
        {"frames": 0},
        {"size": (321, 240)},
        {"size": (32, 32)},
    ],
)
def test_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_package(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())  # nothing left behind


def test_cli_prints_the_path(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "lipsync", "make-package", str(tmp_path), "--name", "cli"]
        + ["--frames", "2", "--size", "160x120", "--width", "quarter"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == tmp_path / "cli"
    assert load_package(tmp_path, "cli").frame_size == (160, 120)
