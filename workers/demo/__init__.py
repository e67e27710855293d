"""The built-in demo avatar: drawn, voiced and trained by the project's own code.

On a fresh machine ``lipsync up`` serves this package first. Random weights would draw
noise where the mouth should be; this one opens and closes its mouth with the voice, on a
laptop CPU, in real time (quarter-width UNet-328).

- ``avatar``: the procedural face, its idle loop, and ``mouth_opening`` (the measure).
- ``speech``: speech-like audio with pauses, and mouth targets from its loudness.
- ``dataset``: the idle loop's frames and the (audio, image, target) training material.
- ``train``: the seeded three-stage CPU training of the UNet and the audio encoder.
- ``build``: ``build_demo_package`` writes the package (committed weights or training).
- ``evaluate``: lip-sync check on real speech (Pearson r of opening vs. frame energy).

Importing this package is cheap; the heavy modules load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any


__all__ = ["WEIGHTS_FILE", "build_demo_package"]

if TYPE_CHECKING:
    from workers.demo.build import WEIGHTS_FILE, build_demo_package


def __getattr__(name: str) -> Any:
    if name in ("build_demo_package", "WEIGHTS_FILE"):
        from workers.demo import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
