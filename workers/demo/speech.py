"""Speech-like audio with pauses, and the mouth it should produce, frame by frame.

Why synthetic: the demo is trained from nothing but the project's own code. The synthesiser
is a classic source-filter model (what formant synthesisers such as espeak do): a glottal
pulse train with jittered, drifting pitch, through three formant resonators per vowel,
syllable envelopes, consonant onsets (noise for fricatives, bursts for plosives, low murmur
for nasals), pauses between phrases and a noise floor. That is close enough to real speech
in the mel domain for the model to learn "loud voiced sound → open mouth, quiet → closed",
which is all the demo needs.

The mouth targets come from the audio itself (``opening_from_audio``), not from the
synthesis plan, so the rule the model learns is the one we measure it by: how open the
mouth is follows the loudness of the frame's audio, and the mouth is closed when it is
quiet. The plan only adds the shape (spread for "ee", rounded for "oo").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import lfilter


__all__ = [
    "FPS",
    "SAMPLE_RATE",
    "VOWELS",
    "Speech",
    "frame_db",
    "frame_rms",
    "opening_from_audio",
    "synthesize",
]

SAMPLE_RATE = 16_000
FPS = 25

VOWELS: dict[str, tuple[tuple[float, float, float], float, float]] = {
    # name: ((F1, F2, F3) Hz, relative loudness dB, mouth width)
    "a": ((730.0, 1090.0, 2440.0), 0.0, 1.0),
    "e": ((530.0, 1840.0, 2480.0), -1.5, 1.12),
    "i": ((300.0, 2250.0, 3000.0), -4.0, 1.22),
    "o": ((570.0, 860.0, 2410.0), -1.0, 0.8),
    "u": ((320.0, 870.0, 2240.0), -4.5, 0.68),
    "@": ((600.0, 1300.0, 2450.0), -2.5, 0.98),
}
"""Vowel formants (adult averages), intrinsic loudness (open vowels are louder) and the
mouth width the avatar uses for them."""

# Mapping of frame loudness to mouth opening: a power law of the frame's RMS (perceived
# loudness grows roughly like that), wide open at OPEN_REF RMS (-14 dBFS), gated shut below
# about GATE_DB (a noise floor or a breath must not open the mouth). espeak-ng speaks at
# about -25 dBFS (median of voiced frames): about half open, and varying.
OPEN_REF = 0.2
OPEN_POWER = 0.6
GATE_DB = -50.0


@dataclass(slots=True)
class Speech:
    """A synthetic clip: float32 samples at ``sr`` and per-video-frame mouth targets."""

    audio: np.ndarray
    sr: int
    opening: np.ndarray  # [n_frames] 0..1
    width: np.ndarray  # [n_frames] ≈0.7..1.2

    @property
    def n_frames(self) -> int:
        return int(self.opening.shape[0])


def frame_rms(audio: np.ndarray, sr: int = SAMPLE_RATE, fps: float = FPS) -> np.ndarray:
    """RMS of each video frame's own samples ``[i/fps, (i+1)/fps)``; a short tail is dropped."""
    hop = int(round(sr / fps))
    n = len(audio) // hop
    frames = np.asarray(audio[: n * hop], dtype=np.float64).reshape(n, hop)
    return np.sqrt((frames**2).mean(axis=1))


def frame_db(audio: np.ndarray, sr: int = SAMPLE_RATE, fps: float = FPS) -> np.ndarray:
    """``frame_rms`` in dBFS (floor -120)."""
    return 20.0 * np.log10(np.maximum(frame_rms(audio, sr, fps), 1e-6))


def opening_from_audio(audio: np.ndarray, sr: int = SAMPLE_RATE, fps: float = FPS) -> np.ndarray:
    """The mouth opening each video frame should show, from the loudness of its own audio.

    ``(rms / OPEN_REF) ** OPEN_POWER`` clipped to 1, faded to 0 over the 6 dB below
    ``GATE_DB``. No smoothing: the model's 0.64 s of context smooths enough by itself, and
    the target should stay a plain function of the audio the mouth is judged against.
    """
    rms = frame_rms(audio, sr, fps)
    db = 20.0 * np.log10(np.maximum(rms, 1e-6))
    gate = np.clip((db - (GATE_DB - 6.0)) / 6.0, 0.0, 1.0)
    return (np.clip((rms / OPEN_REF) ** OPEN_POWER, 0.0, 1.0) * gate).astype(np.float32)


def _resonator(x: np.ndarray, freq: float, bw: float, sr: int) -> np.ndarray:
    """Klatt's two-pole formant resonator, unit gain at DC."""
    r = np.exp(-np.pi * bw / sr)
    c = -(r**2)
    b = 2 * r * np.cos(2 * np.pi * freq / sr)
    a = 1 - b - c
    return lfilter([a], [1, -b, -c], x)


def _glottal_source(
    f0: np.ndarray, sr: int, rng: np.random.Generator, tilt: float = 0.5
) -> np.ndarray:
    """Pulse train at the (per-sample) pitch ``f0``, with spectral tilt and some breath.

    ``tilt`` -0.9 gives a bright voice (about flat above 1 kHz, like espeak's), 0 a plain
    one (-6 dB/octave), 0.8 a dark one (about -12 dB/octave over the speech band)."""
    phase = np.cumsum(f0 / sr)
    pulses = np.diff(np.floor(phase), prepend=np.floor(phase[0])).astype(np.float64)
    # Two one-pole low-passes: the ~-12 dB/octave tilt of the glottal flow derivative.
    src = lfilter([1.0], [1.0, -0.97], pulses)
    src = lfilter([1.0, -max(0.0, -tilt)], [1.0, -max(0.0, tilt)], src)
    src -= lfilter([0.02], [1.0, -0.98], src)  # remove the slow DC drift
    breath = rng.normal(0.0, 0.02, len(f0)) * (np.abs(src).mean() + 1e-3)
    return src + breath


def _bandpass_noise(n: int, lo: float, hi: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    noise = rng.normal(0.0, 1.0, n)
    centre = np.sqrt(lo * hi)
    out = _resonator(noise, centre, hi - lo, sr)
    return out / (np.sqrt(np.mean(out**2)) + 1e-9)


def _envelope(n: int, attack: int, release: int) -> np.ndarray:
    env = np.ones(n)
    attack = max(1, min(attack, n // 2))
    release = max(1, min(release, n - attack))
    env[:attack] = 0.5 - 0.5 * np.cos(np.pi * np.arange(attack) / attack)
    env[n - release :] = 0.5 + 0.5 * np.cos(np.pi * np.arange(release) / release)
    return env


def _syllable(
    rng: np.random.Generator, sr: int, f0: float, level_db: float, tilt: float, brightness: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """One syllable: optional consonant onset + vowel. Returns (audio, vowel-mask, width)."""
    name = str(rng.choice(list(VOWELS)))
    formants, loudness, width = VOWELS[name]
    parts: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    kind = rng.choice(["none", "fricative", "plosive", "nasal"], p=[0.3, 0.3, 0.25, 0.15])
    if kind == "fricative":
        n = int(sr * rng.uniform(0.04, 0.12))
        lo = rng.uniform(2500, 4500)
        fric = _bandpass_noise(n, lo, lo * rng.uniform(1.4, 1.9), sr, rng)
        gain = 10 ** ((level_db - rng.uniform(2, 20)) / 20)
        parts.append(fric * _envelope(n, n // 3, n // 3) * gain)
        masks.append(np.zeros(n))
    elif kind == "plosive":
        closure = int(sr * rng.uniform(0.02, 0.06))
        burst_n = int(sr * rng.uniform(0.01, 0.025))
        burst = _bandpass_noise(burst_n, 1000, rng.uniform(3000, 6000), sr, rng)
        gain = 10 ** ((level_db - rng.uniform(6, 14)) / 20)
        parts += [np.zeros(closure), burst * _envelope(burst_n, 8, burst_n // 2) * gain]
        masks += [np.zeros(closure), np.zeros(burst_n)]
    elif kind == "nasal":
        n = int(sr * rng.uniform(0.04, 0.09))
        src = _glottal_source(np.full(n, f0), sr, rng, tilt)
        nasal = _resonator(_resonator(src, 260.0, 80.0, sr), 2200.0, 300.0, sr) * 0.3
        nasal /= np.sqrt(np.mean(nasal**2)) + 1e-9
        gain = 10 ** ((level_db - rng.uniform(12, 20)) / 20)
        parts.append(nasal * _envelope(n, n // 4, n // 4) * gain)
        masks.append(np.zeros(n))
    n = int(sr * rng.uniform(0.09, 0.26))
    contour = f0 * (1 + rng.uniform(-0.08, 0.1) * np.linspace(0, 1, n))
    contour *= 1 + 0.01 * np.cumsum(rng.normal(0, 0.15, n)) / np.sqrt(np.arange(1, n + 1))
    src = _glottal_source(contour, sr, rng, tilt)
    jitter = [rng.uniform(0.92, 1.08) for _ in range(3)] + [1.0, 1.0]
    out = src
    # Cascade F1-F3 of the vowel, then the speaker's F4/F5 (they add the brightness that
    # real voices have above 3 kHz).
    bands = (*formants, rng.uniform(3300, 3800), rng.uniform(4300, 5000))
    widths = (70.0, 100.0, 140.0, 250.0, 350.0)
    for f, j, bw in zip(bands, jitter, widths, strict=True):
        out = _resonator(out, f * j, bw * rng.uniform(0.8, 1.4), sr)
    out /= np.sqrt(np.mean(out**2)) + 1e-9
    if brightness > 0:  # a parallel high-pass branch: energy up to 8 kHz, as espeak has
        high = lfilter([1.0, -1.0], [1.0, -0.3], src)
        out += brightness * high / (np.sqrt(np.mean(high**2)) + 1e-9)
        out /= np.sqrt(np.mean(out**2)) + 1e-9
    gain = 10 ** ((level_db + loudness) / 20)
    env = _envelope(n, int(sr * rng.uniform(0.02, 0.05)), int(sr * rng.uniform(0.03, 0.08)))
    parts.append(out * env * gain)
    masks.append(env)
    return np.concatenate(parts), np.concatenate(masks), width


def synthesize(seconds: float, seed: int = 0, sr: int = SAMPLE_RATE, fps: float = FPS) -> Speech:
    """``seconds`` of speech-like audio: phrases of syllables separated by pauses.

    Each phrase gets its own speaker pitch (85-250 Hz) and level (about -38 to -6 dBFS
    RMS), so the model sees voices quieter and louder than espeak's; pauses last 0.15-1.2 s
    and the whole clip sits on a noise floor between digital silence and -62 dBFS.
    """
    rng = np.random.default_rng(seed)
    total = int(seconds * sr)
    audio = np.zeros(total)
    width_track = np.ones(total)
    pos = int(sr * rng.uniform(0.2, 0.6))
    while pos < total:
        f0 = float(rng.uniform(85, 250))
        level = float(rng.uniform(-30, -6))
        tilt = float(rng.uniform(-0.9, 0.8))
        bright = float(rng.choice([0.0, rng.uniform(0.1, 0.7)]))
        for _ in range(int(rng.integers(1, 14))):
            syl_f0 = f0 * rng.uniform(0.9, 1.12)
            syl, mask, width = _syllable(rng, sr, syl_f0, level + rng.uniform(-8, 0), tilt, bright)
            end = min(total, pos + len(syl))
            audio[pos:end] += syl[: end - pos]
            width_track[pos:end] = 1.0 + (width - 1.0) * mask[: end - pos]
            pos = end + int(sr * rng.choice([0.0, rng.uniform(0.0, 0.08)], p=[0.6, 0.4]))
            f0 *= rng.uniform(0.95, 1.02)  # declination
            if pos >= total:
                break
        pos += int(sr * rng.uniform(0.15, 1.2))
    if rng.uniform() > 0.15:
        floor_db = rng.uniform(-90, -62)
        audio += rng.normal(0, 10 ** (floor_db / 20), total)
    audio = np.clip(audio, -1.0, 1.0).astype(np.float32)
    opening = opening_from_audio(audio, sr, fps)
    hop = int(round(sr / fps))
    mean_width = width_track[: len(opening) * hop].reshape(len(opening), hop).mean(axis=1)
    width_per_frame = np.where(opening > 0.05, mean_width, 1.0).astype(np.float32)
    return Speech(audio=audio, sr=sr, opening=opening, width=width_per_frame)
