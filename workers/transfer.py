"""Host ⇄ device copies that never make the host wait for the device, and the event a
batch's consumer waits on.

Why it matters: a plain ``tensor.to("cuda")`` or ``torch.tensor(values, device="cuda")``
synchronises the current stream after its copy, so the host waits until the GPU has
finished everything queued before it: with batch k+1 staged while batch k computes, one
such call per batch serialises the two. Every upload here goes through pinned memory
with ``non_blocking=True`` (PyTorch's pinned-memory cache keeps the block alive until the
copy that read it has run), and a batch's consumer waits only on that batch's event.

On CPU every function degrades to the plain operation, and ``Ready`` is always set.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch


__all__ = ["Ready", "StageClock", "download", "to_device"]


def to_device(
    values: np.ndarray | torch.Tensor | Sequence[int] | Sequence[float],
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``values`` on ``device`` without waiting for the device (a fresh tensor)."""
    t = values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))
    if dtype is not None:
        t = t.to(dtype)
    if device.type != "cuda":
        return t.to(device)
    if t.device.type == "cuda":
        return t.to(device, non_blocking=True)
    return t.pin_memory().to(device, non_blocking=True)


def download(t: torch.Tensor) -> torch.Tensor:
    """A host copy of ``t``, started without waiting: read it only after the batch's
    ``Ready`` is set. On CPU, ``t`` itself (no copy)."""
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


class Ready:
    """The point in the device's work at which a batch is complete.

    ``mark()`` records it on the current stream (after the batch's work was enqueued);
    ``wait()`` blocks the calling host thread until the device got there, and no longer:
    work enqueued later (the next batch) does not delay it.
    """

    def __init__(self, device: torch.device) -> None:
        self._event = torch.cuda.Event() if device.type == "cuda" else None

    def mark(self) -> Ready:
        if self._event is not None:
            self._event.record()
        return self

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()


class StageClock:
    """Durations of a batch's stages on the device, read once the batch is complete.

    On CUDA the stages are marked with timing events on the current stream, so the
    durations are the device's own (the host only enqueued the work); on CPU, where each
    operation finishes before the next starts, with the host clock.
    """

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._marks: list[tuple[str, object]] = []

    def mark(self, name: str) -> None:
        """The end of stage ``name`` (the first mark is the start)."""
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append((name, event))
        else:
            self._marks.append((name, time.perf_counter()))

    def durations(self) -> dict[str, float]:
        """Milliseconds per stage, summed when a stage was marked more than once. Call it
        after the batch's ``Ready.wait()``."""
        out: dict[str, float] = {}
        for (_, start), (name, end) in zip(self._marks, self._marks[1:], strict=False):
            if self._cuda:
                ms = float(start.elapsed_time(end))  # type: ignore[attr-defined]
            else:
                ms = (float(end) - float(start)) * 1000  # type: ignore[arg-type]
            if name != "start":
                out[name] = out.get(name, 0.0) + ms
        return out
