"""An avatar's frames held on the model's device, within a per-model budget.

Why: staging a batch on the host copies each frame's ROI and masked ROI into pinned memory
and uploads 1.2 MB per frame; paste-back on the host needs the prediction back and the
crop and full frames in host memory. With the frames on the device as uint8, a batch is an
index-select there, and only the audio windows (32 KB a frame, or nothing when they come
from the package's own table, which is on the device too) cross the bus.

What goes up, in this order, while it fits in ``--gpu-frames-mb``: the model inputs (ROI
and masked ROI, always together: the forward needs both), the 328 crops (paste-back), the
full frames (composite mode, and feathered paste-back). What does not fit stays on the
host and that step falls back to host staging, with a log line that says which. A 523-frame
1280×720 avatar needs 1.9 GB for all four (3.7 MB a frame, three quarters of it the full
frame); its model inputs alone, 320 MB.

``plan_residency`` is the decision, with no I/O; ``DeviceFrames.upload`` does it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch


__all__ = ["TIERS", "DeviceFrames", "plan_residency"]

log = logging.getLogger(__name__)

TIERS: tuple[tuple[str, ...], ...] = (
    ("rois_320", "model_inputs"),
    ("crops_328",),
    ("full_body",),
)
"""Videos in upload order; a tier goes up whole or not at all, and a tier that does not
fit stops the upload (the later ones are of no use without it)."""

_CHUNK_BYTES = 64 << 20  # uploads go in chunks: never a second host copy of a whole video


def plan_residency(sizes: Mapping[str, int], budget_bytes: int) -> list[str]:
    """The videos to hold on the device, given each video's size in bytes."""
    chosen: list[str] = []
    used = 0
    for tier in TIERS:
        need = sum(sizes[kind] for kind in tier)
        if used + need > budget_bytes:
            break
        chosen.extend(tier)
        used += need
    return chosen


@dataclass(eq=False)
class DeviceFrames:
    """The resident videos of one model: ``frames[kind]`` is ``[N, H, W, 3]`` uint8 on the
    device, for the kinds ``plan_residency`` chose."""

    device: torch.device
    frames: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def upload(
        cls, videos: Mapping[str, np.ndarray], device: torch.device, budget_bytes: int
    ) -> DeviceFrames:
        sizes = {kind: int(a.nbytes) for kind, a in videos.items()}
        out = cls(device)
        for kind in plan_residency(sizes, budget_bytes):
            out.frames[kind] = _upload(videos[kind], device)
        return out

    def __contains__(self, kind: object) -> bool:
        return kind in self.frames

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for t in self.frames.values())

    def has_inputs(self) -> bool:
        return all(kind in self.frames for kind in TIERS[0])

    def release(self) -> None:
        self.frames.clear()

    def describe(self, videos: Mapping[str, np.ndarray], budget_bytes: int) -> str:
        """One log line's worth: what is on the device, what stays on the host and why."""
        held = ", ".join(self.frames) or "none"
        line = f"frames on {self.device}: {held} ({_mib(self.nbytes)} of {_mib(budget_bytes)})"
        left = [kind for tier in TIERS for kind in tier if kind not in self.frames]
        if left:
            need = sum(int(videos[k].nbytes) for k in left)
            line += f"; staged from the host: {', '.join(left)} ({_mib(need)} more needed)"
        return line


def _upload(frames: np.ndarray, device: torch.device) -> torch.Tensor:
    n = frames.shape[0]
    out = torch.empty(frames.shape, dtype=torch.uint8, device=device)
    step = max(1, _CHUNK_BYTES // max(1, frames[0].nbytes))
    for start in range(0, n, step):
        # A writable copy of a chunk of the (read-only, mapped) frames: torch wants one.
        chunk = torch.from_numpy(np.array(frames[start : start + step]))
        out[start : start + step].copy_(chunk)
    return out


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"
