"""JPEG encoders (workers/jpeg.py): the OpenCV fallback where the GPU extra is absent, and
nvJPEG's output on a GPU."""

from __future__ import annotations

import importlib.util
import logging

import cv2
import numpy as np
import pytest
import torch

from workers.engine import TorchBackend
from workers.jpeg import choose_device_jpeg, encode_host, nvjpeg_missing


HAVE_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def picture() -> np.ndarray:
    y, x = np.mgrid[0:120, 0:160]
    image = np.stack([x * 1.5, y * 2.0, (x + y) * 0.7], axis=-1)
    return np.clip(image, 0, 255).astype(np.uint8)


def test_host_encoder_is_opencv():
    image = picture()
    ok, want = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok and encode_host(image, 80) == want.tobytes()


def test_cpu_uses_opencv():
    encoder, line = choose_device_jpeg(torch.device("cpu"))
    assert encoder is None and line == "JPEG: OpenCV on the host"


@pytest.mark.skipif(HAVE_TORCHVISION, reason="the gpu extra is installed here")
def test_without_the_extra_a_cuda_worker_falls_back_and_says_why(tiny_package, caplog):
    assert nvjpeg_missing() == "torchvision is not installed (pip install '.[gpu]' adds it)"
    # Decided before any CUDA call, so it can be checked on a machine without a GPU.
    encoder, line = choose_device_jpeg(torch.device("cuda:0"))
    assert encoder is None
    assert line == (
        "JPEG: OpenCV on the host, not nvJPEG: torchvision is not installed "
        "(pip install '.[gpu]' adds it)"
    )
    with caplog.at_level(logging.INFO, logger="workers.engine"):
        backend = TorchBackend(tiny_package, device="cpu")
    assert backend.jpeg_encoder == "opencv"
    assert "JPEG: OpenCV on the host" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not HAVE_TORCHVISION, reason="needs the gpu extra (torchvision)")
def test_nvjpeg_decodes_to_the_same_picture_within_jpeg_noise():
    encoder, line = choose_device_jpeg(torch.device("cuda"))
    assert encoder is not None, line
    image = picture()
    tensors = [torch.from_numpy(image).cuda(), torch.from_numpy(image[:50, :70].copy()).cuda()]
    jpegs = encoder.encode(tensors, [85, 60])
    for jpeg, source in zip(jpegs, [image, image[:50, :70]], strict=True):
        decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert decoded.shape == source.shape  # BGR in, BGR out: channels not swapped
        assert np.abs(decoded.astype(int) - source.astype(int)).mean() < 3
