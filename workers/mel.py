"""The AVE mel front end (Wav2Lip / SyncTalk_2D), in numpy + scipy only.

Why not librosa: it pulls numba and a JIT warm-up into every worker for a few lines of
arithmetic. The numbers must still be librosa's, because the audio encoder was trained on
them: ``tests/test_mel.py`` compares against ``librosa.stft`` / ``librosa.filters.mel``
to 1e-3.

Pipeline (``reference/model_facts.md``): int16 → float (/32768) → 16 kHz → pre-emphasis
0.97 → STFT (n_fft 800, hop 200, periodic Hann 800, centred) → magnitude → 80 Slaney mel
bands 55-7600 Hz (Slaney norm) → ``20·log10(max(1e-5, m)) − 20`` →
``clip(8·(S + 100)/100 − 4, −4, 4)``. 80 mel frames per second.

Centring pads ``n_fft/2`` zeros on each side: librosa 0.10+ (``pad_mode="constant"``). The
librosa that SyncTalk_2D's authors used (< 0.10) reflected instead; that changes only the
first and last two frames of a clip.

Resampling uses ``scipy.signal.resample_poly`` (exact rational ratios); SyncTalk's
``librosa.load`` uses soxr. Both are good low-pass resamplers; they differ slightly near
Nyquist, which matters far less than the 1e-3 the mel itself is held to.
"""

from __future__ import annotations

import functools
from math import gcd

import numpy as np
from scipy.signal import resample_poly


__all__ = [
    "FPS",
    "HOP",
    "MEL_FPS",
    "N_FFT",
    "N_MELS",
    "SAMPLE_RATE",
    "SUPPORTED_RATES",
    "WINDOW_STEPS",
    "mel_filterbank",
    "mel_window",
    "mel_windows",
    "melspectrogram",
    "pcm_to_float",
    "resample_to_16k",
    "window_start",
]

SAMPLE_RATE = 16_000
SUPPORTED_RATES = (16_000, 24_000, 44_100, 48_000)
N_FFT = 800
HOP = 200
N_MELS = 80
FMIN = 55.0
FMAX = 7600.0
PREEMPHASIS = 0.97
MIN_LEVEL_DB = -100.0
REF_LEVEL_DB = 20.0
MAX_ABS = 4.0
MEL_FPS = SAMPLE_RATE // HOP  # 80 mel frames per second
FPS = 25
WINDOW_STEPS = 16  # mel frames per encoder window (0.2 s)


def pcm_to_float(pcm: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """int16 LE mono PCM (bytes or an int16 array) → float32 in [-1, 1).

    A float array passes through (as float32), so callers may hand in either.
    """
    if isinstance(pcm, bytes | bytearray | memoryview):
        if len(pcm) % 2:
            raise ValueError(f"pcm has an odd number of bytes ({len(pcm)}): not int16")
        return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    arr = np.asarray(pcm)
    if arr.ndim != 1:
        raise ValueError(f"pcm must be mono (1-d), not shape {arr.shape}")
    if arr.dtype == np.int16:
        return arr.astype(np.float32) / 32768.0
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float32, copy=False)
    raise ValueError(f"pcm must be int16 or float, not {arr.dtype}")


def resample_to_16k(audio: np.ndarray, sr: int) -> np.ndarray:
    """Float audio at ``sr`` (16, 24, 44.1 or 48 kHz) → float32 at 16 kHz."""
    if sr not in SUPPORTED_RATES:
        raise ValueError(f"unsupported sample rate {sr} (supported: {list(SUPPORTED_RATES)})")
    if sr == SAMPLE_RATE:
        return np.asarray(audio, dtype=np.float32)
    g = gcd(SAMPLE_RATE, sr)
    out = resample_poly(np.asarray(audio, dtype=np.float64), SAMPLE_RATE // g, sr // g)
    return out.astype(np.float32)


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above (librosa ``htk=False``)."""
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    mel = f / f_sp
    above = f >= min_log_hz
    mel[above] = min_log_mel + np.log(f[above] / min_log_hz) / logstep
    return mel


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    f = f_sp * m
    above = m >= min_log_mel
    f[above] = min_log_hz * np.exp(logstep * (m[above] - min_log_mel))
    return f


@functools.cache
def mel_filterbank() -> np.ndarray:
    """``[80, 401]`` triangular Slaney filters, Slaney-normalised (constant energy per band).

    Cached and read-only: it is the same matrix for every clip.
    """
    fft_freqs = np.linspace(0.0, SAMPLE_RATE / 2, 1 + N_FFT // 2)
    lo, hi = _hz_to_mel(np.array([FMIN, FMAX]))
    mel_pts = np.linspace(lo, hi, N_MELS + 2)
    hz_pts = _mel_to_hz(mel_pts)
    fdiff = np.diff(hz_pts)
    ramps = hz_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (hz_pts[2:] - hz_pts[:-2]))[:, None]
    weights.setflags(write=False)
    return weights


@functools.cache
def _window() -> np.ndarray:
    """Periodic Hann of length n_fft (scipy ``get_window("hann", N)``, as librosa uses)."""
    n = np.arange(N_FFT)
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / N_FFT)
    w.setflags(write=False)
    return w


def _stft_magnitude(y: np.ndarray) -> np.ndarray:
    """``|STFT|`` as ``[401, 1 + len(y) // hop]``, centred with zero padding."""
    pad = N_FFT // 2
    padded = np.pad(y.astype(np.float64), (pad, pad), mode="constant")
    n_frames = 1 + (len(padded) - N_FFT) // HOP
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP][:n_frames]
    return np.abs(np.fft.rfft(frames * _window(), axis=1)).T


def melspectrogram(
    audio: bytes | bytearray | memoryview | np.ndarray, sr: int = SAMPLE_RATE
) -> np.ndarray:
    """PCM (int16 bytes/array, or float) at ``sr`` → normalised log-mel ``[80, T]`` float32.

    ``T = 1 + n16 // 200`` where ``n16`` is the number of samples at 16 kHz; values lie in
    [-4, 4], with -4 for digital silence.
    """
    y = resample_to_16k(pcm_to_float(audio), sr).astype(np.float64)
    if len(y):
        y[1:] -= PREEMPHASIS * y[:-1].copy()
    mag = _stft_magnitude(y)
    mel = mel_filterbank() @ mag
    min_level = 10.0 ** (MIN_LEVEL_DB / 20.0)
    s = 20.0 * np.log10(np.maximum(min_level, mel)) - REF_LEVEL_DB
    s = 2 * MAX_ABS * (s - MIN_LEVEL_DB) / -MIN_LEVEL_DB - MAX_ABS
    return np.clip(s, -MAX_ABS, MAX_ABS).astype(np.float32)


def window_start(j: int, fps: float = FPS) -> int:
    """First mel frame of video frame ``j``'s window, before clamping (SyncTalk's formula)."""
    return int(80.0 * (j / float(fps)))


def mel_window(mel: np.ndarray, j: int, fps: float = FPS) -> np.ndarray:
    """Video frame ``j``'s encoder input: mel frames ``[int(80·j/fps), +16)`` → ``[80, 16]``.

    A window that would run past the end is shifted back to end at the last mel frame (as
    SyncTalk's dataset does). A mel shorter than 16 frames is padded at the end with -4
    (the normalised value of silence).
    """
    if j < 0:
        raise ValueError(f"frame index must be >= 0, not {j}")
    n = mel.shape[1]
    if n < WINDOW_STEPS:
        out = np.full((mel.shape[0], WINDOW_STEPS), -MAX_ABS, dtype=np.float32)
        out[:, :n] = mel
        return out
    start = min(window_start(j, fps), n - WINDOW_STEPS)
    return np.ascontiguousarray(mel[:, start : start + WINDOW_STEPS], dtype=np.float32)


def mel_windows(mel: np.ndarray, n_frames: int, fps: float = FPS) -> np.ndarray:
    """Windows of video frames ``0 .. n_frames-1`` stacked: ``[n_frames, 80, 16]``."""
    if n_frames <= 0:
        return np.zeros((0, mel.shape[0], WINDOW_STEPS), dtype=np.float32)
    return np.stack([mel_window(mel, j, fps) for j in range(n_frames)])
