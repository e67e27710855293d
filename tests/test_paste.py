"""Paste-back (workers.paste): the feather weights and the CPU paste that uses them."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from workers.paste import blend, face_from_prediction, feather_alpha, paste_face


def test_no_feather_is_all_ones():
    alpha = feather_alpha(7, 0)
    assert alpha.dtype == np.float32 and alpha.shape == (7, 7)
    assert (alpha == 1).all()


@pytest.mark.parametrize(("side", "feather"), [(64, 8), (65, 8), (72, 1), (200, 12)])
def test_feather_ramps_from_zero_at_the_border_to_one_inside(side, feather):
    alpha = feather_alpha(side, feather)
    assert alpha.dtype == np.float32 and alpha.shape == (side, side)
    assert alpha.min() >= 0 and alpha.max() <= 1
    # the outermost ring is the frame's own pixels; everything feather px in is the face
    assert (alpha[0] == 0).all() and (alpha[-1] == 0).all()
    assert (alpha[:, 0] == 0).all() and (alpha[:, -1] == 0).all()
    inner = alpha[feather : side - feather, feather : side - feather]
    assert (inner == 1).all()
    # rising strictly over the ramp along the middle row, symmetric on all four sides
    row = alpha[side // 2, : feather + 1]
    assert (np.diff(row) > 0).all()
    assert np.array_equal(alpha, alpha[::-1]) and np.array_equal(alpha, alpha.T)


def test_feather_wider_than_half_the_side_is_clamped():
    alpha = feather_alpha(10, 50)
    assert alpha[0, 0] == 0 and alpha.max() > 0.75
    assert np.array_equal(alpha, feather_alpha(10, 5))


@pytest.mark.parametrize(("side", "feather"), [(0, 2), (-3, 2), (10, -1), (10, 2.5), (3.0, 1)])
def test_feather_alpha_refuses_bad_arguments(side, feather):
    with pytest.raises(ValueError):
        feather_alpha(side, feather)  # type: ignore[arg-type]


def _inputs(side: int = 64):
    rng = np.random.default_rng(3)
    crop = rng.integers(0, 256, (328, 328, 3), dtype=np.uint8)
    pred = rng.integers(0, 256, (320, 320, 3), dtype=np.uint8)
    region = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    return crop, pred, region


def test_hard_paste_is_synctalks():
    crop, pred, region = _inputs()
    expected = crop.copy()
    expected[4:324, 4:324] = pred
    expected = cv2.resize(expected, (64, 64), interpolation=cv2.INTER_CUBIC)
    assert np.array_equal(face_from_prediction(crop, pred, 64), expected)
    assert np.array_equal(paste_face(crop, pred, region, 0), expected)
    assert np.array_equal(paste_face(crop, pred, np.zeros_like(region), 0), expected)


def test_feathered_paste_keeps_the_frame_at_the_border_and_the_face_inside():
    crop, pred, region = _inputs()
    face = face_from_prediction(crop, pred, 64)
    out = paste_face(crop, pred, region, 6)
    assert out.dtype == np.uint8 and out.shape == (64, 64, 3)
    assert np.array_equal(out[0], region[0]) and np.array_equal(out[:, -1], region[:, -1])
    assert np.array_equal(out[6:58, 6:58], face[6:58, 6:58])
    band = out[2, 10:54].astype(int)  # between: a weighted mean of the two
    lo = np.minimum(face[2, 10:54], region[2, 10:54])
    hi = np.maximum(face[2, 10:54], region[2, 10:54])
    assert ((band >= lo) & (band <= hi)).all()


def test_blend_rounds():
    face = np.full((2, 2, 3), 201, np.uint8)
    background = np.full((2, 2, 3), 100, np.uint8)
    alpha = np.array([[0.0, 1.0], [0.5, 0.25]], np.float32)
    out = blend(face, background, alpha)
    assert out[:, :, 0].tolist() == [[100, 201], [150, 125]]  # 150.5 -> 150 (half to even)
