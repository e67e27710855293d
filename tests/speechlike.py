"""Synthetic speech-like audio for stream tests: a glottal pulse train through formant
resonators, shaped into syllables, with pauses of digital silence between phrases.

Deterministic for a seed. Not speech, but it has what the front end and the silence
detector care about: voiced harmonics with moving formants, syllable-rate loudness
changes, and real silences.
"""

from __future__ import annotations

import numpy as np
from scipy.signal import lfilter


__all__ = ["speechlike", "speechlike_pcm"]

_VOWELS = ((730, 1090, 2440), (270, 2290, 3010), (530, 1840, 2480), (570, 840, 2410))


def _resonator(x: np.ndarray, freq: float, bandwidth: float, sr: int) -> np.ndarray:
    r = np.exp(-np.pi * bandwidth / sr)
    theta = 2 * np.pi * freq / sr
    a = [1.0, -2 * r * np.cos(theta), r * r]
    return lfilter([1.0 - r], a, x)


def speechlike(
    seconds: float,
    sr: int = 16_000,
    *,
    seed: int = 0,
    pauses: tuple[tuple[float, float], ...] = (),
    level_dbfs: float = -20.0,
) -> np.ndarray:
    """``seconds`` of int16 audio at ``sr``. ``pauses`` are ``(start_s, end_s)`` spans of
    digital silence; elsewhere syllables of 150-300 ms follow each other with short dips."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    out = np.zeros(n)
    t = 0.0
    while t < seconds:
        dur = rng.uniform(0.15, 0.3)
        start, end = int(t * sr), min(n, int((t + dur) * sr))
        if end - start > 16:
            f0 = rng.uniform(100, 180)
            length = end - start
            phase = np.cumsum(np.full(length, f0 / sr) * (1 + 0.02 * rng.standard_normal()))
            pulses = (np.diff(np.floor(phase), prepend=0) > 0).astype(float)
            f1, f2, f3 = _VOWELS[rng.integers(len(_VOWELS))]
            voiced = sum(
                _resonator(pulses, f * rng.uniform(0.9, 1.1), bw, sr) * g
                for f, bw, g in ((f1, 80, 1.0), (f2, 100, 0.5), (f3, 150, 0.25))
            )
            envelope = np.sin(np.linspace(0, np.pi, length)) ** 1.5
            out[start:end] = voiced * envelope
        t += dur + rng.uniform(0.01, 0.05)
    peak = np.max(np.abs(out)) or 1.0
    rms_target = 10 ** (level_dbfs / 20)
    voiced_rms = np.sqrt(np.mean(out[np.abs(out) > 0.01 * peak] ** 2)) or 1.0
    out *= rms_target / voiced_rms
    for lo, hi in pauses:
        out[int(lo * sr) : int(hi * sr)] = 0.0
    return np.clip(np.round(out * 32767), -32768, 32767).astype(np.int16)


def speechlike_pcm(seconds: float, sr: int = 16_000, **kwargs: object) -> bytes:
    """``speechlike`` as int16 LE bytes."""
    return speechlike(seconds, sr, **kwargs).astype("<i2").tobytes()  # type: ignore[arg-type]
