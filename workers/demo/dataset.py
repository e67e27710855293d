"""Training data for the demo: the avatar's idle loop, speech clips, and (input, target) pairs.

A training sample is a (clip, frame, pose) triple:

* audio: the 16-row feature window of frame ``i`` of a synthetic speech clip (the encoder
  turns the clip's mel windows into rows; ``workers.audio.audio_window`` folds them);
* image input: pose ``j`` of the idle loop exactly as a worker will see it: the frame
  decoded from the package's ``rois_320`` and ``model_inputs`` videos, mouth closed;
* target: pose ``j`` drawn afresh with the mouth that frame ``i``'s audio asks for.

Poses and frames are drawn independently, as a worker pairs any frame of the loop with
whatever audio arrives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workers.demo.avatar import (
    Mouth,
    Pose,
    crop_328,
    draw_frame,
    face_rect,
    idle_poses,
    roi_320,
)
from workers.demo.speech import FPS, SAMPLE_RATE, Speech, synthesize
from workers.mel import mel_windows, melspectrogram


__all__ = [
    "Clip",
    "IdleLoop",
    "render_idle",
    "speech_clips",
    "target_roi",
]


@dataclass(slots=True)
class IdleLoop:
    """The package's own frames: mouth closed, head swaying, eyes blinking."""

    poses: list[Pose]
    rects: np.ndarray  # int32 [N, 4]
    full: np.ndarray  # uint8 [N, H, W, 3]
    crops: np.ndarray  # uint8 [N, 328, 328, 3]

    def __len__(self) -> int:
        return len(self.poses)


def render_idle(n: int, seed: int) -> IdleLoop:
    """Draw the ``n``-frame idle loop (closed mouth in every frame)."""
    poses = idle_poses(n, seed)
    rects = np.array([face_rect(p) for p in poses], dtype=np.int32)
    full = np.stack([draw_frame(p) for p in poses])
    crops = np.stack([crop_328(f, tuple(r)) for f, r in zip(full, rects, strict=True)])
    return IdleLoop(poses, rects, full, crops)


@dataclass(slots=True)
class Clip:
    """One synthetic speech clip with its per-frame mel windows and mouth targets."""

    speech: Speech
    windows: np.ndarray  # float32 [n_frames, 80, 16]

    @property
    def n_frames(self) -> int:
        return self.speech.n_frames


def speech_clips(seconds: float, clip_seconds: float, seed: int) -> list[Clip]:
    """``seconds`` of speech as clips of ``clip_seconds`` (each with its own noise floor)."""
    clips = []
    for k in range(max(1, int(round(seconds / clip_seconds)))):
        speech = synthesize(clip_seconds, seed=seed * 1000 + k, sr=SAMPLE_RATE, fps=FPS)
        mel = melspectrogram(speech.audio, SAMPLE_RATE)
        clips.append(Clip(speech, mel_windows(mel, speech.n_frames, FPS)))
    return clips


def target_roi(pose: Pose, opening: float, width: float) -> np.ndarray:
    """The 320×320 face region of ``pose`` with the mouth at ``opening``/``width``."""
    frame = draw_frame(pose, Mouth(opening, width))
    return roi_320(frame, face_rect(pose))
