"""Paste-back as tensor ops: the model's prediction into the avatar frame, on its device.

DESIGN.md section 5, steps 4 and 5, for a whole batch at once: the 320×320 prediction goes
into a copy of the 328×328 crop at ``[4:324, 4:324]``, that image is resized (bicubic) to
the face rectangle's side, and the result is either returned alone (``crop`` mode) or
written into a copy of the full frame at the rectangle (``composite`` mode).

Why tensors: on a GPU the OpenCV path makes every frame cross the bus twice and spends
host CPU per frame (a 1280×720 composite costs milliseconds of CPU); here the frames never
leave the device, and the host spends a few kernel launches per batch. On CPU the same
code runs, which is how its tests check it.

How it compares with OpenCV's ``cv2.resize(..., INTER_CUBIC)``: the conventions are the
same (Keys' cubic with a = -0.75, half-pixel centres ``src = (dst + 0.5) * in / out - 0.5``,
source indices clamped at the borders, no antialiasing when shrinking), which is also what
``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)`` does. OpenCV,
though, computes in fixed point (coefficients rounded to 1/2048, integer intermediates) and
rounds half up, while this code computes in float32 and rounds half to even; so a value
can differ by one grey level (never by more in ``tests/test_devicepaste.py``, which
measures it: 0.04 to 0.08 % of the values of a noisy image differ, at most 0.01 % of a
smooth one's, none at a side of 328 or 656).

The resize is separable and gathers four source rows, then four source columns, per output
pixel, with weights computed per item from its side: one set of launches for the whole
batch whatever the items' sizes (they differ frame to frame), instead of one
``interpolate`` per item. Items are padded to the largest side of the batch; the padding is
never read back.

Feathering: ``composite`` takes an optional alpha per item, and ``feather`` blends one
crop-mode face (alpha: float ``[side, side]`` in [0, 1]); the face is blended as ``alpha *
face + (1 - alpha) * frame`` over the frame's own pixels at the rectangle, then rounded.
An alpha of 1 gives the unblended face exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workers.transfer import to_device


__all__ = [
    "CUBIC_A",
    "blend",
    "composite",
    "cubic_taps",
    "feather",
    "paste_faces",
    "resize_square",
    "to_uint8",
]

CUBIC_A = -0.75
"""Keys' cubic convolution parameter, OpenCV's and torch's."""

_INNER = slice(4, 324)  # where the 320×320 prediction goes in the 328×328 crop


def _cubic_near(x: torch.Tensor) -> torch.Tensor:
    """The kernel for |x| <= 1."""
    a = CUBIC_A
    return ((a + 2) * x - (a + 3)) * x * x + 1


def _cubic_far(x: torch.Tensor) -> torch.Tensor:
    """The kernel for 1 < |x| < 2."""
    a = CUBIC_A
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


def cubic_taps(
    sides: torch.Tensor, in_size: int, out_max: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices and weights of a bicubic resize from ``in_size`` to each of ``sides``.

    Returns ``(index, weight)``, both ``[B, out_max, 4]``: output pixel ``d`` of item ``b``
    is ``sum_k weight[b, d, k] * source[index[b, d, k]]``. Positions at or past an item's
    side are computed like the others (and ignored by the callers).
    """
    dev = sides.device
    # As OpenCV: the source position in double precision, then rounded to float.
    scale = in_size / sides.to(torch.float64)  # [B]
    dst = torch.arange(out_max, device=dev, dtype=torch.float64)
    src = ((dst[None, :] + 0.5) * scale[:, None] - 0.5).to(torch.float32)  # [B, M]
    base = torch.floor(src)
    t = src - base
    weight = torch.stack(
        [_cubic_far(t + 1), _cubic_near(t), _cubic_near(1 - t), _cubic_far(2 - t)], dim=-1
    )
    offsets = torch.arange(-1, 3, device=dev)
    index = (base.to(torch.long)[..., None] + offsets).clamp_(0, in_size - 1)
    return index, weight


def _resample_rows(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, S, W, C]`` float → ``[B, M, W, C]``: each output row a weighted sum of
    four source rows."""
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    out = x[rows, index[..., 0]] * weight[..., 0, None, None]
    for k in range(1, 4):
        out += x[rows, index[..., k]] * weight[..., k, None, None]
    return out


def resize_square(images: torch.Tensor, sides: Sequence[int]) -> torch.Tensor:
    """Bicubic resize of square images ``[B, S, S, C]`` (float) to ``sides[b]`` each.

    Returns ``[B, M, M, C]`` float, ``M = max(sides)``; item ``b``'s image is
    ``[:sides[b], :sides[b]]`` (the rest is padding). Not rounded or clamped. ``sides``
    are host integers: the output size must be known without asking the device.
    """
    b, s, s2, _ = images.shape
    if s != s2:
        raise ValueError(f"images must be square, not {s}x{s2}")
    if len(sides) != b or any(int(v) < 1 for v in sides):
        raise ValueError(f"sides must be {b} positive sizes, not {list(sides)}")
    out_max = max((int(v) for v in sides), default=0)
    side_t = to_device([int(v) for v in sides], images.device, torch.float64)
    index, weight = cubic_taps(side_t, s, out_max)
    # Columns first, then rows, as OpenCV does (horizontal pass, then vertical).
    cols = _resample_rows(images.transpose(1, 2), index, weight)  # [B, M(x), S(y), C]
    return _resample_rows(cols.transpose(1, 2), index, weight)  # [B, M(y), M(x), C]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 255] and round to uint8."""
    return x.clamp(0, 255).round_().to(torch.uint8)


def paste_faces(pred: torch.Tensor, crops: torch.Tensor, sides: Sequence[int]) -> torch.Tensor:
    """Steps 4 of section 5 for a batch: ``pred`` ``[B, 320, 320, 3]`` uint8 into copies of
    ``crops`` ``[B, 328, 328, 3]`` uint8, resized to ``sides``. Returns uint8
    ``[B, M, M, 3]`` (item ``b`` at ``[:sides[b], :sides[b]]``)."""
    crop = crops.to(torch.float32)  # a copy: the caller's crops stay as they are
    crop[:, _INNER, _INNER] = pred.to(torch.float32)
    return to_uint8(resize_square(crop, sides))


def blend(face: torch.Tensor, region: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``round(alpha * face + (1 - alpha) * region)`` as uint8 (all ``[s, s, 3]`` but
    ``alpha``, ``[s, s]``)."""
    a = alpha.to(device=face.device, dtype=torch.float32)[..., None]
    mixed = a * face.to(torch.float32) + (1 - a) * region.to(torch.float32)
    return to_uint8(mixed)


def _check_alpha(alpha: torch.Tensor, side: int) -> None:
    if alpha.shape != (side, side):
        raise ValueError(f"alpha must be [{side}, {side}], not {list(alpha.shape)}")


def composite(
    frames: torch.Tensor,
    faces: Sequence[torch.Tensor],
    rects: Sequence[Sequence[int]],
    alphas: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Write ``faces[b]`` (at least ``[side, side, 3]``; its top-left ``side`` square is
    used) into ``frames[b]`` at ``rects[b] = (x1, y1, x2, y2)``, in place, and return
    ``frames`` (``[B, H, W, 3]`` uint8: pass a copy). Where ``alphas[b]`` is given the face
    is blended over the frame's pixels there."""
    for j, rect in enumerate(rects):
        x1, y1, x2, y2 = (int(v) for v in rect)
        side = x2 - x1
        face = faces[j][:side, :side]
        alpha = alphas[j] if alphas is not None else None
        if alpha is not None:
            _check_alpha(alpha, side)
            face = blend(face, frames[j, y1:y2, x1:x2], alpha)
        frames[j, y1:y2, x1:x2] = face
    return frames


def feather(face: torch.Tensor, region: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Crop mode's blend, in place: ``face`` (``[side, side, 3]``, a view) becomes
    ``blend(face, region, alpha)``; returns it."""
    _check_alpha(alpha, face.shape[0])
    face.copy_(blend(face, region, alpha))
    return face
