"""One forward pass of the torch engine over a chunk of a batch: stage the frames on the
device, run the image half (cached per frame) and ``decode``, then paste back on the device
or leave a host copy of the prediction for the OpenCV paste in ``encode``.

The engine (``workers.engine``) checks the items, assembles the audio windows and hands
chunks of at most ``max_batch`` here; this module decides nothing about which items run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import torch

from workers import devicepaste
from workers.backend import InferItem
from workers.batchstate import BatchState, Slot
from workers.loaded import LoadedModel, pixels
from workers.package import ROI_SIZE
from workers.transfer import download, to_device
from workers.unet import UNet328


__all__ = ["ForwardPass"]


class ForwardPass:
    """``run`` fills ``state.slots`` for one chunk. ``paste``: ``host``, ``device`` or
    ``auto`` (device where the frames are resident); ``host_jpeg``: the JPEG is made on the
    host, so device pictures get a host copy started at once."""

    def __init__(
        self, device: torch.device, *, paste: str, resident: bool, host_jpeg: bool
    ) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.paste = paste
        self.resident = resident
        self.host_jpeg = host_jpeg

    def device_paste(self, m: LoadedModel, item: InferItem) -> bool:
        """Whether ``item`` is pasted back with tensor ops (the frames it needs are on the
        device and ``paste`` allows it) rather than with OpenCV in ``encode``."""
        if self.paste == "host" or (self.paste == "auto" and not self.resident):
            return False
        if "crops_328" not in m.resident:
            return False
        needs_frame = item.mode == "composite" or m.paste_alpha is not None
        return not needs_frame or "full_body" in m.resident

    def stage(self, m: LoadedModel, frame_ids: list[int]) -> torch.Tensor:
        """The batch's model input ``[b, 320, 320, 6]`` uint8 on the device: an
        index-select of the resident frames, or staged from the host (pinned on CUDA)."""
        dev = self.device
        if m.resident.has_inputs():
            index = to_device(frame_ids, dev)
            rois = m.resident.frames["rois_320"].index_select(0, index)
            masked = m.resident.frames["model_inputs"].index_select(0, index)
            return torch.cat([rois, masked], dim=3)
        b = len(frame_ids)
        staged = torch.empty((b, ROI_SIZE, ROI_SIZE, 6), dtype=torch.uint8, pin_memory=self.cuda)
        images: np.ndarray = staged.numpy()
        host_rois, host_masked = m.frames("rois_320"), m.frames("model_inputs")
        for j, i in enumerate(frame_ids):
            images[j, :, :, :3] = host_rois[i]
            images[j, :, :, 3:] = host_masked[i]
        return staged.to(dev, non_blocking=True)

    def run(
        self,
        m: LoadedModel,
        items: Sequence[InferItem],
        keys: list[int],
        audio: torch.Tensor,
        state: BatchState,
    ) -> None:
        """One forward pass over ``items[k]`` for ``k`` in ``keys`` (at most
        ``max_batch``), then its paste-back on the device or a host copy of the
        prediction; fills ``state.slots[k]``."""
        frame_ids = [items[k].frame_id for k in keys]
        # NHWC staging permuted to NCHW is channels_last-strided: the model's layout.
        x = self.stage(m, frame_ids).permute(0, 3, 1, 2)
        state.clock.mark("stage")
        net = cast(UNet328, m.net)
        skips = m.skips.skips(
            net.encode_image, frame_ids, lambda rows: _rows(x, rows).float() / 255
        )
        if m.runner is not None:
            pred = m.runner.run([*skips, audio], len(keys))  # the runner's buffer
        else:
            pred = pixels(net.decode(skips, audio))
        state.clock.mark("model")
        device_rows = [j for j, k in enumerate(keys) if self.device_paste(m, items[k])]
        host_rows = [j for j in range(len(keys)) if j not in set(device_rows)]
        if host_rows:
            # The runner's buffer is overwritten by the next batch: a copy for encode.
            if self.cuda:
                copy = download(pred)
            else:
                copy = pred.clone() if m.runner is not None else pred
            t = state.add(copy)
            for j in host_rows:
                state.slots[keys[j]] = Slot(t, j, host_paste=True)
        if device_rows:
            rows = pred
            if len(device_rows) < len(keys):
                rows = pred[to_device(device_rows, pred.device)]
            self.paste_on_device(m, items, [keys[j] for j in device_rows], rows, state)
            state.clock.mark("paste")

    def paste_on_device(
        self,
        m: LoadedModel,
        items: Sequence[InferItem],
        keys: list[int],
        pred: torch.Tensor,
        state: BatchState,
    ) -> None:
        """Paste-back of ``items[k]`` (``pred`` row j for ``keys[j]``) with tensor ops;
        a host copy of the pictures is started when the JPEG is made on the host."""
        dev = self.device
        frame_ids = [items[k].frame_id for k in keys]
        rects = [[int(v) for v in m.package.rects[i]] for i in frame_ids]
        sides = [r[2] - r[0] for r in rects]
        index = to_device(frame_ids, dev)
        crops = m.resident.frames["crops_328"].index_select(0, index)
        faces = devicepaste.paste_faces(pred, crops, sides)
        alphas = [m.paste_alpha(s) for s in sides] if m.paste_alpha is not None else None
        crop_rows = [j for j, k in enumerate(keys) if items[k].mode == "crop"]
        frame_rows = [j for j, k in enumerate(keys) if items[k].mode == "composite"]
        if crop_rows and alphas is not None:
            full = m.resident.frames["full_body"]
            for j in crop_rows:
                x1, y1, x2, y2 = rects[j]
                face = faces[j, : sides[j], : sides[j]]
                devicepaste.feather(face, full[frame_ids[j], y1:y2, x1:x2], alphas[j])
        copy = self.host_jpeg and self.cuda
        if crop_rows:
            t = state.add(faces, download(faces) if copy else None)
            for j in crop_rows:
                state.slots[keys[j]] = Slot(t, j, side=sides[j])
        if frame_rows:
            which = to_device([frame_ids[j] for j in frame_rows], dev)
            frames = m.resident.frames["full_body"].index_select(0, which)
            devicepaste.composite(
                frames,
                [faces[j] for j in frame_rows],
                [rects[j] for j in frame_rows],
                [alphas[j] for j in frame_rows] if alphas is not None else None,
            )
            t = state.add(frames, download(frames) if copy else None)
            for n, j in enumerate(frame_rows):
                state.slots[keys[j]] = Slot(t, n)


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``x[rows]``, as a view when the rows are the whole batch (the usual miss). The index
    goes up through ``to_device``: indexing a CUDA tensor with a Python list uploads it
    with a copy that waits for the stream."""
    if rows == list(range(x.shape[0])):
        return x
    return x.index_select(0, to_device(rows, x.device))
