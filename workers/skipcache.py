"""Per-frame image features of one model: the UNet's image half, computed once per frame.

Why: UNet-328's image half (``inc``, ``down1..5``: the five skips and the bottleneck) sees
only the package's own pictures of frame ``i`` (``rois_320[i]`` and ``model_inputs[i]``),
never the audio. Every request for frame ``i`` therefore recomputes the same tensors, and
avatars are short loops (a few hundred frames) that streams walk again and again. Keeping
them per frame leaves only the audio branch and the decoder to run: about a quarter of a
quarter-width forward on 2 CPU cores (BENCHMARKS.md, "Image-half cache"), and the same
share of GPU time.

What it costs: memory. One frame's tensors hold ``8·320²·c0/8 + ...`` values: about 4.9 MB
at quarter width in float32 (x1, the 320×320 skip, is two thirds of it), 19.7 MB at full
width (9.8 MB in fp16 on CUDA). So the cache is an LRU bounded in bytes
(``--skip-cache-mb``, per model); a frame that does not fit is computed and not kept.
Entries live on the model's device in its dtype: a hit is the tensors ``encode_image``
returned for that frame when it was first seen, in whatever batch that was (a batched
convolution may round differently from a single one, so decoded outputs can differ from
the one-pass forward by float rounding: ``tests/test_skipcache.py`` holds them to 1e-5, and
rendered pixels to one grey level).

Not thread-safe: call it from the thread that runs the model (the engine's forward).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch


__all__ = ["SkipCache"]

Skips = tuple[torch.Tensor, ...]


class SkipCache:
    """``frame id → encode_image`` output of one model, LRU within ``budget_bytes``."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = max(0, int(budget_bytes))
        self._entries: OrderedDict[int, Skips] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, frame_id: object) -> bool:
        return frame_id in self._entries

    def skips(
        self,
        encode: Callable[[torch.Tensor], Skips],
        frame_ids: Sequence[int],
        images: Callable[[list[int]], torch.Tensor],
    ) -> Skips:
        """The batch's skips for ``frame_ids`` (in order; a frame may repeat).

        ``encode`` is the model's ``encode_image``; ``images(positions)`` returns the model
        input ``[n, 6, 320, 320]`` of the batch items at ``positions``. Both are called at
        most once, for the frames not cached.
        """
        if self.budget_bytes == 0:  # disabled: the plain forward, no copies
            self.misses += len(frame_ids)
            return tuple(encode(images(list(range(len(frame_ids))))))
        first: dict[int, int] = {}  # frame id → its first position in the batch
        for pos, fid in enumerate(frame_ids):
            first.setdefault(fid, pos)
        missing = [fid for fid in first if fid not in self._entries]
        fresh: dict[int, Skips] = {}
        if missing:
            computed = encode(images([first[fid] for fid in missing]))
            for n, fid in enumerate(missing):
                fresh[fid] = tuple(t[n : n + 1] for t in computed)
        self.misses += len(missing)
        self.hits += len(frame_ids) - len(missing)
        per_item = []
        for fid in frame_ids:
            entry = self._entries.get(fid)
            if entry is not None:
                self._entries.move_to_end(fid)
            else:
                entry = fresh[fid]
            per_item.append(entry)
        for fid in missing:
            self._keep(fid, fresh[fid])
        if len(per_item) == 1:
            return per_item[0]
        return tuple(
            torch.cat([item[level] for item in per_item]).contiguous(
                memory_format=_layout(per_item[0][level])
            )
            for level in range(len(per_item[0]))
        )

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._entries),
            "bytes": self.bytes,
            "budget_bytes": self.budget_bytes,
            "hits": self.hits,
            "misses": self.misses,
        }

    # -- internals -----------------------------------------------------------------------

    def _keep(self, fid: int, skips: Skips) -> None:
        size = sum(t.numel() * t.element_size() for t in skips)
        if size > self.budget_bytes:
            return
        while self.bytes + size > self.budget_bytes and self._entries:
            _, old = self._entries.popitem(last=False)
            self.bytes -= sum(t.numel() * t.element_size() for t in old)
        # A copy, so the entry does not keep the whole batch's tensors alive.
        self._entries[fid] = tuple(t.clone(memory_format=_layout(t)) for t in skips)
        self.bytes += size


def _layout(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
