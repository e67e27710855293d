"""Logging set-up shared by every process: one line per event, the process name up front,
so that interleaved supervisord logs stay readable."""

from __future__ import annotations

import logging
import sys


__all__ = ["setup_logging"]


def setup_logging(process: str, level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s {process}[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
