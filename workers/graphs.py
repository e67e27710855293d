"""A function of batch-first tensors run at fixed batch sizes ("buckets"), from static
buffers, replayed from CUDA graphs where it can be.

Why: at the batch sizes a worker runs (1 to 32 frames), UNet-328's decoder is a few hundred
small kernels, and launching them from Python costs more host time than the GPU spends on
some of them. A CUDA graph launches the whole captured sequence at once. A graph is
captured for fixed shapes, so a batch of ``n`` runs in the smallest bucket ``>= n``, padded:
the rows past ``n`` hold whatever an earlier batch left there, which is harmless, since
every row of this network is computed independently of the others (eval mode: no batch
statistics), and they are never returned.

Contract of ``StaticRunner.run``: the result is a view of a static output buffer, valid until
the next ``run`` of any bucket on the same runner or pool (the memory of graphs captured in
one pool is shared). Consume or copy it first; the engine enqueues its paste-back (or its
download) right after the replay, on the same stream, which orders it before the next
replay.

Without CUDA (or when capture fails, which is logged once per process) the same runner runs
the function eagerly on the same static buffers, so that the buffer and padding logic is
the same on every device: ``tests/test_graphs.py`` checks on CPU that padded batches give
the frames unpadded ones do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch


__all__ = ["BUCKETS", "StaticRunner", "bucket_for", "buckets_up_to"]

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
"""Batch sizes with a graph of their own, up to ``max_batch`` (which is always one)."""

_WARMUP = 2  # eager runs on a side stream before a capture (cuDNN picks its algorithms there)
_fallback_logged = False


def buckets_up_to(max_batch: int) -> tuple[int, ...]:
    """The buckets for a worker whose batches have at most ``max_batch`` items."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, not {max_batch}")
    return tuple(sorted({b for b in BUCKETS if b < max_batch} | {max_batch}))


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``n`` items."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"a batch of {n} is larger than the largest bucket ({max(buckets)})")


def _log_fallback(reason: str) -> None:
    global _fallback_logged
    if not _fallback_logged:
        _fallback_logged = True
        log.warning("CUDA graphs off, running eagerly: %s", reason)


class StaticRunner:
    """``fn(*inputs)`` at bucket sizes, from static input buffers shaped like ``examples``.

    ``examples`` are batch-first tensors of the largest bucket's batch size, on the device
    and in the dtype and memory format ``fn`` wants; the runner keeps them as its static
    inputs (one set shared by every bucket: a bucket reads the first rows). ``fn`` returns
    one batch-first tensor. ``graphs=True`` captures one CUDA graph per bucket, largest
    first, in ``pool`` (a ``torch.cuda.graph_pool_handle()``; None: a new one per runner).
    """

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        examples: Sequence[torch.Tensor],
        buckets: Sequence[int],
        *,
        graphs: bool,
        pool: object | None = None,
    ) -> None:
        self.fn = fn
        self.buckets = tuple(sorted(buckets))
        self.inputs = tuple(examples)
        if not self.inputs or any(t.shape[0] != self.buckets[-1] for t in self.inputs):
            raise ValueError(f"static inputs must have {self.buckets[-1]} rows")
        self.device = self.inputs[0].device
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._eager_out: torch.Tensor | None = None
        self.graphed = False
        if graphs:
            if self.device.type != "cuda":
                _log_fallback(f"they need a CUDA device, not {self.device}")
            else:
                try:
                    self._capture(pool)
                    self.graphed = True
                except Exception as exc:  # capture of an op that does not support it, ...
                    self._graphs.clear()
                    self._outputs.clear()
                    _log_fallback(f"capture failed ({type(exc).__name__}: {exc})"[:300])

    def _capture(self, pool: Any) -> None:  # a CUDA graph pool handle, or None
        if pool is None:
            pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for b in reversed(self.buckets):
                for _ in range(_WARMUP):
                    self.fn(*(t[:b] for t in self.inputs))
        torch.cuda.current_stream(self.device).wait_stream(side)
        for b in reversed(self.buckets):  # largest first: the smaller reuse its memory
            graph = torch.cuda.CUDAGraph()
            # thread_local: the encode thread may copy or wait on the device meanwhile (a
            # package loaded while batches are in flight); that must not void the capture.
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                out = self.fn(*(t[:b] for t in self.inputs))
            self._graphs[b] = graph
            self._outputs[b] = out
        torch.cuda.synchronize(self.device)

    def run(self, inputs: Sequence[torch.Tensor], n: int | None = None) -> torch.Tensor:
        """``fn`` of ``inputs`` (each ``[n, ...]``), copied into the static buffers and
        run at the bucket of ``n``. Returns ``[n, ...]``: see the module docstring for how
        long it stays valid."""
        n = int(inputs[0].shape[0]) if n is None else n
        b = bucket_for(n, self.buckets)
        for static, value in zip(self.inputs, inputs, strict=True):
            static[:n].copy_(value)
        graph = self._graphs.get(b)
        if graph is not None:
            graph.replay()
            return self._outputs[b][:n]
        out = self.fn(*(t[:b] for t in self.inputs))
        # Eager, the result is a fresh tensor; kept in a static buffer anyway, so that
        # the lifetime rule is the same with and without graphs.
        if self._eager_out is None or self._eager_out.shape[1:] != out.shape[1:]:
            self._eager_out = torch.empty(
                (self.buckets[-1], *out.shape[1:]), dtype=out.dtype, device=out.device
            )
        self._eager_out[:b].copy_(out)
        return self._eager_out[:n]

    def release(self) -> None:
        """Drop the graphs and buffers (their memory goes back to the allocator's cache)."""
        self._graphs.clear()
        self._outputs.clear()
        self._eager_out = None
        self.inputs = ()
