"""Logging set-up shared by every process: one line per event, the process name up front,
so that interleaved supervisord logs stay readable."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable


__all__ = ["RateLimitedLog", "setup_logging"]


def setup_logging(process: str, level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s {process}[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


class RateLimitedLog:
    """A warning that may fire thousands of times a second (a peer sending garbage, a
    request failing the same way for every frame) logged at most once per ``every_s``;
    the lines held back meanwhile are counted and said with the next one, so an operator
    sees both that it goes on and how much."""

    def __init__(
        self,
        logger: logging.Logger,
        every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.every_s = every_s
        self.clock = clock
        self.suppressed = 0
        self._logged_at: float | None = None

    def warning(
        self,
        fmt: str,
        *args: object,
        exc_info: BaseException | None = None,
        now: float | None = None,
    ) -> bool:
        """Log ``fmt % args`` now, or count it; True when it was logged. ``now``: the
        caller's time, for sans-I/O code that has no clock of its own."""
        now = self.clock() if now is None else now
        if self._logged_at is not None and now - self._logged_at < self.every_s:
            self.suppressed += 1
            return False
        self._logged_at = now
        if self.suppressed:
            fmt += f" (+{self.suppressed} more not logged)"
            self.suppressed = 0
        self.logger.warning(fmt, *args, exc_info=exc_info)
        return True
