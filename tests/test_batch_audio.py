"""A batch's audio input built on the device (workers/batch_audio.py): one encoder call
for layout B and stream items together, each window equal to its own computation."""

from __future__ import annotations

import numpy as np
import torch

from shared.errors import ErrorCode, ServiceError
from shared.streamtime import clip_samples, clip_t0_ms
from workers.audio import AudioFeaturizer, audio_window
from workers.audio_encoder import AudioEncoder
from workers.backend import InferItem
from workers.batch_audio import batch_windows, feature_table
from workers.stream_audio import StreamAudio, StreamClip


class CountingFeaturizer(AudioFeaturizer):
    """An AudioFeaturizer that counts its encoder calls (the real encoder runs)."""

    calls: list[int]

    def encode_tensor(self, windows: np.ndarray) -> torch.Tensor:
        self.calls.append(len(windows))
        return super().encode_tensor(windows)


def pcm(seed: int, seconds: float, sr: int = 16000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    y = 0.3 * np.sin(2 * np.pi * (120 + 40 * seed) * t) + 0.02 * rng.standard_normal(len(t))
    return (y * 32767).astype("<i2")


def test_one_encoder_call_for_the_batch_and_windows_as_computed_alone():
    torch.manual_seed(0)
    featurizer = CountingFeaturizer(AudioEncoder())
    featurizer.calls = []
    features = np.random.default_rng(1).random((20, 512), dtype=np.float32)
    stream = pcm(3, 3.0)

    def stream_item(j: int) -> InferItem:
        start, end = clip_samples(j, 25.0, 16000)
        return InferItem(
            frame_id=j % 20,
            audio=stream[start:end].tobytes(),
            audio_sr=16000,
            audio_t0_ms=clip_t0_ms(j, 25.0, 16000),
            stream="s",
            stream_frame=j,
        )

    b1, b2 = pcm(1, 0.64).tobytes(), pcm(2, 0.64, 24000).tobytes()
    items = [
        InferItem(frame_id=0),  # package audio, rows below the table are zeros
        InferItem(frame_id=4, audio=b1, audio_sr=16000),
        stream_item(30),
        InferItem(frame_id=4, audio=b"", audio_sr=16000),  # a bad clip: fails alone
        InferItem(frame_id=19),  # package audio, rows past the table's end are zeros
        InferItem(frame_id=7, audio=b2, audio_sr=24000),
        stream_item(31),
    ]
    errors: list[BaseException | None] = [None] * len(items)
    table = feature_table(features, torch.device("cpu"))
    windows, ok = batch_windows(featurizer, 25.0, table, items, list(range(7)), errors)
    assert ok == [0, 1, 2, 4, 5, 6]
    assert isinstance(errors[3], ServiceError) and errors[3].code == ErrorCode.BAD_REQUEST
    assert featurizer.calls == [16 + 16 + 16 + 1]  # 2 layout B clips, frame 30's rows, 31's new one
    got = dict(zip(ok, windows.numpy(), strict=True))

    assert np.array_equal(got[0], audio_window(features, 0))
    assert np.array_equal(got[4], audio_window(features, 19))
    reference = AudioFeaturizer(featurizer.encoder)  # the same weights, prepared already
    alone_b = reference.windows_from_pcm([b1, b2], [16000, 24000])
    assert np.allclose(got[1], alone_b[0], atol=1e-5)
    assert np.allclose(got[5], alone_b[1], atol=1e-5)
    fresh = StreamAudio(reference, 25.0, cache_rows=0)
    for k, j in ((2, 30), (6, 31)):
        item = items[k]
        assert item.audio is not None and item.audio_t0_ms is not None
        (want,) = fresh.windows([StreamClip(item.audio, 16000, item.audio_t0_ms, j, None)])
        assert isinstance(want, np.ndarray)
        assert np.allclose(got[k], want, atol=1e-5), k
