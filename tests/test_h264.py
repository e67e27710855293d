"""The H.264 writer (workers.h264): what OpenCV decodes from it, and that it repeats itself."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from workers.h264 import H264Writer, describe


def frames(size: tuple[int, int], n: int = 5) -> list[np.ndarray]:
    """A smooth coloured scene with a sharp-edged face and a little noise, moving."""
    w, h = size
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for i in range(n):
        img = np.stack(
            [100 + 60 * np.sin(xx / 17 + i / 3), 120 + 50 * np.cos(yy / 13), 90 + xx * 0.2], -1
        )
        img = np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8)
        cv2.ellipse(img, (w // 2 + i, h // 2), (w // 4, h // 3), 0, 0, 360, (60, 90, 200), -1)
        out.append(img)
    return out


def write(path: Path, images: list[np.ndarray]) -> None:
    h, w = images[0].shape[:2]
    writer = H264Writer(path, (w, h))
    try:
        for image in images:
            writer.write(image)
    finally:
        writer.release()


def decode(path: Path) -> tuple[list[np.ndarray], int, float]:
    cap = cv2.VideoCapture(str(path))
    count, fps = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), cap.get(cv2.CAP_PROP_FPS)
    out = []
    while True:
        ok, image = cap.read()
        if not ok:
            break
        out.append(image)
    cap.release()
    return out, count, fps


@pytest.mark.parametrize("size", [(328, 328), (321, 241)])
def test_opencv_decodes_it_within_a_grey_level(tmp_path, size):
    images = frames(size)
    write(tmp_path / "v.mp4", images)
    decoded, count, fps = decode(tmp_path / "v.mp4")
    assert count == len(images) == len(decoded) and fps == 25.0
    diff = np.abs(np.stack(decoded).astype(int) - np.stack(images))
    assert diff.mean() < 1.0, diff.mean()
    # no colour shift: the error has no sign (a wrong colour matrix shows here first)
    bias = (np.stack(decoded).astype(int) - np.stack(images)).reshape(-1, 3).mean(axis=0)
    assert np.abs(bias).max() < 0.2, bias


def test_the_same_frames_give_the_same_file(tmp_path):
    images = frames((328, 328))
    write(tmp_path / "a.mp4", images)
    write(tmp_path / "b.mp4", images)
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()


def test_bad_frames_and_closed_writers_are_refused(tmp_path):
    writer = H264Writer(tmp_path / "v.mp4", (64, 48))
    with pytest.raises(ValueError, match=r"v\.mp4: frame is 48x64, the video is 64x48"):
        writer.write(np.zeros((64, 48, 3), np.uint8))
    writer.write(np.zeros((48, 64, 3), np.uint8))
    writer.release()
    writer.release()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        writer.write(np.zeros((48, 64, 3), np.uint8))
    assert decode(tmp_path / "v.mp4")[1] == 1
    assert "libx264rgb" in describe()
