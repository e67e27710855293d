"""``lipsync import-synctalk`` on small drawn SyncTalk_2D runs (workers.synctalk_sample).

The reference for what the served frames must be is ``inference_328`` written out below
straight from the run's JPEGs, landmark files, feature table and epoch checkpoint, with
plain OpenCV / numpy / torch.load (none of the importer's or the engine's code), the way
SyncTalk_2D's script does it, truncating casts included. Served frames pass through H.264,
so "equal" means within that noise; a rect two pixels off is shown to fall outside it.

Every refused run is checked the same way: exit status 1, one message that names the file
at fault, no traceback, and nothing left in the models dir.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from scipy.io import wavfile

from lipsync.cli import main
from workers.audio_encoder import AudioEncoder
from workers.backend import InferItem
from workers.engine import TorchBackend
from workers.framecache import decode_video
from workers.mel import melspectrogram
from workers.package import load_package
from workers.synctalk_sample import SampleRun, write_sample_run
from workers.unet import UNet328


ROOT = Path(__file__).resolve().parents[1]
FRAMES = 6
NAME = "avatar"


# -- helpers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> SampleRun:
    return write_sample_run(tmp_path_factory.mktemp("run"), name=NAME, frames=FRAMES)


@pytest.fixture(scope="module")
def imported(run, tmp_path_factory) -> Path:
    """The models dir holding the import of ``run`` (default options)."""
    models = tmp_path_factory.mktemp("models")
    assert main(["import-synctalk", str(run.dataset), "--models-dir", str(models)]) == 0
    return models


def clone(run: SampleRun, dest: Path) -> Path:
    """A copy of the run's dataset folder in a fresh tree, to break; the checkpoint and
    encoder folders are links to the originals. Returns the new dataset folder."""
    (dest / "dataset").mkdir(parents=True)
    dataset = dest / "dataset" / run.dataset.name
    shutil.copytree(run.dataset, dataset)
    (dest / "checkpoint").symlink_to(run.root / "checkpoint")
    (dest / "model").symlink_to(run.root / "model")
    return dataset


def import_cli(dataset: Path, models: Path, *args: str, capsys) -> tuple[int, str]:
    """``lipsync import-synctalk`` in this process: (exit status, stderr)."""
    code = main(["import-synctalk", str(dataset), "--models-dir", str(models), *args])
    return code, capsys.readouterr().err


def refused(dataset: Path, models: Path, *args: str, capsys) -> str:
    """Import, expect the refusal the contract promises, return its message."""
    code, err = import_cli(dataset, models, *args, capsys=capsys)
    assert code == 1, err
    assert "Traceback" not in err and "error: unexpected" not in err, err
    assert not models.exists() or not any(models.iterdir()), list(models.iterdir())
    return err


def lms_points(path: Path) -> np.ndarray:
    """As inference_328.py reads a .lms file: float32 rows, then an int32 array."""
    rows = [np.array(line.split(" "), dtype=np.float32) for line in path.read_text().splitlines()]
    return np.array(rows, dtype=np.int32)


def lms_rect(path: Path) -> list[int]:
    lms = lms_points(path)
    xmin, ymin, xmax = int(lms[1][0]), int(lms[52][1]), int(lms[31][0])
    return [xmin, ymin, xmax, ymin + xmax - xmin]


@functools.cache
def unet(checkpoint: Path) -> UNet328:
    net = UNet328((8, 16, 32, 64, 128))
    net.load_state_dict(torch.load(checkpoint, weights_only=True))
    return net.eval()


def inference_328(run: SampleRun, checkpoint: str, i: int, shift: int = 0) -> np.ndarray:
    """SyncTalk_2D's inference_328.py for frame i of the run's own audio; ``shift`` moves
    the rect right by that many pixels (a deliberately wrong reference)."""
    img = cv2.imread(str(run.dataset / "full_body_img" / f"{i}.jpg"))
    x1, y1, x2, y2 = lms_rect(run.dataset / "landmarks" / f"{i}.lms")
    x1, x2 = x1 + shift, x2 + shift
    crop = img[y1:y2, x1:x2]
    h, w = crop.shape[:2]
    crop = cv2.resize(crop, (328, 328), interpolation=cv2.INTER_CUBIC)
    crop_ori = crop.copy()
    real = crop[4:324, 4:324].copy()
    masked = cv2.rectangle(real.copy(), (5, 5, 310, 305), (0, 0, 0), -1)
    image = np.concatenate([real.transpose(2, 0, 1), masked.transpose(2, 0, 1)], axis=0)
    x = torch.from_numpy(image.astype(np.float32) / 255.0)[None]
    feats = np.load(run.dataset / "aud_ave.npy")
    rows = [
        feats[k] if 0 <= k < len(feats) else np.zeros(512, np.float32) for k in range(i - 8, i + 8)
    ]
    audio = torch.from_numpy(np.stack(rows).reshape(32, 16, 16))[None]
    with torch.no_grad():
        pred = unet(run.checkpoints / checkpoint)(x, audio)[0].numpy().transpose(1, 2, 0) * 255
    crop_ori[4:324, 4:324] = np.array(pred, dtype=np.uint8)
    img[y1:y2, x1:x2] = cv2.resize(crop_ori, (w, h), interpolation=cv2.INTER_CUBIC)
    return img


def served(models: Path, name: str = NAME, mode: str = "composite") -> list[np.ndarray]:
    backend = TorchBackend(models, device="cpu", max_batch=FRAMES)
    try:
        backend.load(name)
        images = backend.render(
            backend.forward(name, [InferItem(i, mode=mode) for i in range(FRAMES)])
        )
    finally:
        backend.close()
    assert not any(isinstance(im, BaseException) for im in images), images
    return images  # type: ignore[return-value]


def state_of(path: Path) -> dict[str, torch.Tensor]:
    blob = torch.load(path, weights_only=True)
    return blob.get("model_state_dict", blob)


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- what an import writes -------------------------------------------------------------------


def test_import_loads_with_rects_from_the_landmark_formula(run, imported):
    pkg = load_package(imported, NAME)
    assert pkg.frame_count == FRAMES and pkg.frame_size == (192, 144) and pkg.fps == 25.0
    assert pkg.channels == (8, 16, 32, 64, 128) and pkg.encoder_checkpoint is not None
    assert pkg.feather_px == 0 and "paste" not in pkg.info
    expected = [lms_rect(run.dataset / "landmarks" / f"{i}.lms") for i in range(FRAMES)]
    assert pkg.rects.tolist() == expected
    assert len({tuple(r) for r in expected}) > 1  # the rect really moves
    source = pkg.info["source"]
    assert source["kind"] == "synctalk_2d" and source["dataset"] == str(run.dataset.resolve())
    assert source["checkpoint"] == "10.pth" and source["importer_version"] == 1
    assert source["audio_features"] == "aud_ave.npy" and source["frames"] == FRAMES
    assert "h264" in source["videos"]
    features = np.load(run.dataset / "aud_ave.npy")
    assert np.array_equal(np.asarray(pkg.audio_features), features)  # copied as is
    assert sorted(p.name for p in imported.iterdir()) == [NAME]  # no temporary left


def test_videos_are_the_jpegs_cropped_as_inference_328_does(run, imported):
    pkg = imported / NAME
    videos = {
        kind: decode_video(pkg / f"{kind}_video.mp4")
        for kind in ("full_body", "crops_328", "rois_320", "model_inputs")
    }
    for i in range(FRAMES):
        img = cv2.imread(str(run.dataset / "full_body_img" / f"{i}.jpg"))
        x1, y1, x2, y2 = lms_rect(run.dataset / "landmarks" / f"{i}.lms")
        crop = cv2.resize(img[y1:y2, x1:x2], (328, 328), interpolation=cv2.INTER_CUBIC)
        real = crop[4:324, 4:324]
        masked = cv2.rectangle(real.copy(), (5, 5, 310, 305), (0, 0, 0), -1)
        for kind, want in [
            ("full_body", img),
            ("crops_328", crop),
            ("rois_320", real),
            ("model_inputs", masked),
        ]:
            diff = np.abs(videos[kind][i].astype(int) - want)
            assert diff.mean() < 2.0 and np.percentile(diff, 99) <= 12, (kind, i, diff.mean())
        assert videos["model_inputs"][i][5:310, 5:315].max() <= 16  # the mask stays black


def test_newest_epoch_by_number_is_the_one_imported(run, imported):
    got = state_of(imported / NAME / "checkpoint" / "best_trainloss.pth")
    assert same_state(got, state_of(run.checkpoints / "10.pth"))
    assert not same_state(got, state_of(run.checkpoints / "9.pth"))


def test_served_frames_equal_inference_328_from_the_jpegs(run, imported):
    frames = served(imported)
    rects = [lms_rect(run.dataset / "landmarks" / f"{i}.lms") for i in range(FRAMES)]
    for i, frame in enumerate(frames):
        x1, y1, x2, y2 = rects[i]
        want = inference_328(run, "10.pth", i)
        face = np.abs(frame.astype(int) - want)[y1:y2, x1:x2]
        whole = np.abs(frame.astype(int) - want)
        assert face.mean() < 1.2 and whole.mean() < 0.8, (i, face.mean(), whole.mean())
        # the tolerance is tight enough to fail: the same frame two pixels off does
        wrong = np.abs(frame.astype(int) - inference_328(run, "10.pth", i, shift=2))
        off = wrong[y1:y2, x1:x2].mean()
        print(f"frame {i}: face {face.mean():.2f}, whole {whole.mean():.2f}, 2 px off {off:.2f}")
        assert off > 1.6 and off > 2 * face.mean(), (i, off, face.mean())


def test_float_landmarks_and_wrapped_checkpoints_import_the_same(run, imported, tmp_path):
    fork = write_sample_run(
        tmp_path / "fork", name=NAME, frames=FRAMES, float_landmarks=True, wrapped=True
    )
    lines = (fork.dataset / "landmarks" / "0.lms").read_text().splitlines()
    assert "." in lines[1]  # really floats ...
    assert "model_state_dict" in torch.load(fork.checkpoints / "10.pth", weights_only=True)
    models = tmp_path / "models"
    assert main(["import-synctalk", str(fork.dataset), "--models-dir", str(models)]) == 0
    a, b = imported / NAME, models / NAME
    assert json.loads((a / "cache/crop_rectangles.json").read_text()) == json.loads(
        (b / "cache/crop_rectangles.json").read_text()
    )
    assert same_state(
        state_of(a / "checkpoint/best_trainloss.pth"), state_of(b / "checkpoint/best_trainloss.pth")
    )
    for video in ("crops_328_video.mp4", "model_inputs_video.mp4"):
        assert np.array_equal(decode_video(a / video), decode_video(b / video))


def test_importing_twice_gives_identical_metadata(run, imported, tmp_path, capsys):
    models = tmp_path / "models"
    for _ in range(2):
        code, err = import_cli(run.dataset, models, "--force", capsys=capsys)
        assert code == 0, err
        # the videos too: one x264 thread per video is deterministic (workers.h264)
        files = ["package_info.json", "cache/crop_rectangles.json", "aud_ave.npy"]
        for rel in [*files, "crops_328_video.mp4", "full_body_video.mp4"]:
            assert (models / NAME / rel).read_bytes() == (imported / NAME / rel).read_bytes(), rel
        got = state_of(models / NAME / "checkpoint/best_trainloss.pth")
        assert same_state(got, state_of(imported / NAME / "checkpoint/best_trainloss.pth"))
    assert sorted(p.name for p in models.iterdir()) == [NAME]  # the old copy is gone too


def test_an_existing_package_is_refused_without_force(run, imported, capsys):
    before = (imported / NAME / "package_info.json").stat().st_mtime_ns
    code, err = import_cli(run.dataset, imported, capsys=capsys)
    assert code == 1 and f"{imported / NAME}: a package of that name exists" in err
    assert "--force" in err and (imported / NAME / "package_info.json").stat().st_mtime_ns == before


def test_name_checkpoint_and_encoder_options(run, tmp_path, capsys):
    models = tmp_path / "models"
    code, err = import_cli(
        run.dataset,
        models,
        "--name",
        "older",
        "--checkpoint",
        str(run.checkpoints / "4.pth"),
        "--encoder",
        str(run.encoder),
        capsys=capsys,
    )
    assert code == 0, err
    assert "lipsync models load older" in err
    info = json.loads((models / "older" / "package_info.json").read_text())
    assert info["dataset_name"] == "older" and info["source"]["checkpoint"] == "4.pth"
    assert same_state(
        state_of(models / "older/checkpoint/best_trainloss.pth"),
        state_of(run.checkpoints / "4.pth"),
    )
    # a folder given to --checkpoint is chosen from as SyncTalk would; best.pth wins there
    best = tmp_path / "picks"
    best.mkdir()
    shutil.copy(run.checkpoints / "9.pth", best / "best.pth")
    shutil.copy(run.checkpoints / "10.pth", best / "10.pth")
    code, err = import_cli(
        run.dataset, models, "--name", "best", "--checkpoint", str(best), capsys=capsys
    )
    assert code == 0, err
    assert (
        json.loads((models / "best/package_info.json").read_text())["source"]["checkpoint"]
        == "best.pth"
    )


def test_without_an_encoder_the_package_serves_its_own_audio_and_says_so(run, tmp_path, capsys):
    dataset = clone(run, tmp_path / "tree")
    (tmp_path / "tree" / "model").unlink()
    models = tmp_path / "models"
    code, err = import_cli(dataset, models, capsys=capsys)
    assert code == 0, err
    assert "no audio encoder" in err and "not live audio" in err
    pkg = load_package(models, NAME)
    assert pkg.encoder_checkpoint is None and pkg.info["source"]["encoder"] is None


def test_features_are_computed_from_aud_wav_when_only_the_wav_is_there(tmp_path, capsys):
    run = write_sample_run(tmp_path / "wav", name=NAME, frames=FRAMES, audio="wav")
    models = tmp_path / "models"
    code, err = import_cli(run.dataset, models, capsys=capsys)
    assert code == 0, err
    table = np.load(models / NAME / "aud_ave.npy")
    # SyncTalk's AudDataset, by hand: int((T-16)/80*25)+2 windows of 16 mel frames starting
    # at int(80*j/25) (shifted back at the end), encoded, first and last rows repeated
    rate, pcm = wavfile.read(run.dataset / "aud.wav")
    mel = melspectrogram(pcm.astype(np.float32) / 32768.0, rate)
    count = int((mel.shape[1] - 16) / 80.0 * 25.0) + 2
    starts = [min(int(80.0 * (j / 25.0)), mel.shape[1] - 16) for j in range(count)]
    windows = np.stack([mel[:, s : s + 16] for s in starts])
    encoder = AudioEncoder()
    state = torch.load(run.encoder, weights_only=True)
    encoder.load_state_dict({f"audio_encoder.{k}": v for k, v in state.items()})
    with torch.no_grad():
        feats = encoder.eval()(torch.from_numpy(windows)[:, None]).numpy()
    want = np.concatenate([feats[:1], feats, feats[-1:]])
    assert table.shape == (count + 2, 512) and table.dtype == np.float32
    np.testing.assert_allclose(table, want, rtol=1e-4, atol=1e-4)
    assert json.loads((models / NAME / "package_info.json").read_text())["source"][
        "audio_features"
    ].startswith("computed from aud.wav")


# -- feathering ------------------------------------------------------------------------------


def seam(frame: np.ndarray, plain: np.ndarray, rect: list[int], band: int = 3) -> float:
    """How sharp the seam at the rect's border is: the gradient, across the border, of
    what the paste changed (``frame - plain``, the frame without any paste), as the mean
    over the rect's four sides (corners left out) of the largest step between neighbouring
    pixels within ``band`` pixels of the side. Measured on the change rather than on the
    frame so that the avatar's own edges near the border do not count."""
    x1, y1, x2, y2 = rect
    f = np.abs((frame.astype(np.float32) - plain.astype(np.float32)).mean(axis=2))
    q = (x2 - x1) // 4
    rows, cols = slice(y1 + q, y2 - q), slice(x1 + q, x2 - q)
    steps = [
        np.abs(np.diff(f[rows, x1 - band : x1 + band], axis=1)).max(axis=1),
        np.abs(np.diff(f[rows, x2 - band : x2 + band], axis=1)).max(axis=1),
        np.abs(np.diff(f[y1 - band : y1 + band, cols], axis=0)).max(axis=0),
        np.abs(np.diff(f[y2 - band : y2 + band, cols], axis=0)).max(axis=0),
    ]
    return float(np.concatenate(steps).mean())


def test_feathering_softens_the_seam_and_off_changes_nothing(run, imported, tmp_path, capsys):
    models = tmp_path / "models"
    code, err = import_cli(run.dataset, models, "--feather-px", "8", capsys=capsys)
    assert code == 0, err
    pkg = load_package(models, NAME)
    assert pkg.feather_px == 8 and pkg.info["paste"] == {"feather_px": 8}
    hard, soft = served(imported), served(models)
    crops = served(models, mode="crop")
    rects = pkg.rects.tolist()
    full = decode_video(models / NAME / "full_body_video.mp4")
    hard_seam = [seam(hard[i], full[i], rects[i]) for i in range(FRAMES)]
    soft_seam = [seam(soft[i], full[i], rects[i]) for i in range(FRAMES)]
    print(f"seam: hard {np.mean(hard_seam):.1f}, feathered {np.mean(soft_seam):.1f} levels")
    assert np.mean(hard_seam) > 5, hard_seam  # the hard paste shows (levels per pixel)
    assert np.mean(soft_seam) < 0.5 * np.mean(hard_seam), (soft_seam, hard_seam)
    for i, (x1, y1, x2, y2) in enumerate(rects):
        # outside the rect and 8 px inside it nothing changes; crop mode sends the same pixels
        outside = np.ones(hard[i].shape[:2], bool)
        outside[y1:y2, x1:x2] = False
        assert np.array_equal(soft[i][outside], hard[i][outside])
        assert np.array_equal(
            soft[i][y1 + 8 : y2 - 8, x1 + 8 : x2 - 8], hard[i][y1 + 8 : y2 - 8, x1 + 8 : x2 - 8]
        )
        assert np.array_equal(crops[i], soft[i][y1:y2, x1:x2])
        assert np.array_equal(
            soft[i][y1, x1:x2], full[i][y1, x1:x2]
        )  # the border row is the frame's
    # off means off: an explicit 0 serves exactly the frames of a package without the option
    info = json.loads((models / NAME / "package_info.json").read_text())
    info["paste"] = {"feather_px": 0}
    (models / NAME / "package_info.json").write_text(json.dumps(info))
    for a, b in zip(served(models), hard, strict=True):
        assert np.array_equal(a, b)


def test_feather_wider_than_half_the_face_is_refused(run, tmp_path, capsys):
    err = refused(run.dataset, tmp_path / "models", "--feather-px", "40", capsys=capsys)
    assert "--feather-px 40 is more than half the smallest face rect" in err


# -- refused runs: one test per error --------------------------------------------------------


@pytest.mark.parametrize("folder", ["full_body_img", "landmarks"])
def test_missing_folder(run, tmp_path, capsys, folder):
    dataset = clone(run, tmp_path / "tree")
    shutil.rmtree(dataset / folder)
    assert f"{dataset / folder}/: missing" in refused(dataset, tmp_path / "models", capsys=capsys)


def renumber_from_one(dataset: Path) -> None:
    for sub, ext in (("full_body_img", "jpg"), ("landmarks", "lms")):
        for i in reversed(range(FRAMES)):
            (dataset / sub / f"{i}.{ext}").rename(dataset / sub / f"{i + 1}.{ext}")


def test_frames_numbered_from_one(run, tmp_path, capsys):
    dataset = clone(run, tmp_path / "tree")
    renumber_from_one(dataset)
    err = refused(dataset, tmp_path / "models", capsys=capsys)
    assert "full_body_img/0.jpg: missing" in err and "numbered from 1" in err


def test_gap_in_the_numbering(run, tmp_path, capsys):
    dataset = clone(run, tmp_path / "tree")
    (dataset / "full_body_img" / "3.jpg").unlink()
    err = refused(dataset, tmp_path / "models", capsys=capsys)
    assert "full_body_img/3.jpg: missing" in err


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda data: b"this is not a jpeg", "full_body_img/2.jpg: not a readable JPEG"),
        (lambda data: data[: len(data) // 2], "full_body_img/2.jpg: truncated JPEG"),
    ],
)
def test_unreadable_jpeg(run, tmp_path, capsys, damage, words):
    dataset = clone(run, tmp_path / "tree")
    jpg = dataset / "full_body_img" / "2.jpg"
    jpg.write_bytes(damage(jpg.read_bytes()))
    assert words in refused(dataset, tmp_path / "models", capsys=capsys)


def test_mixed_frame_sizes(run, tmp_path, capsys):
    dataset = clone(run, tmp_path / "tree")
    jpg = dataset / "full_body_img" / "4.jpg"
    cv2.imwrite(str(jpg), cv2.resize(cv2.imread(str(jpg)), (200, 150)))
    err = refused(dataset, tmp_path / "models", capsys=capsys)
    assert "full_body_img/4.jpg: 200x150, but 0.jpg is 192x144" in err


def test_missing_lms(run, tmp_path, capsys):
    dataset = clone(run, tmp_path / "tree")
    (dataset / "landmarks" / "5.lms").unlink()
    assert "landmarks/5.lms: missing" in refused(dataset, tmp_path / "models", capsys=capsys)


def test_short_lms(run, tmp_path, capsys):
    dataset = clone(run, tmp_path / "tree")
    lms = dataset / "landmarks" / "5.lms"
    lms.write_text("\n".join(lms.read_text().splitlines()[:40]))
    err = refused(dataset, tmp_path / "models", capsys=capsys)
    assert "landmarks/5.lms: 40 points, expected 110" in err


def set_point(lms: Path, index: int, x: int | None = None, y: int | None = None) -> None:
    lines = lms.read_text().splitlines()
    px, py = lines[index].split()
    lines[index] = f"{px if x is None else x} {py if y is None else y}"
    lms.write_text("\n".join(lines) + "\n")


def test_rect_leaving_the_frame(run, tmp_path, capsys):
    dataset = clone(run, tmp_path / "tree")
    set_point(dataset / "landmarks" / "3.lms", 31, x=191)  # side grows past the bottom edge
    err = refused(dataset, tmp_path / "models", capsys=capsys)
    assert "landmarks/3.lms: face rect" in err and "leaves the 192x144 frame" in err


def test_empty_rect(run, tmp_path, capsys):
    dataset = clone(run, tmp_path / "tree")
    x1 = lms_points(dataset / "landmarks" / "1.lms")[1][0]
    set_point(dataset / "landmarks" / "1.lms", 31, x=int(x1) - 5)
    err = refused(dataset, tmp_path / "models", capsys=capsys)
    assert "landmarks/1.lms: face rect" in err and "is empty: point 31's x" in err


def test_several_bad_frames_name_three_and_count_the_rest(run, tmp_path, capsys):
    dataset = clone(run, tmp_path / "tree")
    for i in (1, 2, 3, 4, 5):
        (dataset / "landmarks" / f"{i}.lms").write_text("1 2\n")
    err = refused(dataset, tmp_path / "models", capsys=capsys)
    assert "landmarks/1.lms: 1 points" in err and "landmarks/3.lms" in err
    assert "landmarks/4.lms" not in err and "and 2 more frames with problems" in err


@pytest.mark.parametrize(("file", "mode"), [("aud_hu.npy", "hubert"), ("aud_wenet.npy", "wenet")])
def test_only_hubert_or_wenet_features(run, tmp_path, capsys, file, mode):
    dataset = clone(run, tmp_path / "tree")
    (dataset / "aud_ave.npy").rename(dataset / file)
    err = refused(dataset, tmp_path / "models", capsys=capsys)
    assert f"{dataset / file}: {mode} audio features are not supported yet" in err


@pytest.mark.parametrize(
    ("array", "words"),
    [
        (np.zeros((5, 1, 512), np.float32), "shape is [5, 1, 512], expected [M, 512]"),
        (np.zeros((5, 512), np.float64), "dtype is float64, expected float32"),
    ],
)
def test_features_of_the_wrong_shape_or_dtype(run, tmp_path, capsys, array, words):
    dataset = clone(run, tmp_path / "tree")
    np.save(dataset / "aud_ave.npy", array)
    err = refused(dataset, tmp_path / "models", capsys=capsys)
    assert f"{dataset / 'aud_ave.npy'}: {words}" in err


def test_wav_only_and_no_encoder(run, tmp_path, capsys):
    dataset = clone(run, tmp_path / "tree")
    (dataset / "aud_ave.npy").unlink()
    wavfile.write(dataset / "aud.wav", 16000, np.zeros(16000, np.int16))
    (tmp_path / "tree" / "model").unlink()
    err = refused(dataset, tmp_path / "models", capsys=capsys)
    assert f"{dataset / 'aud_ave.npy'}: missing, and there is no audio encoder" in err


def test_no_checkpoint(run, tmp_path, capsys):
    dataset = clone(run, tmp_path / "tree")
    (tmp_path / "tree" / "checkpoint").unlink()
    (tmp_path / "tree" / "checkpoint" / NAME).mkdir(parents=True)
    (tmp_path / "tree" / "checkpoint" / NAME / "notes.txt").write_text("no weights")
    err = refused(dataset, tmp_path / "models", capsys=capsys)
    assert f"{tmp_path / 'tree' / 'checkpoint' / NAME}/: no checkpoint in it" in err
    shutil.rmtree(tmp_path / "tree" / "checkpoint")
    err = refused(dataset, tmp_path / "models", capsys=capsys)
    assert f"{tmp_path / 'tree' / 'checkpoint' / NAME}: no checkpoint folder there" in err


def test_checkpoint_that_does_not_load_strictly(run, tmp_path, capsys):
    state = state_of(run.checkpoints / "10.pth")
    state.pop("up1.conv.double_conv.0.conv.0.weight")
    state["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    err = refused(run.dataset, tmp_path / "models", "--checkpoint", str(bad), capsys=capsys)
    assert f"{bad}: does not fit UNet328" in err
    assert "1 missing: up1.conv.double_conv.0.conv.0.weight" in err
    assert "1 unexpected: extra.weight" in err


def test_syncnet_checkpoint(run, tmp_path, capsys):
    bad = tmp_path / "syncnet.pth"
    torch.save({"face_encoder.0.conv_block.0.weight": torch.zeros(32, 3, 7, 7)}, bad)
    err = refused(run.dataset, tmp_path / "models", "--checkpoint", str(bad), capsys=capsys)
    assert f"{bad}:" in err and "looks like a SyncNet checkpoint" in err


def test_wenet_checkpoint(run, tmp_path, capsys):
    state = state_of(run.checkpoints / "10.pth")
    state["audio_model.conv1.conv.0.weight"] = torch.zeros(64, 256, 1, 1)
    bad = tmp_path / "wenet.pth"
    torch.save(state, bad)
    err = refused(run.dataset, tmp_path / "models", "--checkpoint", str(bad), capsys=capsys)
    assert f"{bad}: does not fit UNet328" in err and "looks like a wenet-mode checkpoint" in err


def test_the_console_script_exits_1_without_a_traceback(run, tmp_path):
    """The real command in its own process, on a run numbered from 1."""
    dataset = clone(run, tmp_path / "tree")
    renumber_from_one(dataset)
    models = tmp_path / "models"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lipsync",
            "import-synctalk",
            str(dataset),
            "--models-dir",
            str(models),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert out.stderr.startswith("lipsync import-synctalk: error: ")
    assert "0.jpg: missing" in out.stderr and not models.exists()
