"""``lipsync import-synctalk``: a SyncTalk_2D training run becomes a model package.

A user who trained SyncTalk_2D on their own video holds ``dataset/<name>/`` (JPEG frames,
landmarks, audio features) and ``checkpoint/<name>/<epoch>.pth``. This writes the section-6
package whose frames equal what SyncTalk_2D's ``inference_328.py`` makes from them:

* the face rect of frame i from its landmarks, and crops_328 / rois_320 / model_inputs
  computed from the frame's own JPEG (never from a re-decoded video), then all four
  videos encoded with little loss (``workers.h264``);
* ``aud_ave.npy`` copied, or computed from ``aud.wav`` with our mel and the AVE encoder
  the way SyncTalk's ``AudDataset`` does (rows and padding: ``workers.synctalk_dataset``);
* the checkpoint SyncTalk would load (``best.pth``, else the newest epoch by number),
  loaded strictly into our UNet and saved as a raw state dict; the encoder beside it;
* ``package_info.json`` with a ``source`` block saying where it all came from.

Everything that can be checked before the long part is checked first (folders, numbering,
every landmark file and rect, audio features, checkpoint, encoder), each problem named with
its file; JPEGs are checked as they are read. The package is built under a hidden temporary
name in the models dir, validated with ``workers.package``, and renamed into place at the
end, so a failed or interrupted import leaves nothing behind and a worker scanning the
models dir never sees half a package.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from workers.audio import AudioFeaturizer
from workers.audio_encoder import AudioEncoder
from workers.checkpoint import (
    CheckpointError,
    infer_channels,
    load_audio_encoder,
    load_strict,
    read_state_dict,
)
from workers.demo.progress import Progress
from workers.h264 import describe as describe_videos
from workers.make_package import PackageVideos, save_checkpoints, write_metadata
from workers.mel import SAMPLE_RATE, mel_windows, melspectrogram, resample_to_16k
from workers.package import (
    AUDIO_FEATURES,
    CROP_SIZE,
    PackageError,
    check_model_name,
    load_package,
    read_features,
)
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
from workers.unet import UNet328, width_name


__all__ = ["IMPORTER_VERSION", "DatasetError", "ImportPlan", "import_synctalk", "plan", "run"]

IMPORTER_VERSION = 1
"""Bumped whenever the importer writes a package differently."""

ENCODER_PLACES = (
    "model/checkpoints/audio_visual_encoder.pth",
    "data_utils/ave/checkpoints/audio_encoder.pth",
)
"""Where a SyncTalk_2D checkout keeps the AVE encoder (the same file twice), from its root."""

_OTHER_FEATURES = {"aud_hu.npy": "hubert", "aud_wenet.npy": "wenet"}

Say = Callable[[str], None]


@dataclass
class ImportPlan:
    """Everything checked and loaded before any frame is read."""

    dataset: Path
    name: str
    frames: int
    frame_size: tuple[int, int]  # width, height
    rects: np.ndarray  # int32 [N, 4]
    features: Path  # aud_ave.npy to copy, or aud.wav to encode
    checkpoint: Path
    unet: UNet328
    channels: tuple[int, ...]
    encoder_file: Path | None
    encoder: AudioEncoder | None
    feather_px: int
    notes: list[str] = field(default_factory=list)

    @property
    def computes_features(self) -> bool:
        return self.features.suffix == ".wav"


def run(args: argparse.Namespace) -> int:
    """The CLI: import, print the package path; on any problem one line and exit status 1."""
    models_dir = args.models_dir or os.environ.get("LIPSYNC_MODELS_DIR") or "models"
    prog = "lipsync import-synctalk"

    def say(message: str) -> None:
        print(f"{prog}: {message}", file=sys.stderr, flush=True)

    try:
        path = import_synctalk(
            args.dataset,
            models_dir=models_dir,
            name=args.name,
            checkpoint=args.checkpoint,
            encoder=args.encoder,
            force=args.force,
            feather_px=args.feather_px,
            say=say,
        )
    except DatasetError as exc:
        say(f"error: {exc}")
        return 1
    except OSError as exc:  # disk full, permissions: name the file
        where = f"{exc.filename}: " if exc.filename else ""
        say(f"error: {where}{exc.strerror or exc}")
        return 1
    except Exception as exc:  # a bug: still one readable line, and nothing left behind
        say(f"error: unexpected {type(exc).__name__}: {exc}")
        return 1
    print(path)
    return 0


def import_synctalk(
    dataset: str | os.PathLike[str],
    *,
    models_dir: str | os.PathLike[str] = "models",
    name: str | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    encoder: str | os.PathLike[str] | None = None,
    force: bool = False,
    feather_px: int = 0,
    progress: bool | None = None,
    say: Say | None = None,
) -> Path:
    """Import the run of ``dataset`` (its ``dataset/<name>/`` folder) into ``models_dir``
    and return the package's path; raises ``DatasetError`` naming the file at fault.

    ``progress`` None shows a bar only when stderr is a terminal.
    """
    tell: Say = say or (lambda _m: None)
    t0 = time.monotonic()
    root = Path(models_dir)
    p = plan(
        dataset, models_dir=root, name=name, checkpoint=checkpoint, encoder=encoder, force=force
    )
    p.feather_px = _check_feather(feather_px, p.rects)
    final = root / p.name
    for note in p.notes:
        tell(note)
    show = sys.stderr.isatty() if progress is None else progress
    bar = Progress(p.frames + 2, enabled=show, label="import")
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{p.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _build(tmp, p, bar)
        bar.close("done")
        _swap_into_place(tmp, final, force)
    except BaseException:
        if show:
            sys.stderr.write("\n")  # the message goes under the bar, not after it
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                root.rmdir()  # only if still empty
        raise
    width = width_name(p.channels) or "custom"
    tell(
        f"package {p.name}: {p.frames} frames {p.frame_size[0]}x{p.frame_size[1]}, {width} "
        f"width, from {p.checkpoint.name}, in {time.monotonic() - t0:.1f} s; a running "
        f"system loads it with `lipsync models load {p.name}`"
    )
    return final


def plan(
    dataset: str | os.PathLike[str],
    *,
    models_dir: Path,
    name: str | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    encoder: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> ImportPlan:
    """Check the run and load its weights; raises ``DatasetError``. Reads no frame but
    the first (for the frame size). Without ``force`` an existing package is refused
    first, before anything slow."""
    folder = Path(dataset)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a directory (give the dataset/<name>/ folder)")
    folder = folder.resolve()
    model_name = name if name is not None else folder.name
    try:
        check_model_name(model_name)
    except ValueError as exc:
        hint = "" if name is not None else " (the dataset folder's name; pass --name)"
        raise DatasetError(f"{exc}{hint}") from None
    final = models_dir / model_name
    if (final.exists() or final.is_symlink()) and not force:
        raise DatasetError(f"{final}: a package of that name exists (--force replaces it)")
    notes: list[str] = []
    for sub in ("full_body_img", "landmarks"):
        if not (folder / sub).is_dir():
            raise DatasetError(
                f"{folder / sub}/: missing; a SyncTalk_2D dataset folder holds full_body_img/ "
                "and landmarks/ once data_utils/process.py has run"
            )
    n = frame_count(os.listdir(folder / "full_body_img"))
    first = _read_frame(folder, 0)
    if isinstance(first, str):
        raise DatasetError(first)
    height, width = first.shape[:2]
    rects = _rects(folder, n, width, height)
    features = _features_file(folder, n, notes)
    ckpt = _checkpoint_file(folder, model_name, checkpoint)
    unet, channels = _load_unet(ckpt)
    enc_file, enc = _encoder(folder, encoder, notes)
    if features.suffix == ".wav" and enc is None:
        raise DatasetError(
            f"{folder / AUDIO_FEATURES}: missing, and there is no audio encoder to compute "
            f"it from aud.wav (pass --encoder FILE)"
        )
    return ImportPlan(
        dataset=folder,
        name=model_name,
        frames=n,
        frame_size=(width, height),
        rects=rects,
        features=features,
        checkpoint=ckpt,
        unet=unet,
        channels=channels,
        encoder_file=enc_file,
        encoder=enc,
        feather_px=0,
        notes=notes,
    )


# -- checks before the frames --------------------------------------------------------------


def _rects(folder: Path, n: int, width: int, height: int) -> np.ndarray:
    """Every frame's rect from its .lms file; all problems at once (the first three named)."""
    rects = np.zeros((n, 4), dtype=np.int32)
    problems: list[str] = []
    for i in range(n):
        rel = f"landmarks/{i}.lms"
        try:
            text = (folder / rel).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            problems.append(f"{rel}: missing")
            continue
        except OSError as exc:
            problems.append(f"{rel}: unreadable ({exc.strerror or exc})")
            continue
        try:
            rect = face_rect(parse_landmarks(text, rel))
        except DatasetError as exc:
            problems.append(str(exc))
            continue
        problem = rect_problem(rect, width, height)
        if problem:
            problems.append(f"{rel}: {problem}")
            continue
        rects[i] = rect
    if problems:
        raise DatasetError(summarise(problems))
    return rects


def _features_file(folder: Path, n: int, notes: list[str]) -> Path:
    """``aud_ave.npy`` (checked), else ``aud.wav`` to encode; other modes are refused."""
    npy = folder / AUDIO_FEATURES
    others = [f for f in _OTHER_FEATURES if (folder / f).is_file()]
    if npy.is_file():
        _check_features(npy, n, notes)
        if others:
            notes.append(
                f"note: {' and '.join(others)} found too; importing the ave features "
                f"({AUDIO_FEATURES}): the checkpoint must have been trained with --asr ave"
            )
        return npy
    if others:
        mode = _OTHER_FEATURES[others[0]]
        raise DatasetError(
            f"{folder / others[0]}: {mode} audio features are not supported yet (only ave: "
            f"{AUDIO_FEATURES}, from a model trained with --asr ave)"
        )
    wav = folder / "aud.wav"
    if wav.is_file():
        return wav
    raise DatasetError(f"{npy}: missing, and no aud.wav to compute it from")


def _check_features(npy: Path, n: int, notes: list[str]) -> None:
    try:
        rows = read_features(npy).shape[0]
    except ValueError as exc:
        raise DatasetError(f"{npy}: {exc}") from None
    if abs(rows - n) > 2:
        notes.append(
            f"note: {AUDIO_FEATURES} has {rows} rows for {n} frames (SyncTalk_2D writes "
            f"about one per frame); frames past the table get silent audio windows"
        )


def _checkpoint_file(folder: Path, name: str, given: str | os.PathLike[str] | None) -> Path:
    """The file given, or SyncTalk's choice in the folder given / ``../../checkpoint/<name>``."""
    where = Path(given) if given is not None else folder.parent.parent / "checkpoint" / folder.name
    if given is not None and where.is_file():
        return where.resolve()
    if not where.is_dir():
        what = "no such file or folder" if given is not None else "no checkpoint folder there"
        raise DatasetError(f"{where}: {what} (pass --checkpoint FILE|DIR)")
    choice = choose_checkpoint(os.listdir(where))
    if choice is None:
        raise DatasetError(
            f"{where}/: no checkpoint in it (<epoch>.pth or best.pth; pass --checkpoint FILE)"
        )
    return (where / choice).resolve()


def _load_unet(file: Path) -> tuple[UNet328, tuple[int, ...]]:
    """The UNet of ``file``, loaded strictly; the error says what the file looks like."""
    state: dict[str, torch.Tensor] = {}
    try:
        state = read_state_dict(file)
        channels = infer_channels(state)
        unet = UNet328(channels)
        load_strict(unet, state, file)
    except CheckpointError as exc:
        message = str(exc)
        if not message.startswith(str(file)):
            message = f"{file}: {message}"
        hint = checkpoint_hint(state)
        raise DatasetError(f"{message}; {hint}" if hint else message) from None
    return unet.eval(), channels


def _encoder(
    folder: Path, given: str | os.PathLike[str] | None, notes: list[str]
) -> tuple[Path | None, AudioEncoder | None]:
    root = folder.parent.parent
    if given is not None:
        file = Path(given)
    else:
        found = [root / rel for rel in ENCODER_PLACES if (root / rel).is_file()]
        if not found:
            notes.append(
                f"note: no audio encoder (looked for {root / ENCODER_PLACES[0]} and "
                f"{root / ENCODER_PLACES[1]}; --encoder FILE gives one): the package serves "
                f"its own recording's audio, not live audio"
            )
            return None, None
        file = found[0]
    try:
        return file.resolve(), load_audio_encoder(file)
    except CheckpointError as exc:
        raise DatasetError(str(exc)) from None


def _check_feather(feather_px: int, rects: np.ndarray) -> int:
    if type(feather_px) is not int or feather_px < 0:
        raise DatasetError(f"--feather-px must be an integer >= 0, not {feather_px!r}")
    smallest = int((rects[:, 2] - rects[:, 0]).min())
    if feather_px > smallest // 2:
        raise DatasetError(
            f"--feather-px {feather_px} is more than half the smallest face rect ({smallest} px)"
        )
    return feather_px


# -- building ------------------------------------------------------------------------------


def _build(tmp: Path, p: ImportPlan, bar: Progress) -> None:
    (tmp / "cache").mkdir(parents=True)
    (tmp / "checkpoint").mkdir()
    bar.set_stage("frames -> videos")
    _write_videos(tmp, p, bar)
    bar.set_stage("weights and audio features")
    save_checkpoints(tmp, p.unet, p.encoder)
    if p.computes_features:
        assert p.encoder is not None
        np.save(tmp / AUDIO_FEATURES, _features_from_wav(p.features, p.encoder))
    else:
        shutil.copyfile(p.features, tmp / AUDIO_FEATURES)
    bar.step()
    extra: dict[str, Any] = {"source": _source(p)}
    if p.feather_px:
        extra["paste"] = {"feather_px": p.feather_px}
    write_metadata(tmp, p.name, p.rects, list(p.channels), extra)
    try:
        load_package(tmp.parent, tmp.name)  # what a worker will check, before it is in place
    except PackageError as exc:  # pragma: no cover - a bug here, not in the user's run
        raise DatasetError(f"the written package does not load: {exc}") from None
    bar.step()


def _write_videos(tmp: Path, p: ImportPlan, bar: Progress) -> None:
    """One pass over the JPEGs: crop, resize and write all four videos. After a bad JPEG
    nothing more is written, but the rest are still read so the message can count them."""
    problems: list[str] = []
    with PackageVideos(tmp, p.frame_size, codec="h264") as videos:
        for i, image in _frames(p.dataset, p.frames):
            if isinstance(image, str):
                problems.append(image)
            elif image.shape[:2] != (p.frame_size[1], p.frame_size[0]):
                h, w = image.shape[:2]
                problems.append(
                    f"full_body_img/{i}.jpg: {w}x{h}, but 0.jpg is "
                    f"{p.frame_size[0]}x{p.frame_size[1]} (frames of one size only)"
                )
            elif not problems:
                x1, y1, x2, y2 = (int(v) for v in p.rects[i])
                crop = cv2.resize(
                    image[y1:y2, x1:x2], (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_CUBIC
                )
                videos.write(image, crop)
            bar.step(note=f"frame {i + 1}/{p.frames}")
    if problems:
        raise DatasetError(summarise(problems))


def _frames(folder: Path, n: int) -> Iterator[tuple[int, np.ndarray | str]]:
    """Frames 0..n-1 decoded (or the problem with each), read ahead on a helper thread:
    OpenCV decodes without the GIL, so decoding overlaps the encoding."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="jpeg") as pool:
        ahead = 4
        futures: dict[int, Future[np.ndarray | str]] = {
            i: pool.submit(_read_frame, folder, i) for i in range(min(ahead, n))
        }
        for i in range(n):
            image = futures.pop(i).result()
            if i + ahead < n:
                futures[i + ahead] = pool.submit(_read_frame, folder, i + ahead)
            yield i, image


def _read_frame(folder: Path, i: int) -> np.ndarray | str:
    """Frame ``i`` as uint8 BGR (what ``cv2.imread`` gives SyncTalk), or what is wrong."""
    rel = f"full_body_img/{i}.jpg"
    try:
        data = (folder / rel).read_bytes()
    except OSError as exc:
        return f"{rel}: unreadable ({exc.strerror or exc})"
    if not data.startswith(b"\xff\xd8"):
        return f"{rel}: not a readable JPEG (it does not start like one)"
    if not data.rstrip(b"\0\r\n ").endswith(b"\xff\xd9"):
        return f"{rel}: truncated JPEG (no end-of-image marker)"
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        return f"{rel}: not a readable JPEG"
    return image


def _features_from_wav(wav: Path, encoder: AudioEncoder) -> np.ndarray:
    """``aud_ave.npy`` as SyncTalk_2D computes it from ``aud.wav``: the encoder on every
    frame's 16-step mel window, ``int((T-16)/80*25)+2`` windows, first/last row repeated.

    Our mel matches librosa's to 1e-3 (``tests/test_mel.py``); librosa before 0.10 padded
    the STFT by reflection, which changes the first and last two mel frames only.
    """
    audio = _read_wav(wav)
    mel = melspectrogram(audio, SAMPLE_RATE)
    if mel.shape[1] < 16:
        raise DatasetError(f"{wav}: too short ({len(audio) / SAMPLE_RATE:.2f} s)")
    windows = mel_windows(mel, feature_rows(mel.shape[1]))
    return pad_features(AudioFeaturizer(encoder).encode(windows))


def _read_wav(wav: Path) -> np.ndarray:
    """Mono float32 at 16 kHz, as ``librosa.load(path, sr=16000)`` gives SyncTalk."""
    from scipy.io import wavfile

    try:
        with warnings.catch_warnings():  # ffmpeg's LIST chunk: harmless, not for the user
            warnings.simplefilter("ignore", wavfile.WavFileWarning)
            rate, data = wavfile.read(wav)
    except (ValueError, OSError) as exc:
        raise DatasetError(f"{wav}: not a readable wav file ({exc})") from None
    scale = {np.dtype(np.int16): 32768.0, np.dtype(np.int32): 2.0**31}
    if data.dtype in scale:
        audio = data.astype(np.float32) / scale[data.dtype]
    elif data.dtype == np.uint8:
        audio = (data.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(data.dtype, np.floating):
        audio = data.astype(np.float32)
    else:
        raise DatasetError(f"{wav}: samples of type {data.dtype} are not supported")
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if not len(audio):
        raise DatasetError(f"{wav}: holds no samples")
    try:
        return resample_to_16k(audio, int(rate))
    except ValueError as exc:
        raise DatasetError(f"{wav}: {exc} (data_utils/process.py writes 16000 Hz)") from None


def _source(p: ImportPlan) -> dict[str, Any]:
    """Where the package came from. No times or temporary paths: importing the same run
    twice gives the same metadata."""
    return {
        "kind": "synctalk_2d",
        "dataset": str(p.dataset),
        "frames": p.frames,
        "frame_size": list(p.frame_size),
        "checkpoint": p.checkpoint.name,
        "checkpoint_path": str(p.checkpoint),
        "checkpoint_sha256": _sha256(p.checkpoint),
        "encoder": None if p.encoder_file is None else str(p.encoder_file),
        "audio_features": (
            "computed from aud.wav (our mel + encoder)" if p.computes_features else p.features.name
        ),
        "videos": describe_videos(),
        "importer": "lipsync import-synctalk",
        "importer_version": IMPORTER_VERSION,
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _swap_into_place(tmp: Path, final: Path, force: bool) -> None:
    """Rename the finished build to its name; with ``force`` the old package is moved
    aside first and removed after (workers that map its frame caches keep their copy)."""
    old: Path | None = None
    if final.exists() or final.is_symlink():
        if not force:
            raise DatasetError(f"{final}: a package of that name appeared during the import")
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    try:
        tmp.rename(final)
    except BaseException:
        if old is not None:
            old.rename(final)
        raise
    if old is not None:
        if old.is_symlink():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)
