"""Package validation: every problem is reported with the file it is in."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from workers.make_package import make_package
from workers.package import (
    PackageError,
    check_model_name,
    list_packages,
    load_package,
    package_dir,
)


FRAMES = 4


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_package(tmp_path_factory.mktemp("pristine"), name="pkg", frames=FRAMES)


@pytest.fixture
def pkg(pristine, tmp_path) -> Path:
    """A fresh copy of a valid package, to break in one way per test."""
    dest = tmp_path / "models" / "pkg"
    shutil.copytree(pristine, dest)
    return dest


def problem(pkg: Path) -> str:
    with pytest.raises(PackageError) as info:
        load_package(pkg.parent, pkg.name)
    message = str(info.value)
    assert message.startswith("pkg: "), message
    return message


def rewrite_video(path: Path, frames: int | None = None, size: tuple[int, int] | None = None):
    """Re-encode ``path`` keeping its first ``frames`` frames, optionally resized."""
    cap = cv2.VideoCapture(str(path))
    images = []
    while True:
        ok, image = cap.read()
        if not ok:
            break
        images.append(image if size is None else cv2.resize(image, size))
    cap.release()
    images = images[:frames] if frames is not None else images
    h, w = images[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (w, h))
    for image in images:
        writer.write(image)
    writer.release()


def edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def test_valid_package_is_described(pkg):
    p = load_package(pkg.parent, "pkg")
    assert p.name == "pkg" and p.path == pkg.resolve()
    assert p.frame_count == FRAMES and p.fps == 25.0 and p.frame_size == (320, 240)
    assert p.rects.shape == (FRAMES, 4) and p.rects.dtype == np.int32
    assert isinstance(p.audio_features, np.memmap) and p.audio_features.shape == (FRAMES, 512)
    assert p.checkpoint.name == "best_trainloss.pth"
    assert p.encoder_checkpoint is not None
    assert p.channels == (8, 16, 32, 64, 128)
    assert {k: v.file for k, v in p.videos.items()} == {
        "full_body": "full_body_video.mp4",
        "crops_328": "crops_328_video.mp4",
        "rois_320": "rois_320_video.mp4",
        "model_inputs": "model_inputs_video.mp4",
    }
    assert p.videos["crops_328"].width == 328


def test_missing_video(pkg):
    (pkg / "rois_320_video.mp4").unlink()
    assert "rois_320_video.mp4: missing" in problem(pkg)


def test_video_frame_count_mismatch(pkg):
    rewrite_video(pkg / "rois_320_video.mp4", frames=FRAMES - 1)
    assert problem(pkg) == f"pkg: rois_320_video.mp4 has {FRAMES - 1} frames, expected {FRAMES}"


def test_declared_frame_count_mismatch(pkg):
    edit_json(pkg / "package_info.json", lambda o: o["videos"]["crops_328"].update(frame_count=9))
    message = problem(pkg)
    assert "package_info.json: videos.crops_328.frame_count is 9" in message


def test_crop_video_wrong_size(pkg):
    rewrite_video(pkg / "crops_328_video.mp4", size=(320, 320))
    assert "crops_328_video.mp4: frames are 320x320, expected 328x328" in problem(pkg)


def test_roi_video_wrong_size(pkg):
    rewrite_video(pkg / "model_inputs_video.mp4", size=(256, 256))
    assert "model_inputs_video.mp4: frames are 256x256, expected 320x320" in problem(pkg)


def test_video_that_is_not_a_video(pkg):
    (pkg / "full_body_video.mp4").write_bytes(b"not an mp4 at all")
    assert "full_body_video.mp4: cannot be opened as a video" in problem(pkg)


def test_video_file_name_from_package_info(pkg):
    (pkg / "full_body_video.mp4").rename(pkg / "background.mp4")
    edit_json(
        pkg / "package_info.json",
        lambda o: o["videos"]["full_body_img"].update(video_file="background.mp4"),
    )
    assert load_package(pkg.parent, "pkg").videos["full_body"].path.name == "background.mp4"


def test_video_file_cannot_point_outside(pkg):
    edit_json(
        pkg / "package_info.json",
        lambda o: o["videos"]["rois_320"].update(video_file="../other/rois.mp4"),
    )
    assert "videos.rois_320.video_file is invalid" in problem(pkg)


def test_truncated_audio_features(pkg):
    path = pkg / "aud_ave.npy"
    path.write_bytes(path.read_bytes()[:-1000])
    assert "aud_ave.npy: unreadable or truncated" in problem(pkg)


def test_audio_features_wrong_dtype(pkg):
    np.save(pkg / "aud_ave.npy", np.zeros((FRAMES, 512), dtype=np.float64))
    assert "aud_ave.npy: dtype is float64, expected float32" in problem(pkg)


def test_audio_features_wrong_shape(pkg):
    np.save(pkg / "aud_ave.npy", np.zeros((FRAMES, 256), dtype=np.float32))
    assert "aud_ave.npy: shape is [4, 256], expected [M, 512]" in problem(pkg)


def test_audio_rows_may_differ_from_frames(pkg):
    """The original sanders package has 522 feature rows for 523 frames: allowed."""
    np.save(pkg / "aud_ave.npy", np.ones((FRAMES - 1, 512), dtype=np.float32))
    assert load_package(pkg.parent, "pkg").audio_features.shape == (FRAMES - 1, 512)


def test_bad_package_info_json(pkg):
    (pkg / "package_info.json").write_text('{"package_version": "2.0",')
    assert "package_info.json: not valid json" in problem(pkg)


def test_wrong_package_version(pkg):
    edit_json(pkg / "package_info.json", lambda o: o.update(package_version="1.0"))
    assert "package_info.json: package_version is '1.0'" in problem(pkg)


def test_bad_rects_json(pkg):
    (pkg / "cache/crop_rectangles.json").write_text("[1, 2")
    assert "cache/crop_rectangles.json: not valid json" in problem(pkg)


def test_rects_frame_count_mismatch(pkg):
    edit_json(pkg / "cache/crop_rectangles.json", lambda o: o.pop(str(FRAMES - 1)))
    message = problem(pkg)
    assert f"cache/crop_rectangles.json has {FRAMES - 1} frames, expected {FRAMES}" in message


@pytest.mark.parametrize(
    ("rect", "words"),
    [
        ([10, 10, 50, 60], "not square"),
        ([300, 10, 340, 50], "outside the 320x240 frame"),
        ([-1, 0, 39, 40], "outside"),
        ([10, 10, 10, 10], "empty"),
        ([10, 10, 50.5, 50], "not 4 integers"),
        ("oops", "not [x1, y1, x2, y2]"),
    ],
)
def test_bad_rect(pkg, rect, words):
    edit_json(pkg / "cache/crop_rectangles.json", lambda o: o["2"].update(rect=rect))
    message = problem(pkg)
    assert "cache/crop_rectangles.json: frame 2: rect" in message and words in message


def test_missing_checkpoint_and_model_best_fallback(pkg):
    best = pkg / "checkpoint/best_trainloss.pth"
    best.rename(pkg / "checkpoint/model_best.pth")
    assert load_package(pkg.parent, "pkg").checkpoint.name == "model_best.pth"
    (pkg / "checkpoint/model_best.pth").unlink()
    assert "checkpoint/best_trainloss.pth: missing" in problem(pkg)


def test_encoder_is_optional(pkg):
    (pkg / "checkpoint/audio_visual_encoder.pth").unlink()
    assert load_package(pkg.parent, "pkg").encoder_checkpoint is None


def test_model_block_absent_means_full_width(pkg):
    edit_json(pkg / "package_info.json", lambda o: o.pop("model"))
    assert load_package(pkg.parent, "pkg").channels == (32, 64, 128, 256, 512)


def test_model_block_checked(pkg):
    edit_json(
        pkg / "package_info.json",
        lambda o: o.update(model={"arch": "wav2lip", "audio_mode": "hubert", "channels": [3]}),
    )
    message = problem(pkg)
    assert "model.arch 'wav2lip' is not supported" in message
    assert "model.audio_mode 'hubert' is not supported" in message
    assert "model.channels must be 5 positive even integers" in message


def test_paste_block_absent_means_hard_edge_and_feather_is_read(pkg):
    assert load_package(pkg.parent, "pkg").feather_px == 0
    edit_json(pkg / "package_info.json", lambda o: o.update(paste={"feather_px": 12}))
    assert load_package(pkg.parent, "pkg").feather_px == 12
    edit_json(pkg / "package_info.json", lambda o: o.update(paste={}))
    assert load_package(pkg.parent, "pkg").feather_px == 0


@pytest.mark.parametrize(
    ("paste", "words"),
    [
        ("soft", "paste is not a json object"),
        ({"feather_px": -1}, "paste.feather_px must be an integer >= 0, not -1"),
        ({"feather_px": 2.5}, "paste.feather_px must be an integer >= 0, not 2.5"),
        ({"feather_px": True}, "paste.feather_px must be an integer >= 0, not True"),
        ({"feather_px": 61}, "paste.feather_px 61 is more than half the smallest face rect (120"),
    ],
)
def test_bad_paste_block(pkg, paste, words):
    edit_json(pkg / "package_info.json", lambda o: o.update(paste=paste))
    assert f"package_info.json: {words}" in problem(pkg)


def test_all_problems_reported_together(pkg):
    (pkg / "rois_320_video.mp4").unlink()
    np.save(pkg / "aud_ave.npy", np.zeros((FRAMES, 3), dtype=np.float32))
    with pytest.raises(PackageError) as info:
        load_package(pkg.parent, "pkg")
    assert len(info.value.problems) == 2
    assert [p.split(":")[0] for p in info.value.problems] == ["rois_320_video.mp4", "aud_ave.npy"]


def test_missing_package(tmp_path):
    with pytest.raises(PackageError, match="^ghost: no package directory"):
        load_package(tmp_path, "ghost")


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "a b", "x" * 65, "é", None])
def test_bad_model_names(tmp_path, name):
    with pytest.raises(ValueError, match="invalid model name"):
        check_model_name(name)
    with pytest.raises(PackageError):
        load_package(tmp_path, name)


def test_good_model_names():
    for name in ["sanders", "a", "A-b_c.9", "x" * 64, ".hidden"]:
        assert check_model_name(name) == name


def test_package_path_cannot_escape_models_dir(pristine, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    os.symlink(pristine, models / "link")  # a package outside the models dir
    with pytest.raises(PackageError, match="leaves the models dir"):
        package_dir(models, "link")
    with pytest.raises(PackageError, match="leaves the models dir"):
        load_package(models, "link")
    assert package_dir(models, "real") == (models / "real").resolve()


def test_list_packages(pkg):
    models = pkg.parent
    (models / "notes").mkdir()  # no package_info.json
    shutil.copytree(pkg, models / ".pkg.tmp-1")  # a build in progress
    (models / "readme.txt").write_text("hi")
    assert list_packages(models) == ["pkg"]
    assert list_packages(models / "nowhere") == []
