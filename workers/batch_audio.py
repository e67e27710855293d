"""The audio input of one batch, ``[n, 32, 16, 16]``, put together on the model's device.

A batch mixes three kinds of items (DESIGN.md sections 5 and 7): frames of the package's
own audio (rows ``i-8 .. i+7`` of ``aud_ave.npy``), layout B requests (640 ms of PCM: its
16 encoder windows), and stream frames (about one new encoder window each: the others come
from the stream's row cache, ``workers.stream_audio``). The host computes the mel windows
(numpy); every window of the batch, of both kinds, then goes through the AVE encoder in
one call, and the batch's rows are gathered in one index-select from the package's
feature table (held on the device with a zero row for rows outside it), the fresh
encodings and the stream rows. Nothing returns to the host, so on a GPU the batch is
enqueued without waiting for the previous one.

One bad clip fails only its item (its error lands in ``errors``), as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from shared.errors import ErrorCode, ServiceError
from workers.audio import CONTEXT_BEFORE, WINDOW_ROWS, AudioFeaturizer, layout_b_mels
from workers.audio_encoder import FEATURE_DIM
from workers.backend import InferItem
from workers.stream_audio import stream_audio_for, stream_clips
from workers.transfer import to_device


__all__ = ["batch_windows", "feature_table", "table_rows"]

_FOLD = (32, 16, 16)


def feature_table(features: np.ndarray, device: torch.device) -> torch.Tensor:
    """A package's feature table ``[M, 512]`` on ``device`` as float32 ``[M + 1, 512]``:
    the last row is the zero row that stands for rows outside the table."""
    table = np.zeros((features.shape[0] + 1, FEATURE_DIM), np.float32)
    table[:-1] = features
    return torch.from_numpy(table).to(device)


def table_rows(frame_id: int, count: int) -> list[int]:
    """Rows of ``feature_table`` for frame ``frame_id``'s window (``count`` = M)."""
    rows = range(frame_id - CONTEXT_BEFORE, frame_id - CONTEXT_BEFORE + WINDOW_ROWS)
    return [k if 0 <= k < count else count for k in rows]


def batch_windows(
    featurizer: AudioFeaturizer | None,
    fps: float,
    table: torch.Tensor,
    items: Sequence[InferItem],
    keys: Sequence[int],
    errors: list[BaseException | None],
) -> tuple[torch.Tensor, list[int]]:
    """The windows of ``items[k]`` for ``k`` in ``keys``, on ``table``'s device.

    Returns ``(windows [len(ok), 32, 16, 16], ok)``: ``ok`` is ``keys`` without the items
    whose audio failed (their ``errors[k]`` is set), in order.
    """
    dev = table.device
    count = table.shape[0] - 1
    streamed = [k for k in keys if items[k].audio_t0_ms is not None]
    live = [k for k in keys if items[k].audio is not None and items[k].audio_t0_ms is None]
    mels: list[np.ndarray] = []
    b_first: dict[int, int] = {}  # item -> its first window in ``mels``
    if featurizer is not None:
        for k in live:
            try:
                windows = layout_b_mels(items[k].audio, items[k].audio_sr, fps)  # type: ignore[arg-type]
            except Exception as exc:
                errors[k] = ServiceError(ErrorCode.BAD_REQUEST, f"bad audio: {exc}")
                continue
            b_first[k] = len(mels)
            mels.extend(windows)
    stream_pos: dict[int, int] = {}  # item -> its clip's index in the stream plan
    plan = None
    stream_audio = None
    if streamed and featurizer is not None:
        stream_audio = stream_audio_for(featurizer, fps)
        plan = stream_audio.plan(stream_clips([items[k] for k in streamed]))
        for c, k in enumerate(streamed):
            if c in plan.errors:
                errors[k] = plan.errors[c]
            else:
                stream_pos[k] = c
    n_b = len(mels)
    if plan is not None:
        mels.extend(plan.mels)
    ok = [k for k in keys if errors[k] is None]
    with torch.inference_mode():
        if mels and featurizer is not None:
            feats = featurizer.encode_tensor(np.stack(mels))
        else:
            feats = torch.zeros((0, FEATURE_DIM), device=dev)
        parts = [table, feats]
        stream_base = table.shape[0] + feats.shape[0]
        if plan is not None and stream_audio is not None:
            parts.append(stream_audio.assemble(plan, feats[n_b:]).reshape(-1, FEATURE_DIM))
        index: list[int] = []
        for k in ok:
            if k in b_first:
                first = table.shape[0] + b_first[k]
                index.extend(range(first, first + WINDOW_ROWS))
            elif k in stream_pos:
                first = stream_base + stream_pos[k] * WINDOW_ROWS
                index.extend(range(first, first + WINDOW_ROWS))
            else:
                index.extend(table_rows(items[k].frame_id, count))
        source = torch.cat(parts) if any(p.shape[0] for p in parts[1:]) else table
        rows = source[to_device(index, dev)] if index else source[:0]
        return rows.reshape(len(ok), *_FOLD), ok
