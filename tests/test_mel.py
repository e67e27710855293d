"""The numpy mel front end against a librosa-based reference (Wav2Lip's ``audio.py`` written
out again here), at 16 kHz and after resampling, plus the per-frame window indices."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal

from workers import mel as M


librosa = pytest.importorskip("librosa", reason="librosa is the reference implementation")


def librosa_mel(y16: np.ndarray) -> np.ndarray:
    """Wav2Lip / SyncTalk ``melspectrogram``: librosa defaults for window and padding."""
    y = scipy.signal.lfilter([1, -0.97], [1], y16)
    spec = np.abs(librosa.stft(y=y, n_fft=800, hop_length=200, win_length=800))
    basis = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    s = 20 * np.log10(np.maximum(1e-5, basis @ spec)) - 20
    return np.clip(8 * (s + 100) / 100 - 4, -4, 4)


def speech_like(sr: int, seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    """int16 'speech': glottal pulses through three formant resonators per vowel, a pause
    with faint noise, a fricative noise burst, syllable envelopes, a wandering pitch."""
    rng = np.random.default_rng(seed)
    n = int(sr * seconds)
    t = np.arange(n) / sr
    phase = np.cumsum((120 + 30 * np.sin(2 * np.pi * 1.5 * t)) / sr)
    pulses = (np.diff(np.floor(phase), prepend=0) > 0).astype(np.float64)
    vowels = [(700, 1220, 2600), (300, 2300, 3000), (500, 900, 2500)]
    seg = n // 6
    x = 1e-4 * rng.standard_normal(n)
    for k in range(6):
        part = slice(k * seg, (k + 1) * seg)
        if k == 2:  # pause
            continue
        if k == 4:  # fricative
            b, a = scipy.signal.butter(4, [3000, 6000], btype="band", fs=sr)
            x[part] += 0.05 * scipy.signal.lfilter(b, a, rng.standard_normal(seg))
            continue
        y = pulses[part]
        for f in vowels[k % 3]:
            r = np.exp(-np.pi * 80 / sr)
            y = scipy.signal.lfilter([1 - r], [1, -2 * r * np.cos(2 * np.pi * f / sr), r * r], y)
        x[part] += y * np.sin(np.pi * np.arange(seg) / seg) ** 0.5
    x = 0.7 * x / np.abs(x).max()
    return (x * 32767).astype(np.int16)


def test_filterbank_matches_librosa():
    want = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    got = M.mel_filterbank()
    assert got.shape == (80, 401)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)


def test_speech_at_16k_matches_librosa():
    pcm = speech_like(16000)
    got = M.melspectrogram(pcm, 16000)
    want = librosa_mel(pcm.astype(np.float32) / 32768)
    assert got.shape == want.shape == (80, 1 + len(pcm) // 200)
    assert got.dtype == np.float32
    assert want.max() > 0.0 and want.min() == -4.0  # the signal spans loud and silent
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)


def test_bytes_and_array_agree():
    pcm = speech_like(16000, seconds=0.5)
    np.testing.assert_array_equal(
        M.melspectrogram(pcm.astype("<i2").tobytes(), 16000), M.melspectrogram(pcm, 16000)
    )


@pytest.mark.parametrize("n", [0, 150, 16000])
def test_silence_is_minus_four(n):
    silence = np.zeros(n, dtype=np.int16)
    got = M.melspectrogram(silence, 16000)
    assert got.shape == (80, 1 + n // 200)
    assert np.all(got == -4.0)
    if n >= 800:
        np.testing.assert_allclose(got, librosa_mel(silence.astype(np.float32)), atol=1e-3)


@pytest.mark.parametrize("sr", [24000, 44100, 48000])
def test_resampled_speech_matches_librosa_on_the_same_signal(sr):
    pcm = speech_like(sr)
    y16 = M.resample_to_16k(M.pcm_to_float(pcm), sr)
    assert len(y16) == 32000
    got = M.melspectrogram(pcm, sr)
    np.testing.assert_allclose(got, librosa_mel(y16), atol=1e-3, rtol=0)


@pytest.mark.parametrize("sr", [24000, 48000])
def test_resampler_is_close_to_the_usual_ones(sr):
    x = M.pcm_to_float(speech_like(sr))
    ours = M.resample_to_16k(x, sr)
    soxr = librosa.resample(x, orig_sr=sr, target_sr=16000)  # what librosa.load uses
    fft = scipy.signal.resample(x.astype(np.float64), len(ours))
    assert len(soxr) == len(ours)
    # loose: different low-pass filters, same band-limited signal
    assert np.abs(ours - soxr).max() < 0.02
    assert np.abs(ours - fft).max() < 0.02
    mel_diff = np.abs(librosa_mel(soxr) - M.melspectrogram(ours, 16000))
    assert mel_diff.mean() < 0.01


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="unsupported sample rate 22050"):
        M.melspectrogram(np.zeros(100, np.int16), 22050)
    with pytest.raises(ValueError, match="odd number of bytes"):
        M.pcm_to_float(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="mono"):
        M.pcm_to_float(np.zeros((2, 10), np.int16))


def test_mel_window_indices():
    mel = np.tile(np.arange(161, dtype=np.float32), (80, 1))  # column t holds t: 2 s of audio
    first = lambda w: int(w[0, 0])  # noqa: E731
    assert first(M.mel_window(mel, 0)) == 0
    assert first(M.mel_window(mel, 10)) == 32
    assert first(M.mel_window(mel, 24)) == 76  # int(80 * 24 / 25) = int(76.8)
    last = M.mel_window(mel, 49)  # int(156.8) + 16 > 161: shifted back to end at the last frame
    assert first(last) == 145 and int(last[0, -1]) == 160
    for j in (0, 10, 24, 49):
        w = M.mel_window(mel, j)
        assert w.shape == (80, 16) and w.dtype == np.float32
        np.testing.assert_array_equal(w[0], np.arange(first(w), first(w) + 16))
    stacked = M.mel_windows(mel, 50)
    assert stacked.shape == (50, 80, 16)
    np.testing.assert_array_equal(stacked[24], M.mel_window(mel, 24))


def test_mel_window_of_a_short_clip_is_padded_with_silence():
    mel = np.zeros((80, 5), dtype=np.float32)
    w = M.mel_window(mel, 0)
    assert w.shape == (80, 16)
    assert np.all(w[:, :5] == 0) and np.all(w[:, 5:] == -4)
