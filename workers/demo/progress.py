"""A progress bar for long CPU jobs, on stderr: redrawn in place on a terminal, one line
every few seconds in a log file (so that ``lipsync up``'s first run shows it either way)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


__all__ = ["Progress"]


class Progress:
    """Counts ``total`` units of work across named stages and shows how far along it is."""

    def __init__(
        self,
        total: int,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        every_s: float = 5.0,
        label: str = "demo",
    ) -> None:
        self.total = max(1, total)
        self.label = label
        self.done = 0
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = every_s
        self.start = time.monotonic()
        self._last = 0.0
        self.stage = ""

    def set_stage(self, stage: str) -> None:
        self.stage = stage
        self._draw(force=True)

    def step(self, n: int = 1, note: str = "") -> None:
        self.done = min(self.total, self.done + n)
        self._draw(note=note)

    def close(self, note: str = "") -> None:
        self.done = self.total
        self._draw(note=note, force=True)
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, note: str = "", force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and not self.tty and now - self._last < self.every_s:
            return
        if not force and self.tty and now - self._last < 0.2:
            return
        self._last = now
        frac = self.done / self.total
        elapsed = now - self.start
        eta = elapsed / frac - elapsed if frac > 0.02 else float("nan")
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        eta_s = "?" if eta != eta else f"{int(eta) // 60}m{int(eta) % 60:02d}s"
        line = f"{self.label} [{bar}] {100 * frac:3.0f}% {self.stage} {note} (eta {eta_s})"
        if self.tty:
            self.stream.write("\r" + line[:110].ljust(110))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
