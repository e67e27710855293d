"""Paste-back: the model's 320x320 prediction back into the frame (DESIGN.md section 5, step 4).

SyncTalk_2D writes the face square into the frame with a hard edge. Where the prediction's
colours drift from the frame around it (an under-trained model, a lighting change) the
square shows as a seam, a faint rectangle around the mouth. A package may ask for a
feathered paste instead (``"paste": {"feather_px": N}`` in ``package_info.json``): the
square is blended into the frame with a weight that is 1 inside and falls to 0 at the
square's border over N pixels, so the seam becomes a ramp the eye does not catch. With
N = 0 (the default) the paste is exactly SyncTalk's, byte for byte.

``feather_alpha`` is plain numpy so that a GPU paste can turn the same weights into a
tensor once per rect size; ``paste_face`` is the CPU paste the engine runs.
"""

from __future__ import annotations

import cv2
import numpy as np


__all__ = ["ROI_OFFSET", "blend", "face_from_prediction", "feather_alpha", "paste_face"]

ROI_OFFSET = 4
"""The prediction covers ``crop[4:324, 4:324]`` of the 328x328 face crop."""


def feather_alpha(side: int, feather_px: int) -> np.ndarray:
    """The blend weight of the pasted square: float32 ``[side, side]`` in [0, 1].

    1 everywhere when ``feather_px`` is 0; otherwise 1 inside and ramping to 0 at the
    border: along each axis the weight of a pixel ``d`` pixels in from the nearest edge is
    ``smoothstep(d / feather_px)`` (so the outermost row and column are 0: the frame's own
    pixels), and the square's weight is the product of the two axes (rounded corners, and
    separable: one row vector times one column vector). ``feather_px`` larger than half
    the side is clamped to it.
    """
    if type(side) is not int or side < 1:
        raise ValueError(f"side must be a positive integer, not {side!r}")
    if type(feather_px) is not int or feather_px < 0:
        raise ValueError(f"feather_px must be an integer >= 0, not {feather_px!r}")
    if feather_px == 0:
        return np.ones((side, side), dtype=np.float32)
    n = min(feather_px, max(1, side // 2))
    idx = np.arange(side, dtype=np.float64)
    inward = np.minimum(idx, side - 1 - idx)  # pixels in from the nearest edge
    t = np.clip(inward / n, 0.0, 1.0)
    ramp = t * t * (3.0 - 2.0 * t)  # smoothstep: no visible kink where the ramp meets 1
    return np.outer(ramp, ramp).astype(np.float32)


def blend(face: np.ndarray, background: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``round(alpha * face + (1 - alpha) * background)`` as uint8 (both ``[h, w, 3]``)."""
    a = alpha[:, :, None]
    out = a * face.astype(np.float32) + (1.0 - a) * background.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def face_from_prediction(crop328: np.ndarray, pred: np.ndarray, side: int) -> np.ndarray:
    """The face square to write into the frame: ``pred`` (uint8 ``[320, 320, 3]``) pasted
    into a copy of the 328x328 crop at ``[4:324, 4:324]``, resized (cubic) to ``side``."""
    crop = crop328.copy()
    crop[ROI_OFFSET : ROI_OFFSET + pred.shape[0], ROI_OFFSET : ROI_OFFSET + pred.shape[1]] = pred
    return cv2.resize(crop, (side, side), interpolation=cv2.INTER_CUBIC)


def paste_face(
    crop328: np.ndarray, pred: np.ndarray, region: np.ndarray, feather_px: int = 0
) -> np.ndarray:
    """The pixels of the frame's face rect after the paste: ``[side, side, 3]`` uint8.

    ``region`` is the frame's own pixels at the rect (what the face is blended into); with
    ``feather_px`` 0 it is not read and the result is SyncTalk's hard-edged face square.
    Crop-mode answers send exactly these pixels, composite answers write them into the
    frame, so both modes show the same blend.
    """
    side = region.shape[0]
    face = face_from_prediction(crop328, pred, side)
    if feather_px == 0:
        return face
    return blend(face, region, feather_alpha(side, feather_px))
