"""JPEG encoders: OpenCV on the host, or nvJPEG on the GPU where the optional extra is
installed.

Why a GPU encoder: a 1280×720 JPEG costs about 2.7 ms of host CPU with OpenCV, a 320×320
one 0.3 ms; at the thousands of frames per second one GPU computes, the host would set the
pace. ``torchvision.io.encode_jpeg`` encodes uint8 CUDA tensors with nvJPEG, so a frame
rendered on the device leaves it only as its JPEG bytes. torchvision is an optional extra
(``pip install '.[gpu]'``): a CPU install, CI and the tests here never need it; a CUDA
worker without it logs so and uses OpenCV.

Differences an operator may see: nvJPEG (as torchvision drives it) encodes 4:4:4 chroma,
OpenCV 4:2:0, so at the same quality a GPU-encoded JPEG is somewhat larger and keeps more
colour detail. Both decode to the same picture within JPEG noise (``tests/test_jpeg.py``,
on a GPU).

torchvision's encoder runs on its own CUDA stream and does not wait for the caller's: the
images handed to ``DeviceJpeg.encode`` must already be computed (the engine waits on the
batch's event first), and the planar copies made here are waited for before encoding. It
hands the bytes back on the legacy default stream, so ``DeviceJpeg.encode`` must run on a
thread whose current stream is the default one (the runtime's encode thread: the engine's
own stream is set only on the compute thread). It returns once the bytes are on the
host.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import torch


__all__ = ["DeviceJpeg", "choose_device_jpeg", "encode_host", "nvjpeg_missing"]

log = logging.getLogger(__name__)


def encode_host(image: np.ndarray, quality: int) -> bytes:
    """One BGR uint8 image ``[H, W, 3]`` as JPEG bytes, with OpenCV."""
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("cv2.imencode failed")
    return buf.tobytes()


def nvjpeg_missing() -> str | None:
    """Why the GPU encoder cannot be used in this install, or None when it can be tried."""
    if importlib.util.find_spec("torchvision") is None:
        return "torchvision is not installed (pip install '.[gpu]' adds it)"
    return None


class DeviceJpeg:
    """nvJPEG through ``torchvision.io.encode_jpeg``, for BGR uint8 ``[H, W, 3]`` tensors
    on one CUDA device. Construct it with ``choose_device_jpeg``."""

    name = "nvjpeg"

    def __init__(self, encode_jpeg: Callable[..., Any]) -> None:
        self._encode_jpeg = encode_jpeg

    def encode(self, images: Sequence[torch.Tensor], qualities: Sequence[int]) -> list[bytes]:
        """JPEG bytes per image, in order: one encoder call per distinct quality."""
        out: list[bytes | None] = [None] * len(images)
        by_quality: dict[int, list[int]] = {}
        for k, q in enumerate(qualities):
            by_quality.setdefault(int(q), []).append(k)
        if not images:
            return []
        device = images[0].device
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device)
            for quality, ks in by_quality.items():
                # HWC BGR -> CHW RGB, contiguous (nvJPEG needs planar contiguous input).
                chw = [images[k].permute(2, 0, 1).flip(0).contiguous() for k in ks]
                # torchvision encodes on a stream of its own that does not wait for this
                # one: the planar copies must be done first.
                stream.synchronize()
                encoded = self._encode_jpeg(chw, quality=quality)
                for k, data in zip(ks, encoded, strict=True):
                    out[k] = data.cpu().numpy().tobytes()
        missing = [k for k, b in enumerate(out) if b is None]
        if missing:
            raise RuntimeError(f"nvJPEG returned nothing for images {missing}")
        return [b for b in out if b is not None]


def choose_device_jpeg(device: torch.device) -> tuple[DeviceJpeg | None, str]:
    """The GPU encoder for ``device`` and a line saying which encoder the worker uses.

    None (OpenCV on the host) on CPU, without the extra, or when a trial encode fails (a
    torchvision built without nvJPEG, or one that does not match this torch).
    """
    if device.type != "cuda":
        return None, "JPEG: OpenCV on the host"
    missing = nvjpeg_missing()
    if missing is not None:
        return None, f"JPEG: OpenCV on the host, not nvJPEG: {missing}"
    try:
        from torchvision.io import encode_jpeg

        probe = torch.zeros((8, 8, 3), dtype=torch.uint8, device=device)
        (data,) = DeviceJpeg(encode_jpeg).encode([probe], [85])
        if data[:2] != b"\xff\xd8":
            raise RuntimeError("the trial JPEG has no JPEG header")
    except Exception as exc:  # ImportError, RuntimeError from the C++ side, ...
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        return None, f"JPEG: OpenCV on the host, not nvJPEG: the trial encode failed ({reason})"
    return DeviceJpeg(encode_jpeg), f"JPEG: nvJPEG on {device}"
