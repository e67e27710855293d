"""Near-lossless H.264 video files, written a BGR frame at a time, through PyAV.

Why PyAV: OpenCV's pip wheels can decode H.264 but cannot encode it (they ship no x264),
and their mp4v (MPEG-4 part 2) loses 3-6 grey levels on a face crop, which an imported
avatar would carry into every frame it serves. PyAV's wheel bundles FFmpeg with libx264,
so a plain ``pip install`` can write H.264, and the workers still decode the result with
OpenCV.

Settings, and why (measured on drawn and JPEG-noisy frames, 328x328 and 1280x720):

* ``libx264rgb`` on the BGR frames as they are (H.264 High 4:4:4 Predictive, GBR planes):
  no colour conversion and no chroma subsampling. 4:2:0 loses 2 grey levels on average
  at the colour edges of a face even when the encoder is lossless; BGR to YUV 4:4:4 and
  back loses half a level by itself, and a decoder that guesses the colour matrix (BT.709
  for HD) shifts colours by a few. In GBR a frame decodes within 0.3 (crop) to 0.7 (720p)
  grey levels of its source on average.
* CRF 12, preset ``veryfast`` (the original system's packages used CRF 18 and 4:2:0).
* 25 fps constant frame rate, no audio track: SyncTalk_2D's frame rate, and what
  ``workers.package`` reads from the header.
* Macroblock-tree rate control off (``mbtree=0``), and one x264 thread per video. With
  x264's defaults the same frames encoded to slightly different files from run to run
  (a few hundred pixels one level off): the output depended on what the heap held before
  (shown by filling freed memory with different bytes ahead of each encode). Without the
  macroblock tree it did not, in 8 encodes each at 320, 328, 333 and 640 px, whatever the
  heap held; the tree only shifts bits between frames, which a near-lossless CRF does
  not need. The four videos of a package are encoded on threads of their own and share
  the cores that way (PyAV releases the GIL while it encodes).
"""

from __future__ import annotations

import os
import queue
import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


__all__ = ["CRF", "PRESET", "H264Writer", "describe"]

CRF = 12
PRESET = "veryfast"
_CODEC = "libx264rgb"
_PIX_FMT = "bgr24"  # what the frames are: no conversion before the encoder
_X264_PARAMS = "mbtree=0"  # see the module docstring: determinism
_QUEUED = 8  # frames waiting for the encoder thread: bounds memory, keeps it busy
_END = None


def describe(crf: int = CRF) -> str:
    """How the videos are encoded, for a package's ``source`` block."""
    return f"h264 ({_CODEC} via PyAV {av.__version__}) {_PIX_FMT} crf {crf} preset {PRESET}"


class H264Writer:
    """One mp4 file of ``size`` (width, height) BGR frames; the cv2.VideoWriter interface
    (``write``, ``release``) so that package makers can use either.

    Frames are encoded on a thread of the writer's own; ``write`` copies the frame and
    returns (it waits only when several frames are already queued). An encoder error is
    raised by the next ``write`` or by ``release``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        size: tuple[int, int],
        fps: int = 25,
        crf: int = CRF,
    ) -> None:
        width, height = size  # GBR planes are all full size: odd sizes are fine
        self.path = Path(path)
        self.size = (width, height)
        self._container = av.open(str(path), mode="w", format="mp4")
        try:
            stream = self._container.add_stream(_CODEC, rate=Fraction(fps, 1))
            assert isinstance(stream, av.VideoStream)
            stream.width, stream.height = width, height
            stream.pix_fmt = _PIX_FMT
            stream.codec_context.thread_count = 1
            stream.options = {"crf": str(crf), "preset": PRESET, "x264-params": _X264_PARAMS}
        except BaseException:
            self._container.close()
            raise
        self._stream = stream
        self._closed = False
        self._error: BaseException | None = None
        self._queue: queue.Queue[av.VideoFrame | None] = queue.Queue(_QUEUED)
        self._thread = threading.Thread(
            target=self._encode, name=f"h264-{self.path.stem}", daemon=True
        )
        self._thread.start()

    def write(self, frame: np.ndarray) -> None:
        """Append one uint8 BGR frame ``[height, width, 3]`` (copied: the caller may reuse it)."""
        h, w = frame.shape[:2]
        if (w, h) != self.size or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(
                f"{self.path.name}: frame is {w}x{h}, the video is {self.size[0]}x{self.size[1]}"
            )
        if self._closed:
            raise ValueError(f"{self.path.name}: writer is closed")
        self._raise_error()
        self._queue.put(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="bgr24"))

    def release(self) -> None:
        """Encode what is queued, flush the encoder, close the file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._queue.put(_END)
            self._thread.join()
        finally:
            self._container.close()
        self._raise_error()

    def _encode(self) -> None:
        ended = False
        try:
            while (frame := self._queue.get()) is not _END:
                for packet in self._stream.encode(frame):
                    self._container.mux(packet)
            ended = True
            for packet in self._stream.encode():
                self._container.mux(packet)
        except BaseException as exc:  # handed to the caller's thread
            self._error = exc
            while not ended and self._queue.get() is not _END:  # let write/release go on
                pass

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error
