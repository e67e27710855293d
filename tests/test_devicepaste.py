"""Tensor paste-back (workers/devicepaste.py) against OpenCV, measured.

The design allows one grey level between the two (OpenCV resizes in fixed point and rounds
half up; the tensor code resizes in float32 and rounds half to even); these tests hold it
to that, say how many pixels differ, and check the blend used for feathering.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workers.devicepaste import blend, composite, feather, paste_faces, resize_square, to_uint8


SIDES = (97, 100, 200, 327, 328, 329, 400, 656)


def images(seed: int) -> dict[str, np.ndarray]:
    """A noisy image (every pixel a step: the worst case for rounding) and a smooth one
    (what faces look like)."""
    rng = np.random.default_rng(seed)
    noisy = rng.integers(0, 256, (328, 328, 3), dtype=np.uint8)
    return {"noisy": noisy, "smooth": cv2.GaussianBlur(noisy, (0, 0), 3)}


@pytest.mark.parametrize("kind", ["noisy", "smooth"])
def test_resize_is_opencv_cubic_within_one_grey_level(kind):
    image = images(0)[kind]
    batch = torch.from_numpy(np.stack([image] * len(SIDES))).float()
    out = to_uint8(resize_square(batch, list(SIDES))).numpy().astype(int)
    differing = []
    for j, side in enumerate(SIDES):
        want = cv2.resize(image, (side, side), interpolation=cv2.INTER_CUBIC).astype(int)
        diff = np.abs(out[j, :side, :side] - want)
        assert diff.max() <= 1, (kind, side, diff.max())
        differing.append(float((diff > 0).mean()))
        if side in (328, 656):  # identity, and exact 2x: no rounding case at all
            assert diff.max() == 0, (kind, side)
    # Measured (torch 2.13, OpenCV 5.1): noisy 0.04-0.08 % of values, smooth at most 0.01 %.
    assert max(differing) < (0.005 if kind == "noisy" else 0.0005), differing


def test_resize_equals_torch_bicubic_interpolate():
    """The gathered taps compute what ``F.interpolate(mode="bicubic")`` does (float
    rounding aside), for a batch of different sizes at once."""
    image = images(1)["noisy"]
    sides = [100, 329, 400]
    out = resize_square(torch.from_numpy(np.stack([image] * 3)).float(), sides)
    assert out.shape == (3, 400, 400, 3)
    chw = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    for j, side in enumerate(sides):
        want = F.interpolate(chw, size=(side, side), mode="bicubic", align_corners=False)
        got = out[j, :side, :side].permute(2, 0, 1)[None]
        assert (got - want).abs().max() < 0.05, side


def test_paste_faces_and_composite_match_the_opencv_path():
    rng = np.random.default_rng(2)
    crops = cv2.GaussianBlur(rng.integers(0, 256, (3, 328, 328, 3), dtype=np.uint8)[0], (0, 0), 2)
    crops = np.stack([crops, np.roll(crops, 5, axis=0), np.roll(crops, 9, axis=1)])
    pred = rng.integers(0, 256, (3, 320, 320, 3), dtype=np.uint8)
    frames = rng.integers(0, 256, (3, 240, 320, 3), dtype=np.uint8)
    rects = [[10, 20, 130, 140], [0, 0, 240, 240], [200, 100, 300, 200]]
    sides = [r[2] - r[0] for r in rects]

    faces = paste_faces(torch.from_numpy(pred), torch.from_numpy(crops), sides)
    out = composite(torch.from_numpy(frames.copy()), list(faces), rects).numpy()
    for j, (x1, y1, x2, y2) in enumerate(rects):
        crop = crops[j].copy()
        crop[4:324, 4:324] = pred[j]
        face = cv2.resize(crop, (x2 - x1, y2 - y1), interpolation=cv2.INTER_CUBIC)
        assert np.abs(faces[j, : sides[j], : sides[j]].numpy().astype(int) - face).max() <= 1
        frame = frames[j].copy()
        frame[y1:y2, x1:x2] = face
        diff = np.abs(out[j].astype(int) - frame)
        assert diff.max() <= 1
        outside = np.ones(frame.shape[:2], bool)
        outside[y1:y2, x1:x2] = False
        assert diff[outside].max() == 0  # the frame is untouched outside the rect
    assert np.array_equal(crops, np.stack([crops[0], crops[1], crops[2]]))  # inputs intact


def test_alpha_blends_face_over_frame():
    rng = np.random.default_rng(3)
    face = torch.from_numpy(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8))
    region = torch.from_numpy(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8))
    assert torch.equal(blend(face, region, torch.ones(50, 50)), face)
    assert torch.equal(blend(face, region, torch.zeros(50, 50)), region)
    ramp = torch.linspace(0, 1, 50)[None, :].expand(50, 50)
    mixed = blend(face, region, ramp).numpy().astype(float)
    want = ramp.numpy()[..., None] * face.numpy() + (1 - ramp.numpy()[..., None]) * region.numpy()
    assert np.abs(mixed - want).max() <= 0.5 + 1e-4  # rounded once

    frames = torch.zeros((1, 80, 80, 3), dtype=torch.uint8)
    padded = torch.full((1, 60, 60, 3), 200, dtype=torch.uint8)
    out = composite(frames.clone(), list(padded), [[10, 10, 60, 60]], [torch.full((50, 50), 0.5)])
    assert out[0, 10:60, 10:60].unique().tolist() == [100]
    assert out[0, :10].max() == 0
    crop_face = padded[0, :50, :50]
    feather(crop_face, torch.zeros((50, 50, 3), dtype=torch.uint8), torch.full((50, 50), 0.25))
    assert padded[0, :50, :50].unique().tolist() == [50]  # blended in place
    assert padded[0, 50:].unique().tolist() == [200]
    with pytest.raises(ValueError, match="alpha must be"):
        composite(frames.clone(), list(padded), [[10, 10, 60, 60]], [torch.ones(40, 40)])


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="square"):
        resize_square(torch.zeros(1, 328, 320, 3), [10])
    with pytest.raises(ValueError, match="positive"):
        resize_square(torch.zeros(2, 328, 328, 3), [10])
    with pytest.raises(ValueError, match="positive"):
        resize_square(torch.zeros(1, 328, 328, 3), [0])
