"""What the engine's ``forward`` leaves for its ``encode``: where each item's picture will
be once the batch's device work is done, and the host arrays the OpenCV paste-back reads.

It holds the arrays and tensors themselves, not the model, so an ``unload`` between the
compute and encode threads cannot pull the frames from under a batch in flight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from shared.errors import ErrorCode, ServiceError
from workers.backend import InferItem, InferResult
from workers.paste import paste_face
from workers.transfer import Ready, StageClock


__all__ = [
    "BatchState",
    "Bounds",
    "Slot",
    "batch_stages",
    "bounds_of",
    "host_rows",
    "ms",
    "not_computed",
    "paste_on_host",
]

Bounds = tuple[float, float, float, float]


@dataclass(eq=False, slots=True)
class Slot:
    """Where an item's picture is once its batch is ready: row ``row`` of
    ``BatchState.tensors[tensor]``; a crop-mode face is its top-left ``side`` square; with
    ``host_paste`` the row is the prediction, which ``encode`` pastes with OpenCV."""

    tensor: int
    row: int
    side: int = 0
    host_paste: bool = False


@dataclass(eq=False)
class BatchState:
    full_body: np.ndarray
    crops: np.ndarray
    rects: np.ndarray
    ready: Ready
    clock: StageClock
    slots: list[Slot | None]
    tensors: list[torch.Tensor] = field(default_factory=list)
    host: list[torch.Tensor | None] = field(default_factory=list)  # host copies in flight
    item_timings: list[dict[str, float]] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)  # the batch's ms per stage
    feather_px: int = 0  # the package's paste option (workers.paste)

    def add(self, t: torch.Tensor, host: torch.Tensor | None = None) -> int:
        self.tensors.append(t)
        self.host.append(host)
        return len(self.tensors) - 1

    def stage_timings(self) -> None:
        """Per item, the batch's stage durations (device time on CUDA): ``prepare``
        (audio windows and staging), ``inference`` (the model), ``composite`` (the device
        paste-back, when there was one; the host one is timed per item)."""
        d = self.clock.durations()
        prepare = d.get("audio", 0.0) + d.get("stage", 0.0)
        for k, timings in enumerate(self.item_timings):
            timings["prepare"] = round(prepare, 3)
            timings["inference"] = round(d.get("model", 0.0), 3)
            slot = self.slots[k]
            if slot is not None and not slot.host_paste:
                timings["composite"] = round(d.get("paste", 0.0), 3)


def batch_stages(
    state: BatchState, results: Sequence[InferResult | BaseException | None]
) -> dict[str, float]:
    """``stages``: the device stages once per batch (every item carries the batch's
    figure), host paste-back and JPEG summed over the items."""
    d = state.clock.durations()
    out = {
        "prepare": d.get("audio", 0.0) + d.get("stage", 0.0),
        "inference": d.get("model", 0.0),
        "composite": d.get("paste", 0.0),
        "encode": 0.0,
    }
    for k, result in enumerate(results):
        slot = state.slots[k]
        if not isinstance(result, InferResult):
            continue
        out["encode"] += result.timings.get("encode", 0.0)
        if slot is not None and slot.host_paste:
            out["composite"] += result.timings.get("composite", 0.0)
    return {k: round(v, 3) for k, v in out.items()}


def host_rows(state: BatchState, t: int) -> np.ndarray:
    """``state.tensors[t]`` as a host array: its host copy (complete once the batch is
    ready), the tensor itself on CPU, or a download now."""
    host = state.host[t]
    tensor = host if host is not None else state.tensors[t]
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    return tensor.numpy()


def bounds_of(rect: Sequence[int]) -> Bounds:
    x1, y1, x2, y2 = (int(v) for v in rect)
    return float(x1), float(y1), float(x2), float(y2)


def paste_on_host(
    state: BatchState, item: InferItem, pred: np.ndarray
) -> tuple[np.ndarray, Bounds]:
    """Section 5 step 4 with OpenCV, on the host: ``pred`` (uint8 ``[320, 320, 3]``) into
    a copy of the crop, resized to the rect, written into a copy of the frame."""
    i = item.frame_id
    x1, y1, x2, y2 = (int(v) for v in state.rects[i])
    region = state.full_body[i][y1:y2, x1:x2]
    face = paste_face(state.crops[i], pred, region, state.feather_px)
    bounds = (float(x1), float(y1), float(x2), float(y2))
    if item.mode == "crop":
        return face, bounds
    frame = state.full_body[i].copy()
    frame[y1:y2, x1:x2] = face
    return frame, bounds


def not_computed() -> ServiceError:
    return ServiceError(ErrorCode.INTERNAL, "item was not computed")


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
