"""``lipsync train-demo``: train the demo avatar from scratch on this CPU and write its package.

``lipsync up`` does not need this (it uses the committed weights); it is how those weights
were made, and how to remake them: ``lipsync train-demo --seed 0 --save-weights``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from workers.demo.build import WEIGHTS_FILE, build_demo_package
from workers.demo.train import TrainConfig


__all__ = ["QUICK", "train_demo"]

QUICK: dict[str, Any] = {
    "speech_seconds": 24.0,
    "encoder_steps": 4,
    "encoder_batch": 16,
    "unet_steps": 4,
    "unet_batch": 2,
    "joint_steps": 2,
    "joint_batch": 1,
    "calibration_batches": 1,
}
"""``--quick``: enough steps to exercise every stage, nowhere near a working avatar."""


def train_demo(args: argparse.Namespace) -> int:
    config = TrainConfig(seed=args.seed, threads=args.threads, **(QUICK if args.quick else {}))
    save_to = None
    if args.save_weights is not None:
        save_to = args.save_weights or WEIGHTS_FILE
    start = time.monotonic()
    path = build_demo_package(
        args.models_dir,
        name=args.name,
        seed=args.seed,
        progress=True,
        retrain=True,
        config=config,
        save_to=save_to,
        overwrite=True,
    )
    print(f"{path} (trained in {time.monotonic() - start:.0f}s)")
    return 0
