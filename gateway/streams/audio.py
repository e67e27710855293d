"""One epoch of a stream's audio, sans-I/O: int16 LE mono at the stream's rate, from the
epoch's first sample on, with what no frame still needs trimmed away.

Sample indices are the epoch's (0 = its first sample). The buffer keeps when each chunk
arrived, so that a frame can be timed from the arrival of the last sample it needs
(``lipsync_gateway_stream_latency_seconds``), and where ``stream_stop``'s silence begins,
so that padding is never timed as audio the client sent.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np


__all__ = ["AudioBuffer"]


class AudioBuffer:
    __slots__ = ("_arrivals", "_pcm", "base", "padded_from", "received")

    def __init__(self) -> None:
        self._pcm = bytearray()  # samples from ``base`` on
        self.base = 0  # epoch index of the first sample held
        self.received = 0  # samples the client sent this epoch (padding excluded)
        self.padded_from: int | None = None  # where stop's silence begins
        # (samples received up to and including a chunk, when it arrived), oldest first
        self._arrivals: deque[tuple[int, float]] = deque()

    @property
    def held(self) -> int:
        """Samples held (from ``base``)."""
        return len(self._pcm) // 2

    @property
    def end(self) -> int:
        """Epoch index one past the last sample held."""
        return self.base + len(self._pcm) // 2

    def feed(self, pcm: bytes, now: float) -> None:
        """Append one chunk (whole samples) that arrived at ``now``."""
        self._pcm += pcm
        self.received += len(pcm) // 2
        self._arrivals.append((self.received, now))

    def pad(self, end: int) -> None:
        """The client's audio has ended: from here on it is silence, held up to ``end``."""
        self.padded_from = self.received
        missing = end - self.end
        if missing > 0:
            self._pcm += bytes(2 * missing)

    def reset(self) -> None:
        """A new epoch (after an interrupt): nothing held, nothing received."""
        self._pcm = bytearray()
        self.base = 0
        self.received = 0
        self.padded_from = None
        self._arrivals.clear()

    def slice(self, start: int, end: int) -> bytes:
        """Samples ``[start, end)``; zeros before the epoch's first sample."""
        lead = max(0, -start)
        lo = max(start, 0) - self.base
        hi = end - self.base
        if lo < 0:
            raise RuntimeError("stream audio trimmed too early")  # a bug, not input
        body = bytes(memoryview(self._pcm)[2 * lo : 2 * hi])
        return bytes(2 * lead) + body if lead else body

    def quieter_than(self, start: int, end: int, dbfs: float) -> bool:
        """Whether samples ``[start, end)`` have an RMS below ``dbfs`` (nothing is silence)."""
        pcm = self.slice(start, end) if end > start else b""
        if not pcm:
            return True
        x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
        rms = math.sqrt(float(np.mean(x * x))) / 32768.0
        return rms <= 0 or 20 * math.log10(rms) < dbfs

    def arrival(self, end: int) -> float | None:
        """When the chunk holding sample ``end - 1`` arrived; None when that sample is
        stop's padding (not audio the client sent). Ask in increasing ``end``: older
        arrivals are forgotten."""
        padded = self.padded_from
        if padded is not None and end > padded:
            return None
        arrivals = self._arrivals
        while len(arrivals) > 1 and arrivals[0][0] < end:
            arrivals.popleft()
        if arrivals and arrivals[0][0] >= end:
            return arrivals[0][1]
        return None

    def trim(self, keep_from: int) -> None:
        """Forget the samples before ``keep_from`` (no frame still to issue needs them)."""
        cut = keep_from - self.base
        if cut > 0:
            cut = min(cut, len(self._pcm) // 2)
            del self._pcm[: 2 * cut]
            self.base += cut
