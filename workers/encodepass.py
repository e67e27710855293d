"""The torch engine's ``encode`` side: once a batch's device work is done, each item's
picture (pasted back with OpenCV where ``forward`` left it to the host) and its JPEG,
nvJPEG for pictures on the device where available, OpenCV otherwise.

Runs on the worker's encode thread, concurrently with the next batch's ``forward``; it
reads only the batch's own ``BatchState``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from shared.errors import ErrorCode, ServiceError
from workers.backend import ForwardBatch, InferResult
from workers.batchstate import (
    BatchState,
    Bounds,
    batch_stages,
    bounds_of,
    host_rows,
    ms,
    not_computed,
    paste_on_host,
)
from workers.jpeg import DeviceJpeg, encode_host


__all__ = ["EncodePass"]

log = logging.getLogger("workers.engine")

Picture = tuple[np.ndarray | BaseException, Bounds | None]


class EncodePass:
    """``quality(q)``: the JPEG quality for an item's ``q`` (None or 0: the default)."""

    def __init__(self, device_jpeg: DeviceJpeg | None, quality: Callable[[Any], int]) -> None:
        self.device_jpeg = device_jpeg
        self.quality = quality
        self._logged: set[str] = set()

    def encode(self, batch: ForwardBatch) -> list[InferResult | BaseException]:
        state: BatchState | None = batch.state
        results: list[InferResult | BaseException | None] = [None] * len(batch.items)
        on_device: list[int] = []
        pictures: dict[int, Picture] = {}
        if state is not None:
            state.ready.wait()
            state.stage_timings()
        for k in range(len(batch.items)):
            slot = state.slots[k] if state is not None else None
            use_device = (
                self.device_jpeg is not None
                and state is not None
                and slot is not None
                and not slot.host_paste
                and state.host[slot.tensor] is None
                and state.tensors[slot.tensor].device.type == "cuda"
            )
            if use_device:
                on_device.append(k)
            else:
                pictures[k] = self.picture(batch, k)
        for k, (image, bounds) in pictures.items():
            if isinstance(image, BaseException):
                results[k] = image
                continue
            assert state is not None and bounds is not None
            t0 = time.perf_counter()
            try:
                jpeg = encode_host(image, self.quality(batch.items[k].quality))
            except Exception as exc:
                results[k] = ServiceError(ErrorCode.INTERNAL, f"jpeg encoding failed: {exc}")
                continue
            timings = state.item_timings[k]
            timings["encode"] = ms(time.perf_counter() - t0)
            results[k] = InferResult(jpeg=jpeg, bounds=bounds, timings=timings)
        if on_device:
            assert state is not None
            self._encode_on_device(batch, state, on_device, results)
        if state is not None:
            state.stages = batch_stages(state, results)
        return [r if r is not None else not_computed() for r in results]

    def render(self, batch: ForwardBatch) -> list[Picture]:
        state: BatchState | None = batch.state
        if state is not None:
            state.ready.wait()
        return [self.picture(batch, k) for k in range(len(batch.items))]

    def picture(self, batch: ForwardBatch, k: int) -> Picture:
        """Item ``k``'s picture on the host (pasted with OpenCV where ``forward`` left it
        to the host), and its bounds; or its error."""
        state: BatchState | None = batch.state
        err = batch.errors[k] if k < len(batch.errors) else None
        slot = state.slots[k] if state is not None else None
        if err is not None or state is None or slot is None:
            return err or not_computed(), None
        item = batch.items[k]
        t0 = time.perf_counter()
        try:
            if slot.host_paste:
                pred = host_rows(state, slot.tensor)[slot.row]
                image, bounds = paste_on_host(state, item, pred)
            else:
                image = host_rows(state, slot.tensor)[slot.row]
                if slot.side:
                    image = np.ascontiguousarray(image[: slot.side, : slot.side])
                bounds = bounds_of(state.rects[item.frame_id])
        except Exception as exc:
            return ServiceError(ErrorCode.INTERNAL, f"compositing failed: {exc}"), None
        if slot.host_paste:
            state.item_timings[k]["composite"] = ms(time.perf_counter() - t0)
        return image, bounds

    def _encode_on_device(
        self,
        batch: ForwardBatch,
        state: BatchState,
        keys: list[int],
        results: list[InferResult | BaseException | None],
    ) -> None:
        """nvJPEG for the items whose pictures are on the device; OpenCV on a host copy
        for any the GPU encoder fails on (logged once)."""
        assert self.device_jpeg is not None
        views = []
        for k in keys:
            slot = state.slots[k]
            assert slot is not None
            view = state.tensors[slot.tensor][slot.row]
            views.append(view[: slot.side, : slot.side] if slot.side else view)
        qualities = [self.quality(batch.items[k].quality) for k in keys]
        t0 = time.perf_counter()
        try:
            jpegs = self.device_jpeg.encode(views, qualities)
        except Exception as exc:
            self._log_once("nvJPEG failed, encoding on the host: %s", exc)
            for k in keys:
                image, bounds = self.picture(batch, k)
                if isinstance(image, BaseException) or bounds is None:
                    results[k] = image if isinstance(image, BaseException) else not_computed()
                    continue
                results[k] = InferResult(
                    jpeg=encode_host(image, qualities[keys.index(k)]),
                    bounds=bounds,
                    timings=state.item_timings[k],
                )
            return
        share = ms((time.perf_counter() - t0) / len(keys))
        for k, jpeg in zip(keys, jpegs, strict=True):
            timings = state.item_timings[k]
            timings["encode"] = share
            bounds = bounds_of(state.rects[batch.items[k].frame_id])
            results[k] = InferResult(jpeg=jpeg, bounds=bounds, timings=timings)

    def _log_once(self, fmt: str, *args: Any) -> None:
        if fmt not in self._logged:
            self._logged.add(fmt)
            log.warning(fmt, *args)
