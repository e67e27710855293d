"""Where the serving processes spend their CPU: py-spy stacks, summed per function.

py-spy (``pip install py-spy``) samples a running process from outside, without restarting
it. It pauses the target for each sample: ``--nonblocking`` was tried and attributed most
samples to whatever C call was running (``Socket.send``), which pausing does not. At 100
samples/s the pauses cost the target a few percent. Only non-idle samples are kept, but a
thread that is runnable and waiting for a core counts as busy, so on a loaded 2-core
machine shares are of wall time spent not blocked, not of CPU.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any


__all__ = ["available", "record", "summarize"]

_LINE = re.compile(r"^(.*) (\d+)$")
_WAITS = re.compile(
    r"^(Poller\.poll|Condition\.wait|Event\.wait|select|poll|epoll_wait|sleep|_wait_for_tstate_lock)"
)
"""Leaves that are a thread blocking, not computing; py-spy's idle detection misses some."""
_OURS = re.compile(r"\((gateway|broker|workers|shared)/")
_FRAME = re.compile(r"^(?P<func>[^ ]+) \((?P<file>[^:]+)(?::\d+)?\)$")


def available() -> bool:
    return shutil.which("py-spy") is not None


def record(pid: int, seconds: float, out: Path, *, rate: int = 100) -> subprocess.Popen[bytes]:
    """Start sampling ``pid`` for ``seconds`` into ``out`` (collapsed stacks); the caller
    waits for the returned process."""
    cmd = [
        "py-spy", "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
        "--rate", str(rate), "--format", "raw", "--output", str(out), "--threads",
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m["file"]
    for root in ("site-packages/", "/work/main/", "lib/python3."):
        if root in path:
            path = path.split(root, 1)[1]
            break
    return f"{m['func']} ({path})"


def summarize(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive shares per function of the busy samples (leaf not a known wait),
    and samples per thread, from a raw file."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = busy = waiting = 0
    for line in path.read_text(errors="replace").splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        stack, n = m[1].split(";"), int(m[2])
        total += n
        frames = [_name(f) for f in stack]
        thread = ""
        if frames and frames[0].startswith("thread"):
            thread, frames = frames[0], frames[1:]
        if not frames:
            continue
        if _WAITS.match(frames[-1]):
            waiting += n
            continue
        busy += n
        threads[thread or "?"] += n
        self_time[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n

    def share(c: Counter[str]) -> list[list[Any]]:
        return [[f, round(100 * n / busy, 1)] for f, n in c.most_common(top)] if busy else []

    # Inclusive time is telling only for our own functions below the entry points.
    ours = Counter({f: n for f, n in inclusive.items() if _OURS.search(f) and n < 0.97 * busy})

    return {
        "samples": total,
        "busy_samples": busy,
        "waiting_samples": waiting,
        "self": share(self_time),
        "inclusive": share(ours),
        "threads": share(threads),
    }
