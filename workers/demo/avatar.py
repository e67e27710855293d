"""The demo avatar: a cartoon face drawn with OpenCV, whose mouth takes any opening and width.

Why procedural: the demo must be made by the project's own code (no downloaded faces or
weights), and a drawn face gives exact training pairs for free: the same head pose drawn
with the mouth closed (the model's reference input) and with the mouth at the opening the
audio asks for (the target). Only the mouth differs between the two, so the model's job is
small enough to learn on a laptop CPU in minutes.

Geometry is fixed in full-frame pixels (``FRAME_SIZE``); the face rectangle is the lower
face (nose to below the chin, jaw to jaw), as SyncTalk_2D crops it, and it follows the head
so that the face sits still inside the 328×328 crop while the head moves in the frame.
Everything is drawn with sub-pixel precision (``shift``) and anti-aliasing, so small head
motions move the face smoothly instead of in 1-pixel jumps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np


__all__ = [
    "CROP_SIZE",
    "FRAME_SIZE",
    "MOUTH_BOX",
    "RECT_SIDE",
    "ROI_SIZE",
    "Mouth",
    "Pose",
    "crop_328",
    "draw_frame",
    "face_rect",
    "idle_poses",
    "mouth_opening",
    "roi_320",
]

FRAME_SIZE = (480, 480)  # full frame (width, height)
SCALE = 1.0  # the face is designed in units of this many pixels
RECT_SIDE = 200  # face rectangle side in full-frame pixels
CROP_SIZE = 328
ROI_SIZE = 320

_SHIFT = 4  # fractional bits for cv2 drawing: coordinates in 1/16 pixel
_ONE = 1 << _SHIFT

# Colours (BGR).
_BG_TOP = np.array([92, 74, 58], np.float32)
_BG_BOTTOM = np.array([150, 128, 104], np.float32)
_SKIN = (150, 182, 228)
_SKIN_SHADE = (128, 160, 208)
_HAIR = (34, 44, 62)
_SHIRT = (118, 84, 52)
_EYE_WHITE = (240, 244, 246)
_IRIS = (60, 92, 128)
_PUPIL = (18, 18, 22)
_BROW = (40, 50, 70)
_LIP = (104, 104, 188)
_LIP_LINE = (84, 80, 150)
_MOUTH_DARK = (40, 28, 66)
_TEETH = (222, 230, 238)
_TONGUE = (96, 96, 196)

# Face layout in design units (× SCALE = full-frame pixels), relative to the head centre.
_HEAD_CENTRE = (240.0, 212.0)  # full-frame pixels
_HEAD_AXES = (116.0, 148.0)
_MOUTH_Y = 84.0  # mouth centre below head centre
_MOUTH_HALF_WIDTH = 37.0
_MOUTH_MAX_OPEN = 40.0
_RECT_TOP = 4.0  # rect top below the head centre: under the eyes, over the nose tip

MOUTH_BOX = (0.22, 0.26, 0.78, 0.66)
"""The mouth area as fractions of the face rectangle (x1, y1, x2, y2): it holds the widest
and most open mouth, and little else. ``mouth_opening`` measures inside it."""


@dataclass(frozen=True, slots=True)
class Pose:
    """Head position in the frame (offset from the rest position, pixels) and eyelids
    (0 open .. 1 closed)."""

    dx: float = 0.0
    dy: float = 0.0
    blink: float = 0.0


@dataclass(frozen=True, slots=True)
class Mouth:
    """``opening`` 0 (closed) .. 1 (wide open); ``width`` relative to rest (≈0.7 rounded
    as in "oo" .. ≈1.2 spread as in "ee")."""

    opening: float = 0.0
    width: float = 1.0


def idle_poses(n: int = 100, seed: int = 0) -> list[Pose]:
    """A seamless idle loop of ``n`` poses: slow head sway and one or two blinks.

    Motion is a sum of sinusoids whose periods divide ``n``, so frame ``n`` equals frame 0
    and the loop has no jump when the player wraps around.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(n) / n
    dx = np.zeros(n)
    dy = np.zeros(n)
    for k, amp in ((1, 4.0), (2, 1.5), (3, 0.8)):
        dx += amp * np.sin(2 * np.pi * k * t + rng.uniform(0, 2 * np.pi))
        dy += 0.6 * amp * np.sin(2 * np.pi * k * t + rng.uniform(0, 2 * np.pi))
    blink = np.zeros(n)
    for centre in rng.choice(np.arange(8, max(9, n - 8)), size=1 + n // 80, replace=False):
        for k in range(-3, 4):
            if 0 <= centre + k < n:
                blink[centre + k] = max(blink[centre + k], 1.0 - abs(k) / 3.5)
    return [Pose(float(a), float(b), float(c)) for a, b, c in zip(dx, dy, blink, strict=True)]


def face_rect(pose: Pose) -> tuple[int, int, int, int]:
    """The square face rectangle ``(x1, y1, x2, y2)`` of a pose, in whole pixels.

    Like SyncTalk_2D's: the lower face from the nose down to below the chin, jaw to jaw.
    """
    cx = _HEAD_CENTRE[0] + pose.dx
    top = _HEAD_CENTRE[1] + pose.dy + _RECT_TOP * SCALE
    x1 = int(round(cx - RECT_SIDE / 2))
    y1 = int(round(top))
    return x1, y1, x1 + RECT_SIDE, y1 + RECT_SIDE


class _Canvas:
    """Draws in design units relative to an origin (the head centre), scaled by SCALE,
    with sub-pixel precision and anti-aliasing."""

    def __init__(self, img: np.ndarray, ox: float, oy: float, scale: float = SCALE) -> None:
        self.img = img
        self.ox = ox
        self.oy = oy
        self.s = scale

    def _fixed(self, pts: np.ndarray) -> np.ndarray:
        xy = np.asarray(pts, np.float64).reshape(-1, 2) * self.s + (self.ox, self.oy)
        return np.round(xy * _ONE).astype(np.int32).reshape(-1, 1, 2)

    def ellipse(
        self,
        centre: tuple[float, float],
        axes: tuple[float, float],
        colour: tuple[int, int, int],
        start: float = 0,
        end: float = 360,
        thickness: int = -1,
    ) -> None:
        c = self._fixed(np.array(centre))[0, 0]
        ax = (int(round(axes[0] * self.s * _ONE)), int(round(axes[1] * self.s * _ONE)))
        t = thickness if thickness < 0 else max(1, int(round(thickness * self.s)))
        cv2.ellipse(
            self.img, (int(c[0]), int(c[1])), ax, 0, start, end, colour, t, cv2.LINE_AA, _SHIFT
        )

    def poly(self, pts: np.ndarray, colour: tuple[int, int, int]) -> None:
        cv2.fillPoly(self.img, [self._fixed(pts)], colour, cv2.LINE_AA, _SHIFT)

    def line(self, pts: np.ndarray, colour: tuple[int, int, int], thickness: float) -> None:
        t = max(1, int(round(thickness * self.s)))
        cv2.polylines(self.img, [self._fixed(pts)], False, colour, t, cv2.LINE_AA, _SHIFT)


def _background() -> np.ndarray:
    w, h = FRAME_SIZE
    a = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    grad = _BG_TOP * (1 - a) + _BG_BOTTOM * a
    return np.ascontiguousarray(np.broadcast_to(grad, (h, w, 3))).astype(np.uint8)


_BACKGROUND: np.ndarray | None = None


def draw_frame(pose: Pose, mouth: Mouth = Mouth()) -> np.ndarray:
    """The full frame (``FRAME_SIZE``, uint8 BGR) of the avatar in ``pose`` with ``mouth``."""
    global _BACKGROUND
    if _BACKGROUND is None:
        _BACKGROUND = _background()
    img = _BACKGROUND.copy()
    c = _Canvas(img, _HEAD_CENTRE[0] + pose.dx, _HEAD_CENTRE[1] + pose.dy)
    ax, ay = _HEAD_AXES
    # Shoulders and neck move less than the head.
    body = _Canvas(img, _HEAD_CENTRE[0] + 0.3 * pose.dx, _HEAD_CENTRE[1] + 0.3 * pose.dy)
    body.ellipse((0, 308), (200, 130), _SHIRT)
    c.poly(np.array([[-44, 90], [44, 90], [50, 208], [-50, 208]]), _SKIN_SHADE)
    # Hair behind the head, ears, face and jaw, hair cap.
    c.ellipse((0, -22), (ax + 12, ay - 6), _HAIR)
    for side in (-1, 1):
        c.ellipse((side * (ax - 4), 6), (15, 27), _SKIN_SHADE)
    c.ellipse((0, 0), (ax, ay), _SKIN)
    c.ellipse((0, -58), (ax + 4, 92), _HAIR, 180, 360)
    # Eyes, lids, brows.
    for side in (-1, 1):
        ex, ey = side * 44, -30
        c.ellipse((ex, ey), (19, 10.5), _EYE_WHITE)
        c.ellipse((ex + side * 1.5, ey), (7.5, 7.5), _IRIS)
        c.ellipse((ex + side * 1.5, ey), (3.6, 3.6), _PUPIL)
        c.ellipse((ex + side * 1.5 - 2.5, ey - 2.5), (1.6, 1.6), (250, 250, 250))
        if pose.blink > 0.02:
            lid = 21.0 * pose.blink
            c.ellipse((ex, ey - 11 + lid / 2), (20.5, lid / 2 + 0.6), _SKIN)
        brow = np.array(
            [
                [ex - side * 20, ey - 20],
                [ex - side * 2, ey - 29],
                [ex + side * 21, ey - 23],
                [ex + side * 21, ey - 19],
                [ex - side * 2, ey - 24],
                [ex - side * 20, ey - 16],
            ]
        )
        c.poly(brow, _BROW)
    # Nose: a soft shadow on one side and two nostrils (all above the face rectangle).
    c.poly(np.array([[2, -16], [9, 22], [3, 31], [0, 29]]), _SKIN_SHADE)
    for side in (-1, 1):
        c.ellipse((side * 9, 33), (5.5, 3.0), _LIP_LINE)
    c.ellipse((0, 128), (16, 4), _SKIN_SHADE, 0, 180, 2)  # chin crease
    _draw_mouth(img, c.ox, c.oy + _MOUTH_Y * SCALE, mouth)
    return img


def _draw_mouth(img: np.ndarray, mx: float, my: float, mouth: Mouth) -> None:
    """Lips around a dark opening, with upper teeth and tongue when it is open enough.

    Drawn in a local patch with its own mask so that teeth and tongue never spill over the
    lips; the patch is then blended back into the frame.
    """
    opening = float(np.clip(mouth.opening, 0.0, 1.0))
    half_w = _MOUTH_HALF_WIDTH * float(np.clip(mouth.width, 0.6, 1.3)) * (1.0 - 0.12 * opening)
    h = _MOUTH_MAX_OPEN * opening
    xs = np.linspace(-1.0, 1.0, 41)
    bulge = np.sqrt(np.clip(1.0 - xs**2, 0.0, 1.0))
    inner_w = half_w * 0.9
    upper_in = -0.35 * h * bulge**1.2
    lower_in = 0.65 * h * bulge**0.9
    bow = 1.8 * np.exp(-((xs / 0.12) ** 2))  # cupid's bow dip at the centre
    upper_out = upper_in - (2.0 + 7.0 * bulge) + bow
    lower_out = lower_in + (2.0 + 9.5 * bulge)
    x = xs * half_w
    lips = np.concatenate([np.stack([x, upper_out], 1), np.stack([x[::-1], lower_out[::-1]], 1)])
    inner = np.concatenate(
        [np.stack([xs * inner_w, upper_in], 1), np.stack([xs[::-1] * inner_w, lower_in[::-1]], 1)]
    )

    pad = 8.0
    x0 = int(math.floor(mx - (_MOUTH_HALF_WIDTH * 1.3 + pad) * SCALE))
    y0 = int(math.floor(my - (0.35 * _MOUTH_MAX_OPEN + 12 + pad) * SCALE))
    x1 = int(math.ceil(mx + (_MOUTH_HALF_WIDTH * 1.3 + pad) * SCALE))
    y1 = int(math.ceil(my + (0.65 * _MOUTH_MAX_OPEN + 14 + pad) * SCALE))
    patch = img[y0:y1, x0:x1]
    c = _Canvas(patch, mx - x0, my - y0)
    c.poly(lips, _LIP)
    if h < 1.0:  # closed: the line where the lips meet
        c.line(np.stack([x * 0.92, 0.5 * upper_in + 0.5 * lower_in], 1), _LIP_LINE, 1.5)
        return
    mask = np.zeros(patch.shape[:2], np.uint8)
    _Canvas(mask, c.ox, c.oy).poly(inner, (255, 255, 255))
    inside = np.empty_like(patch)
    inside[:] = _MOUTH_DARK
    ci = _Canvas(inside, c.ox, c.oy)
    teeth_h = min(0.16 * h, 4.5)
    teeth = np.concatenate(
        [
            np.stack([xs * inner_w * 0.7, upper_in - 2], 1),
            np.stack([xs * inner_w * 0.62, upper_in * 0.8 + teeth_h], 1)[::-1],
        ]
    )
    ci.poly(teeth, _TEETH)
    tongue_h = 0.16 * h + 1.5
    ci.ellipse((0, lower_in.max() + 0.4 * tongue_h), (inner_w * 0.5, tongue_h), _TONGUE)
    alpha = (mask.astype(np.float32) / 255.0)[:, :, None]
    patch[:] = (patch * (1 - alpha) + inside * alpha + 0.5).astype(np.uint8)


def crop_328(frame: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    """The face rectangle resized to 328×328 (cubic), as SyncTalk_2D crops it."""
    x1, y1, x2, y2 = rect
    return cv2.resize(frame[y1:y2, x1:x2], (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_CUBIC)


def roi_320(frame: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    """The model's face region: ``crop_328[4:324, 4:324]``."""
    return np.ascontiguousarray(crop_328(frame, rect)[4:324, 4:324])


def mouth_opening(image: np.ndarray, dark: int = 72) -> float:
    """How open the mouth is in a face-rectangle image (any size: a crop, a ROI-sized crop
    or a crop-mode JPEG): the fraction of dark pixels inside ``MOUTH_BOX``.

    The mouth's inside is the only dark thing there (lips, teeth, tongue and skin are all
    well above ``dark`` in grey level), so the count grows with the opening and is ≈0 when
    the mouth is closed. For a 320×320 ROI pass the ROI's own box via ``roi=True``-style
    cropping beforehand; the 4-pixel margin changes the result by a few percent at most.
    """
    h, w = image.shape[:2]
    bx1, by1, bx2, by2 = MOUTH_BOX
    box = image[int(by1 * h) : int(by2 * h), int(bx1 * w) : int(bx2 * w)]
    grey = cv2.cvtColor(box, cv2.COLOR_BGR2GRAY) if box.ndim == 3 else box
    return float(np.count_nonzero(grey < dark)) / float(grey.size)
