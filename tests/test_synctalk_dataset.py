"""The importer's decisions, one rule at a time (workers.synctalk_dataset: no disk)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.synctalk_dataset import (
    DatasetError,
    checkpoint_hint,
    choose_checkpoint,
    face_rect,
    feature_rows,
    frame_count,
    pad_features,
    parse_landmarks,
    rect_problem,
    summarise,
)
from workers.unet import WIDTHS, UNet328


def names(*numbers: int) -> list[str]:
    return [f"{i}.jpg" for i in numbers]


def test_frames_from_zero_without_gaps():
    assert frame_count(names(2, 0, 1, 10, *range(3, 10))) == 11
    assert frame_count([*names(0, 1), "notes.txt", "0.png", "thumb.jpg"]) == 2


def test_frames_numbered_from_one_name_zero_jpg():
    with pytest.raises(DatasetError) as info:
        frame_count(names(*range(1, 524)))
    message = str(info.value)
    assert message.startswith("full_body_img/0.jpg: missing")
    assert "numbered from 1" in message and "%d" in message and "523.jpg" in message


def test_gap_names_the_first_missing_frame():
    with pytest.raises(DatasetError, match=r"^full_body_img/3\.jpg: missing \(and 1 more"):
        frame_count(names(0, 1, 2, 4, 6))
    with pytest.raises(
        DatasetError, match=r"^full_body_img/0\.jpg: missing \(and 1 more missing\)"
    ):
        frame_count(names(2, 3))


def test_zero_padded_names_and_empty_folder():
    with pytest.raises(DatasetError, match=r"0001\.jpg: frame names are zero-padded"):
        frame_count(["0001.jpg", "0002.jpg"])
    with pytest.raises(DatasetError, match="holds no frames"):
        frame_count(["a.txt"])


def lms_text(points: np.ndarray, fmt: str = "{:d} {:d}") -> str:
    return "\n".join(fmt.format(*p) for p in points.tolist()) + "\n"


def test_landmarks_integer_and_float_files_give_the_same_points():
    rng = np.random.default_rng(0)
    ints = rng.integers(0, 500, (110, 2))
    frac = ints + rng.uniform(0.0, 0.99, (110, 2))
    a = parse_landmarks(lms_text(ints), "0.lms")
    b = parse_landmarks(lms_text(frac, "{:.6f} {:.6f}"), "0.lms")
    assert a.dtype == np.int32 and a.shape == (110, 2)
    assert np.array_equal(a, ints) and np.array_equal(a, b)


def test_landmarks_are_read_as_float32_then_truncated():
    """inference_328 parses float32 then casts: 10.9999999 is 11.0 in float32, 10.99999 is not."""
    points = np.zeros((110, 2))
    text = lms_text(points, "{:.0f} {:.0f}").splitlines()
    text[1], text[31], text[52] = "10.99999 2", "10.9999999 -0.5", "3 7.75"
    got = parse_landmarks("\n".join(text), "x.lms")
    assert got[1].tolist() == [10, 2] and got[31].tolist() == [11, 0] and got[52].tolist() == [3, 7]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "x.lms: empty, expected 110"),
        ("1 2\n" * 40, "x.lms: 40 points, expected 110"),
        ("1 2\n" * 111, "x.lms: 111 points, expected 110"),
        ("1 2\n" * 5 + "1 2 3\n", "x.lms: line 6 is not 'x y'"),
        ("1 2\nabc def\n", "x.lms: line 2 is not 'x y' (it says 'abc def')"),
        ("1 nan\n", "x.lms: line 1 is not a finite point"),
    ],
)
def test_bad_landmark_files(text, words):
    with pytest.raises(DatasetError) as info:
        parse_landmarks(text, "x.lms")
    assert str(info.value).startswith(words)


def test_face_rect_is_inference_328s_formula():
    points = np.zeros((110, 2), np.int32)
    points[1] = (100, 400)  # x1
    points[31] = (260, 410)  # x2
    points[52] = (180, 150)  # y1
    assert face_rect(points) == (100, 150, 260, 310)


def test_rect_problems():
    assert rect_problem((10, 10, 50, 50), 64, 64) == ""
    assert rect_problem((0, 0, 64, 64), 64, 64) == ""
    assert "leaves the 64x64 frame" in rect_problem((30, 30, 70, 70), 64, 64)
    assert "leaves" in rect_problem((-1, 5, 20, 26), 64, 64)
    assert "leaves" in rect_problem((10, 40, 40, 70), 64, 64)  # bottom edge
    empty = rect_problem((40, 10, 40, 10), 64, 64)
    assert "is empty: point 31's x (40) is not right of point 1's x (40)" in empty
    assert "empty" in rect_problem((40, 10, 30, 0), 64, 64)


def test_checkpoint_choice():
    assert choose_checkpoint(["4.pth", "9.pth", "10.pth", "99.txt"]) == "10.pth"
    assert choose_checkpoint(["100.pth", "99.pth", "latest.pth"]) == "100.pth"
    assert choose_checkpoint(["5.pth", "best.pth"]) == "best.pth"
    assert choose_checkpoint(["notes.txt", "latest.pth"]) is None
    assert choose_checkpoint([]) is None


def test_checkpoint_hints():
    unet = UNet328(WIDTHS["quarter"]).state_dict()
    assert checkpoint_hint(unet) == ""
    syncnet = {"face_encoder.0.conv_block.0.weight": torch.zeros(1)}
    assert "SyncNet" in checkpoint_hint(syncnet)
    wenet = dict(unet)
    wenet["audio_model.conv1.conv.0.weight"] = torch.zeros(256, 256, 1, 1)
    assert "wenet" in checkpoint_hint(wenet)
    encoder = {"0.conv_block.0.weight": torch.zeros(1), "1.conv_block.0.bias": torch.zeros(1)}
    assert "audio encoder" in checkpoint_hint(encoder)


def test_feature_rows_match_the_sanders_recording():
    """523 frames = 20.92 s = 334,720 samples at 16 kHz = 1674 mel frames -> 520 windows,
    522 rows once padded: the (522, 512) of the real sanders aud_ave.npy."""
    assert feature_rows(1 + 334_720 // 200) == 520
    table = pad_features(np.arange(520 * 512, dtype=np.float32).reshape(520, 512))
    assert table.shape == (522, 512) and table.dtype == np.float32
    assert np.array_equal(table[0], table[1]) and np.array_equal(table[-1], table[-2])
    assert np.array_equal(table[1:-1], np.arange(520 * 512).reshape(520, 512))


def test_summarise_names_three_and_counts_the_rest():
    assert summarise(["a", "b"]) == "a; b"
    assert summarise(["a", "b", "c", "d", "e"]) == "a; b; c; and 2 more frames with problems"
