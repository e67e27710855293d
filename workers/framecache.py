"""Decoded video frames, shared between the workers of a host through one mapped file.

The original server decoded every video into each process's private memory (about 1.85 GB
per process for one 523-frame 720p avatar). Here a video is decoded once per host into a
raw array file next to it, and every worker maps that file read-only: N workers then share
one copy in the page cache, and a worker restart costs a ``mmap`` instead of a decode.

File layout (``<cache_dir>/<video stem>.framecache``)::

    [0:8)     magic b"LSFRAME1"
    [8:12)    header length L, uint32 little-endian
    [12:12+L) header, JSON: {"version", "source", "size", "mtime_ns", "shape": [N,H,W,3],
                             "dtype": "uint8", "order": "BGR"}
    ...       zero padding up to DATA_OFFSET (4096, so the frames start page-aligned)
    [4096:)   N*H*W*3 bytes: frame 0 row 0 pixel 0 B, G, R, ...

A cache is valid when its header names the video's current size and ``st_mtime_ns`` and
the file is exactly as long as the header says; otherwise it is rebuilt.

Concurrency: readers never lock. A cache is written to ``<name>.tmp-<pid>`` and renamed
over the final name (atomic on POSIX), so a reader sees the old complete file or the new
complete file, never half of one. Builders take an exclusive ``fcntl.flock`` on
``<name>.lock`` and re-check validity after acquiring it, so when several workers start
together exactly one decodes and the others wait, then map its result. The kernel drops
the lock if the builder dies; its leftover temporary file is removed by the next builder.
A worker that still maps a replaced cache keeps its (old, complete) inode alive until it
closes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import mmap
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np


__all__ = [
    "DATA_OFFSET",
    "MAGIC",
    "SUFFIX",
    "CachedFrames",
    "FrameCacheError",
    "cache_path",
    "decode_video",
    "open_frames",
    "read_header",
]

log = logging.getLogger(__name__)

MAGIC = b"LSFRAME1"
DATA_OFFSET = 4096
SUFFIX = ".framecache"
_VERSION = 1
_LEN = struct.Struct("<I")


class FrameCacheError(ValueError):
    """A video that cannot be decoded into a cache. The message starts with its file name."""


@dataclass(eq=False)
class CachedFrames:
    """Frames of one video: ``frames`` is ``[N, H, W, 3]`` uint8 BGR, read-only.

    ``decoded`` says whether this call decoded the video (True) or mapped an existing
    cache (False). ``path`` is None when the cache dir was not writable and the frames
    live in private memory instead.
    """

    source: Path
    path: Path | None
    frames: np.ndarray
    decoded: bool
    seconds: float = 0.0
    _mmap: mmap.mmap | None = field(default=None, repr=False)

    @property
    def count(self) -> int:
        return int(self.frames.shape[0])

    @property
    def frame_size(self) -> tuple[int, int]:
        """(width, height)."""
        return int(self.frames.shape[2]), int(self.frames.shape[1])

    def close(self) -> None:
        """Drop the array and unmap the file.

        If other arrays still view the mapping (a batch in flight), the unmap is left to
        the garbage collector: closing under them would crash the process.
        """
        self.frames = np.zeros((0, 0, 0, 3), dtype=np.uint8)
        if self._mmap is not None:
            with contextlib.suppress(BufferError):
                self._mmap.close()
            self._mmap = None


def cache_path(video: str | os.PathLike[str], cache_dir: str | os.PathLike[str]) -> Path:
    """Where the cache of ``video`` lives in ``cache_dir``."""
    return Path(cache_dir) / (Path(video).stem + SUFFIX)


def read_header(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The header of a cache file, or None if the file is missing, foreign or damaged."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return _read_header(fd)
    finally:
        os.close(fd)


def _read_header(fd: int) -> dict[str, Any] | None:
    try:
        head = os.pread(fd, DATA_OFFSET, 0)
        total = os.fstat(fd).st_size
    except OSError:
        return None
    if len(head) < len(MAGIC) + _LEN.size or not head.startswith(MAGIC):
        return None
    (length,) = _LEN.unpack_from(head, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    if start + length > DATA_OFFSET:
        return None
    try:
        header: dict[str, Any] = json.loads(head[start : start + length])
        shape = [int(v) for v in header["shape"]]
    except (ValueError, KeyError, TypeError):
        return None
    if header.get("version") != _VERSION or len(shape) != 4 or shape[3] != 3 or min(shape) < 1:
        return None
    if total != DATA_OFFSET + int(np.prod(shape)):
        return None  # truncated or padded: never map it
    header["shape"] = shape
    return header


def open_frames(
    video: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    lock_timeout: float | None = None,
) -> CachedFrames:
    """Map the cached frames of ``video``, decoding it first if no valid cache exists.

    ``cache_dir`` defaults to a ``cache`` directory beside the video. ``lock_timeout`` (s)
    bounds the wait for another process's decode (None = wait as long as it takes).
    Raises ``FrameCacheError`` if the video cannot be decoded.
    """
    video = Path(video)
    cache_dir = Path(cache_dir) if cache_dir is not None else video.parent / "cache"
    target = cache_path(video, cache_dir)
    key = _key(video)
    found = _map_if_valid(video, target, key)
    if found is not None:
        return found
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock(target.with_name(target.name + ".lock"), lock_timeout)
    except OSError as exc:  # read-only package: still serve it, just without sharing
        log.warning("%s: cache dir not writable (%s): decoding into private memory", video, exc)
        start = time.monotonic()
        frames = decode_video(video)
        frames.setflags(write=False)
        return CachedFrames(video, None, frames, True, time.monotonic() - start)
    try:
        # Someone may have built it while we waited for the lock.
        found = _map_if_valid(video, target, _key(video))
        if found is not None:
            return found
        start = time.monotonic()
        for _ in range(2):
            key = _key(video)
            _build(video, target, key)
            if _key(video) == key:  # else the video changed while we decoded it
                break
        found = _map_if_valid(video, target, _key(video))
        if found is None:
            raise FrameCacheError(f"{video.name}: keeps changing while it is decoded")
    finally:
        os.close(lock_fd)  # releases the lock
    found.decoded = True
    found.seconds = time.monotonic() - start
    log.info(
        "decoded %s: %d frames %dx%d in %.1f s into %s",
        video.name,
        found.count,
        *found.frame_size,
        found.seconds,
        target,
    )
    return found


def decode_video(video: str | os.PathLike[str]) -> np.ndarray:
    """Every frame of ``video`` as one ``[N, H, W, 3]`` uint8 BGR array (in memory)."""
    return np.stack(list(_frames(Path(video))))


def _key(video: Path) -> tuple[int, int]:
    try:
        st = video.stat()
    except FileNotFoundError:
        raise FrameCacheError(f"{video.name}: missing") from None
    return st.st_size, st.st_mtime_ns


def _map_if_valid(video: Path, target: Path, key: tuple[int, int]) -> CachedFrames | None:
    # Open first, then check the header through the same descriptor: a rename between a
    # check by name and the open would otherwise let us map a file we never checked.
    try:
        fd = os.open(target, os.O_RDONLY)
    except OSError:  # missing, or an unusable cache dir: the caller decodes
        return None
    try:
        header = _read_header(fd)
        if header is None or (header.get("size"), header.get("mtime_ns")) != key:
            return None
        shape = tuple(header["shape"])
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    frames = np.frombuffer(mm, dtype=np.uint8, count=int(np.prod(shape)), offset=DATA_OFFSET)
    return CachedFrames(video, target, frames.reshape(shape), False, _mmap=mm)


def _lock(path: Path, timeout: float | None) -> int:
    """An open descriptor holding an exclusive flock on ``path``; close it to release."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if timeout is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return fd
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise FrameCacheError(
                        f"{path.name}: another process holds the cache lock"
                    ) from None
                time.sleep(0.05)
    except BaseException:
        os.close(fd)
        raise


def _build(video: Path, target: Path, key: tuple[int, int]) -> None:
    """Decode ``video`` into ``target`` via a temporary file. Call with the lock held."""
    for stale in target.parent.glob(target.name + ".tmp-*"):
        stale.unlink(missing_ok=True)  # left by a builder that died; we hold the lock
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(b"\0" * DATA_OFFSET)
            count, shape = 0, None
            for frame in _frames(video):
                if shape is None:
                    shape = frame.shape
                elif frame.shape != shape:
                    raise FrameCacheError(
                        f"{video.name}: frame {count} is {frame.shape[1]}x{frame.shape[0]}, "
                        f"frame 0 is {shape[1]}x{shape[0]}"
                    )
                f.write(np.ascontiguousarray(frame).data)
                count += 1
            assert shape is not None  # _frames raises when there is none
            header = {
                "version": _VERSION,
                "source": video.name,
                "size": key[0],
                "mtime_ns": key[1],
                "shape": [count, *shape],
                "dtype": "uint8",
                "order": "BGR",
            }
            blob = json.dumps(header).encode()
            f.seek(0)
            f.write(MAGIC + _LEN.pack(len(blob)) + blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _frames(video: Path) -> Iterator[np.ndarray]:
    cap = cv2.VideoCapture(str(video))
    try:
        if not cap.isOpened():
            raise FrameCacheError(f"{video.name}: cannot be opened as a video")
        n = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
                raise FrameCacheError(f"{video.name}: frame {n} is not 8-bit BGR")
            n += 1
            yield frame
        if n == 0:
            raise FrameCacheError(f"{video.name}: no frame could be decoded")
    finally:
        cap.release()
