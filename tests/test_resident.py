"""Frames resident on the device (workers/resident.py): what goes up within a budget."""

from __future__ import annotations

import numpy as np
import torch

from workers.resident import DeviceFrames, plan_residency


SIZES = {"rois_320": 30, "model_inputs": 30, "crops_328": 32, "full_body": 300}


def test_tiers_go_up_in_order_while_they_fit():
    assert plan_residency(SIZES, 1000) == ["rois_320", "model_inputs", "crops_328", "full_body"]
    assert plan_residency(SIZES, 392) == ["rois_320", "model_inputs", "crops_328", "full_body"]
    assert plan_residency(SIZES, 391) == ["rois_320", "model_inputs", "crops_328"]
    assert plan_residency(SIZES, 92) == ["rois_320", "model_inputs", "crops_328"]
    assert plan_residency(SIZES, 91) == ["rois_320", "model_inputs"]
    assert plan_residency(SIZES, 59) == []  # the model inputs go up together or not at all
    # A later tier is of no use without the earlier ones: it is not uploaded alone.
    assert plan_residency({**SIZES, "crops_328": 10_000}, 400) == ["rois_320", "model_inputs"]


def test_upload_holds_the_chosen_videos():
    rng = np.random.default_rng(0)
    videos = {
        "rois_320": rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8),
        "model_inputs": rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8),
        "crops_328": rng.integers(0, 256, (5, 9, 9, 3), dtype=np.uint8),
        "full_body": rng.integers(0, 256, (5, 20, 30, 3), dtype=np.uint8),
    }
    for v in videos.values():
        v.setflags(write=False)  # as the mapped frame caches are
    budget = sum(v.nbytes for k, v in videos.items() if k != "full_body")
    frames = DeviceFrames.upload(videos, torch.device("cpu"), budget)
    assert list(frames.frames) == ["rois_320", "model_inputs", "crops_328"]
    assert frames.has_inputs() and "full_body" not in frames
    for kind, t in frames.frames.items():
        assert t.dtype == torch.uint8 and np.array_equal(t.numpy(), videos[kind])
    line = frames.describe(videos, budget)
    assert "rois_320, model_inputs, crops_328" in line
    assert "staged from the host: full_body" in line
    frames.release()
    assert frames.nbytes == 0 and not frames.has_inputs()
