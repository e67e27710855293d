"""The frame cache: decoded once per host, shared by processes, rebuilt when the video changes."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from workers.framecache import (
    DATA_OFFSET,
    FrameCacheError,
    cache_path,
    decode_video,
    open_frames,
    read_header,
)


ROOT = Path(__file__).resolve().parents[1]

# A worker-like process: waits for the go file, maps the cache, reports what it saw.
CHILD = """
import hashlib, json, os, sys, time
from pathlib import Path
from workers.framecache import open_frames
video, cache_dir, go = sys.argv[1:4]
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.005)
frames = open_frames(video, cache_dir)
print(json.dumps({
    "decoded": frames.decoded,
    "inode": os.stat(frames.path).st_ino,
    "sha": hashlib.sha256(frames.frames.tobytes()).hexdigest(),
    "shape": list(frames.frames.shape),
}), flush=True)
"""


def write_video(path: Path, frames: int = 5, shift: int = 0, size=(96, 64)) -> np.ndarray:
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (w, h))
    for i in range(frames):
        image = np.zeros((h, w, 3), np.uint8)
        image[:] = (40 + 20 * i, 90, 160)
        cv2.circle(image, (20 + 8 * i + shift, 32), 12, (250, 250, 250), -1)
        writer.write(image)
    writer.release()
    return decode_video(path)


@pytest.fixture
def video(tmp_path) -> Path:
    path = tmp_path / "clip_video.mp4"
    write_video(path)
    return path


def test_decodes_once_then_maps(video, tmp_path):
    """The first open decodes into cache/<stem>.framecache; later opens map it read-only."""
    first = open_frames(video)
    assert first.decoded
    assert first.path == tmp_path / "cache" / "clip_video.framecache"
    assert np.array_equal(first.frames, decode_video(video))
    second = open_frames(video)
    assert not second.decoded
    assert np.array_equal(second.frames, first.frames)
    assert not second.frames.flags.writeable
    with pytest.raises(ValueError):
        second.frames[0, 0, 0, 0] = 1
    header = read_header(second.path)
    st = video.stat()
    assert header is not None
    assert (header["size"], header["mtime_ns"]) == (st.st_size, st.st_mtime_ns)
    assert header["shape"] == [5, 64, 96, 3]
    assert second.path.stat().st_size == DATA_OFFSET + 5 * 64 * 96 * 3
    first.close()
    second.close()
    assert second.frames.size == 0


def test_rebuilt_when_video_mtime_changes(video):
    first = open_frames(video)
    inode = os.stat(first.path).st_ino
    st = video.stat()
    os.utime(video, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    again = open_frames(video)
    assert again.decoded
    assert os.stat(again.path).st_ino != inode  # a new file was renamed into place
    assert np.array_equal(again.frames, first.frames)  # the old mapping still reads fine
    assert not open_frames(video).decoded


def test_rebuilt_when_video_content_changes(video):
    before = open_frames(video).frames
    expected = write_video(video, frames=7, shift=5)
    after = open_frames(video)
    assert after.decoded and after.frames.shape[0] == 7
    assert np.array_equal(after.frames, expected)
    assert before.shape[0] == 5  # a mapping taken earlier keeps the complete old file


@pytest.mark.parametrize("damage", ["truncate", "garbage", "header"])
def test_damaged_cache_is_rebuilt(video, damage):
    path = open_frames(video).path
    assert path is not None
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:-100])
    elif damage == "garbage":
        path.write_bytes(b"x" * len(data))
    else:
        path.write_bytes(data[:20] + b"\xff" * 30 + data[50:])
    assert read_header(path) is None
    rebuilt = open_frames(video)
    assert rebuilt.decoded
    assert np.array_equal(rebuilt.frames, decode_video(video))


def test_concurrent_processes_decode_once(video, tmp_path):
    """Several worker processes opening the same video at once: exactly one decodes,
    all map the same file and see the same frames."""
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(video), str(tmp_path / "cache"), str(go)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        go.touch()
        reports = []
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert sorted(r["decoded"] for r in reports) == [False, False, True]
    assert len({r["inode"] for r in reports}) == 1
    assert len({r["sha"] for r in reports}) == 1
    assert reports[0]["shape"] == [5, 64, 96, 3]
    assert not list((tmp_path / "cache").glob("*.tmp-*"))


def test_second_process_maps_first_processes_cache(video, tmp_path):
    """A process started later reuses the cache: no decode, same inode and mtime."""
    first = open_frames(video)
    assert first.path is not None
    before = os.stat(first.path)
    go = tmp_path / "go"
    go.touch()
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(video), str(tmp_path / "cache"), str(go)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["decoded"] is False
    after = os.stat(first.path)
    assert report["inode"] == before.st_ino == after.st_ino
    assert after.st_mtime_ns == before.st_mtime_ns


def test_waits_for_the_lock_holder(video, tmp_path):
    """While another process builds (holds the lock), nobody builds beside it."""
    lock = cache_path(video, tmp_path / "cache").with_suffix(".framecache.lock")
    lock.parent.mkdir()
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        start = time.monotonic()
        with pytest.raises(FrameCacheError, match="holds the cache lock"):
            open_frames(video, lock_timeout=0.2)
        assert time.monotonic() - start >= 0.2
        assert not cache_path(video, tmp_path / "cache").exists()
    finally:
        os.close(fd)
    assert open_frames(video, lock_timeout=5).decoded


def test_stale_temp_file_removed(video, tmp_path):
    stale = tmp_path / "cache" / "clip_video.framecache.tmp-999999"
    stale.parent.mkdir()
    stale.write_bytes(b"half a cache")
    open_frames(video)
    assert not stale.exists()


def test_unwritable_cache_dir_decodes_privately(video, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    frames = open_frames(video, blocker / "cache")
    assert frames.decoded and frames.path is None
    assert np.array_equal(frames.frames, decode_video(video))


def test_undecodable_video_names_the_file(tmp_path):
    bad = tmp_path / "broken_video.mp4"
    bad.write_bytes(b"\0" * 100)
    with pytest.raises(FrameCacheError, match="^broken_video.mp4: "):
        open_frames(bad)
    with pytest.raises(FrameCacheError, match="^gone.mp4: missing"):
        open_frames(tmp_path / "gone.mp4")
