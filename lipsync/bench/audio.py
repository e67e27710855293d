"""Speech-like test audio for the load generator.

Silence or a sine would let a stream skip inference (silent frames are idle) or give the
audio front end an unrealistically easy input; a recording would add a data file. So the
signal is drawn: a voiced source (harmonics of a gliding pitch) shaped by two moving formants,
a syllable-rate loudness envelope that never quite reaches silence, and a little breath
noise. Deterministic for a given seed.
"""

from __future__ import annotations

import numpy as np


__all__ = ["B_RATE", "B_WINDOW_SAMPLES", "b_window", "speech_like"]

B_RATE = 24_000
"""Sample rate of layout B's audio (the original page's)."""
B_WINDOW_SAMPLES = 16 * 960
"""Layout B carries 640 ms: 8 chunks before the frame, its own, 7 after (DESIGN.md 4)."""


def speech_like(seconds: float, sample_rate: int, *, seed: int = 0) -> np.ndarray:
    """``seconds`` of int16 mono PCM at ``sample_rate`` that sounds (to a mel front end)
    roughly like continuous speech."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    f0 = 130 + 30 * np.sin(2 * np.pi * 0.7 * t) + 15 * np.sin(2 * np.pi * 3.1 * t + 1.0)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    f1 = 500 + 250 * np.sin(2 * np.pi * 4.0 * t)  # formants move once per syllable
    f2 = 1500 + 600 * np.sin(2 * np.pi * 2.3 * t + 0.5)
    voiced = np.zeros(n)
    for k in range(1, 40):
        fk = k * f0
        gain = (
            np.exp(-(((fk - f1) / 200) ** 2)) + 0.6 * np.exp(-(((fk - f2) / 300) ** 2)) + 0.05 / k
        )
        voiced += gain * np.sin(k * phase) * (fk < sample_rate / 2)
    syllables = 0.3 + 0.7 * np.sin(np.pi * 4.0 * t) ** 2
    signal = voiced * syllables + 0.02 * rng.standard_normal(n)
    signal *= 0.5 / max(float(np.abs(signal).max()), 1e-9)
    return (signal * 32767).astype("<i2")


def b_window(track: np.ndarray, frame_id: int, fps: float = 25.0) -> bytes:
    """The 640 ms that the original page sent with frame ``frame_id``: from 320 ms before the
    frame's time to 320 ms after, from ``track`` (24 kHz, wrapped around at its end)."""
    start = int(round(frame_id / fps * B_RATE)) - B_WINDOW_SAMPLES // 2
    idx = (np.arange(start, start + B_WINDOW_SAMPLES)) % len(track)
    return track[idx].tobytes()
