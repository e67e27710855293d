"""Model audio input: the 16-row window around a frame (zero rows outside the table, plain
memory fold), per-frame features of a clip, and layout-B windows from a request's PCM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers import mel as M
from workers.audio import AudioFeaturizer, audio_window, audio_windows, frames_in
from workers.audio_encoder import AudioEncoder


def numbered_features(m: int) -> np.ndarray:
    """Row r holds r + 1 in every column (so a zero row is recognisably padding)."""
    return np.repeat(np.arange(1, m + 1, dtype=np.float32)[:, None], 512, axis=1)


def rows_of(window: np.ndarray) -> list[float]:
    """Undo the fold and read back which feature row landed in each of the 16 slots."""
    flat = window.reshape(16, 512)
    assert np.all(flat == flat[:, :1])  # every row is one whole feature row, not a mix
    return [float(v) - 1 for v in flat[:, 0]]  # -1 marks a zero (padding) row


def test_window_at_frame_zero_pads_eight_rows_before():
    w = audio_window(numbered_features(30), 0)
    assert w.shape == (32, 16, 16) and w.dtype == np.float32
    assert rows_of(w) == [-1] * 8 + list(range(0, 8))


def test_window_in_the_middle():
    assert rows_of(audio_window(numbered_features(30), 12)) == list(range(4, 20))


def test_window_at_the_last_frame_pads_seven_rows_after():
    assert rows_of(audio_window(numbered_features(30), 29)) == list(range(21, 30)) + [-1] * 7


def test_window_is_a_plain_memory_fold():
    feats = np.random.default_rng(0).standard_normal((20, 512)).astype(np.float32)
    w = audio_window(feats, 10)
    # channel 2k holds the first half of row k, channel 2k+1 the second half
    np.testing.assert_array_equal(w[0].ravel(), feats[2, :256])
    np.testing.assert_array_equal(w[1].ravel(), feats[2, 256:])
    np.testing.assert_array_equal(w[16].ravel(), feats[10, :256])
    np.testing.assert_array_equal(w.reshape(-1), feats[2:18].reshape(-1))


def test_windows_stack_and_far_outside_is_all_zero():
    feats = numbered_features(5)
    ws = audio_windows(feats, [0, 4, 40])
    assert ws.shape == (3, 32, 16, 16)
    np.testing.assert_array_equal(ws[1], audio_window(feats, 4))
    assert not ws[2].any()
    with pytest.raises(ValueError, match="features must be"):
        audio_window(np.zeros((4, 256), np.float32), 0)


def test_frames_in():
    assert frames_in(10240) == 16  # 640 ms
    assert frames_in(16000) == 25
    assert frames_in(16001) == 26  # frame 25 starts inside the clip
    assert frames_in(0) == 0


@pytest.fixture(scope="module")
def featurizer() -> AudioFeaturizer:
    torch.manual_seed(0)
    return AudioFeaturizer(AudioEncoder(), "cpu", max_batch=7)


def tone_pcm(sr: int, seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    x = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.05 * rng.standard_normal(len(t))
    return (x * 32767).astype(np.int16)


def test_features_from_pcm_is_mel_windows_through_the_encoder(featurizer):
    pcm = tone_pcm(24000, 1.0, seed=1)
    feats = featurizer.features_from_pcm(pcm, 24000)
    assert feats.shape == (25, 512) and feats.dtype == np.float32
    assert feats.min() >= 0.0
    windows = M.mel_windows(M.melspectrogram(pcm, 24000), 25)
    with torch.inference_mode():
        want = featurizer.encoder(torch.from_numpy(windows).unsqueeze(1)).numpy()
    np.testing.assert_allclose(feats, want, atol=1e-5, rtol=1e-4)
    # rows differ: the chirp changes pitch, and chunking (max_batch=7) kept the order
    assert not np.allclose(feats[0], feats[20])
    assert featurizer.features_from_pcm(pcm, 24000, n_frames=30).shape == (30, 512)


def test_layout_b_window_uses_the_clips_16_frames(featurizer):
    pcm = tone_pcm(16000, 0.64, seed=2)
    w = featurizer.window_from_pcm(pcm.tobytes(), 16000)
    assert w.shape == (32, 16, 16)
    feats = featurizer.features_from_pcm(pcm, 16000)
    assert feats.shape == (16, 512)
    np.testing.assert_allclose(w.reshape(16, 512), feats, atol=1e-6)
    # the requested frame (clip frame 8) is row 8: the same slot audio_window(F, i) gives row i
    np.testing.assert_allclose(w, audio_window(feats, 8), atol=1e-6)


def test_layout_b_batch_equals_single_clips(featurizer):
    a, b = tone_pcm(24000, 0.64, seed=3), tone_pcm(48000, 0.64, seed=4)
    batch = featurizer.windows_from_pcm([a, b.tobytes()], [24000, 48000])
    assert batch.shape == (2, 32, 16, 16)
    np.testing.assert_allclose(batch[0], featurizer.window_from_pcm(a, 24000), atol=1e-5)
    np.testing.assert_allclose(batch[1], featurizer.window_from_pcm(b, 48000), atol=1e-5)
    assert not np.allclose(batch[0], batch[1])
    np.testing.assert_array_equal(featurizer.window_from_pcm([a, b], [24000, 48000]), batch)
    assert featurizer.windows_from_pcm([], 16000).shape == (0, 32, 16, 16)


def test_layout_b_rejects_bad_clips(featurizer):
    with pytest.raises(ValueError, match="empty"):
        featurizer.window_from_pcm(b"", 16000)
    with pytest.raises(ValueError, match="2 clips but 1 sample rates"):
        featurizer.windows_from_pcm([b"\0\0", b"\0\0"], [16000])
    with pytest.raises(ValueError, match="unsupported sample rate"):
        featurizer.window_from_pcm(b"\0\0" * 100, 8000)
