"""Stream frames' audio input (workers/stream_audio.py): the window computed from the
gateway's clips equals a from-scratch computation over the whole stream, at every rate;
the (stream, row) cache encodes each row once and never changes a result; bad clips fail
alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from speechlike import speechlike

from shared.errors import ErrorCode, ServiceError
from shared.streamtime import SUPPORTED_RATES, clip_samples, clip_t0_ms, mel_start
from workers.audio import AudioFeaturizer, audio_window
from workers.audio_encoder import AudioEncoder
from workers.mel import SAMPLE_RATE, melspectrogram, resample_to_16k
from workers.stream_audio import StreamAudio, StreamClip, stream_audio_for


FPS = 25


@pytest.fixture(scope="module")
def featurizer() -> AudioFeaturizer:
    torch.manual_seed(0)
    return AudioFeaturizer(AudioEncoder().eval())


def cut(stream: np.ndarray, j: int, sr: int) -> bytes:
    """What the gateway sends for frame j: the clip, zeros before the stream's start."""
    start, end = clip_samples(j, FPS, sr)
    out = np.zeros(end - start, np.int16)
    lo, hi = max(start, 0), min(end, len(stream))
    out[lo - start : hi - start] = stream[lo:hi]
    return out.astype("<i2").tobytes()


def clip(stream: np.ndarray, j: int, sr: int, key: str | None = "s1") -> StreamClip:
    return StreamClip(cut(stream, j, sr), sr, clip_t0_ms(j, FPS, sr), j, key)


def interior_frames(stream: np.ndarray, sr: int) -> int:
    """How many frames from 0 have all 16 rows' mel windows inside the stream (unclamped)."""
    n16 = len(resample_to_16k(stream.astype(np.float32), sr))
    n_mel = 1 + n16 // 200
    j = 0
    while mel_start(j + 1 + 7, FPS) + 16 <= n_mel:
        j += 1
    return j


@pytest.mark.parametrize("sr", SUPPORTED_RATES)
def test_windows_equal_the_whole_stream_computation(featurizer, sr):
    seconds = 2.0 if sr == SAMPLE_RATE else 1.2  # the encoder is slow on a busy 2-core CPU
    stream = speechlike(seconds, sr, seed=sr, pauses=((0.5, 0.8),))
    table = featurizer.features_from_pcm(stream, sr, fps=FPS)
    frames = interior_frames(stream, sr)
    assert frames >= (35 if sr == SAMPLE_RATE else 15)
    audio = StreamAudio(featurizer, FPS)
    worst = 0.0
    for j in range(frames):
        (window,) = audio.windows([clip(stream, j, sr)])
        assert isinstance(window, np.ndarray) and window.shape == (32, 16, 16)
        expected = audio_window(table, j)
        worst = max(worst, float(np.max(np.abs(window - expected))))
    scale = float(np.max(np.abs(table)))
    print(f"sr {sr}: {frames} frames, max |diff| {worst:.2e} (features up to {scale:.2f})")
    assert worst <= 1e-4 * max(scale, 1.0)
    # the early frames' rows of frames < 0 are zero rows, as SyncTalk pads
    (first,) = StreamAudio(featurizer, FPS).windows([clip(stream, 0, sr, None)])
    assert not first.reshape(16, 512)[:8].any() and first.reshape(16, 512)[8:].any()


def test_mel_of_a_clip_matches_the_stream_mel():
    """The front end alone, exactly: no encoder in the way."""
    stream = speechlike(2.0, 16000, seed=3)
    whole = melspectrogram(stream, 16000)
    for j in (0, 9, 20, 33):
        start, _ = clip_samples(j, FPS, 16000)
        pcm = np.frombuffer(cut(stream, j, 16000), "<i2")
        local = melspectrogram(pcm, 16000)
        s = mel_start(j + 3, FPS)
        np.testing.assert_allclose(
            local[:, s - start // 200 : s - start // 200 + 16], whole[:, s : s + 16], atol=1e-5
        )


def test_cache_encodes_each_row_once_and_changes_nothing(featurizer):
    stream = speechlike(2.0, SAMPLE_RATE, seed=1)
    cached = StreamAudio(featurizer, FPS)
    n = 16
    out = [cached.windows([clip(stream, j, SAMPLE_RATE)])[0] for j in range(n)]
    assert cached.encoded == n + 7  # rows 0 .. n+6, each once
    assert cached.reused == sum(min(j + 8, 16) - 1 for j in range(1, n))
    fresh = StreamAudio(featurizer, FPS, cache_rows=0)
    for j in (3, n - 1):
        (b,) = fresh.windows([clip(stream, j, SAMPLE_RATE)])
        np.testing.assert_allclose(out[j], b, atol=1e-5)
    assert fresh.encoded == 11 + 16 and len(fresh) == 0


def test_one_batch_encodes_shared_rows_once(featurizer):
    stream = speechlike(1.5, SAMPLE_RATE, seed=2)
    audio = StreamAudio(featurizer, FPS)
    clips = [clip(stream, j, SAMPLE_RATE) for j in (10, 11, 12)]
    out = audio.windows(clips)
    assert audio.encoded == 3 + 15  # rows 2..19
    reference = StreamAudio(featurizer, FPS, cache_rows=0).windows(clips)
    for a, b in zip(out, reference, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_cache_is_bounded_and_keyed_by_stream(featurizer):
    loud = speechlike(1.5, SAMPLE_RATE, seed=4)
    other = speechlike(1.5, SAMPLE_RATE, seed=5)
    audio = StreamAudio(featurizer, FPS, cache_rows=20)
    for j in range(4):
        audio.windows([clip(loud, j, SAMPLE_RATE, "a")])
    assert len(audio) == 11 and audio.encoded == 11
    (b,) = audio.windows([clip(other, 3, SAMPLE_RATE, "b")])  # same rows, another stream
    assert audio.encoded == 22  # no reuse across streams
    (b_ref,) = StreamAudio(featurizer, FPS).windows([clip(other, 3, SAMPLE_RATE, None)])
    np.testing.assert_allclose(b, b_ref, atol=1e-5)
    assert len(audio) == 20  # bounded: the oldest rows of "a" went
    (a,) = audio.windows([clip(loud, 3, SAMPLE_RATE, "a")])
    assert audio.encoded == 22 + 2  # rows 0 and 1 of "a" were evicted: encoded again


def test_bad_clips_fail_alone(featurizer):
    stream = speechlike(1.5, SAMPLE_RATE, seed=6)
    good = clip(stream, 12, SAMPLE_RATE)
    short = StreamClip(cut(stream, 12, SAMPLE_RATE)[:-400], SAMPLE_RATE, good.t0_ms, 12, "x")
    odd = StreamClip(b"\x00" * 3, SAMPLE_RATE, good.t0_ms, 12, None)
    off_grid = StreamClip(good.pcm, SAMPLE_RATE, good.t0_ms + 1.0, 12, None)
    rate = StreamClip(good.pcm, 22050, good.t0_ms, 12, None)
    t0 = StreamClip(good.pcm, SAMPLE_RATE, float("nan"), 12, None)
    frame = StreamClip(good.pcm, SAMPLE_RATE, good.t0_ms, -1, None)
    out = StreamAudio(featurizer, FPS).windows([short, good, odd, off_grid, rate, t0, frame])
    assert isinstance(out[1], np.ndarray)
    messages = {
        0: "too short",
        2: "odd number",
        3: "grid",
        4: "rate",
        5: "audio_t0_ms",
        6: "stream frame",
    }
    for i, text in messages.items():
        assert isinstance(out[i], ServiceError), i
        assert out[i].code == ErrorCode.BAD_REQUEST and text in out[i].message, out[i]


def test_one_stream_audio_per_featurizer(featurizer):
    a = stream_audio_for(featurizer, 25.0)
    assert stream_audio_for(featurizer, 25.0) is a
    assert stream_audio_for(featurizer, 30.0) is not a


def test_engine_serves_stream_frames_through_the_row_cache(tiny_package):
    """The engine hook: stream items use these windows (cached rows, per-item errors), and
    a cold worker renders the same pixels as a warm one."""
    from workers.backend import InferItem
    from workers.engine import TorchBackend

    stream = speechlike(1.5, SAMPLE_RATE, seed=7)

    def item(j: int, key: str | None, t0: float | None = None) -> InferItem:
        return InferItem(
            frame_id=j % 16,
            mode="crop",
            audio=cut(stream, j, SAMPLE_RATE),
            audio_sr=SAMPLE_RATE,
            audio_t0_ms=clip_t0_ms(j, FPS, SAMPLE_RATE) if t0 is None else t0,
            stream=key,
            stream_frame=j,
        )

    warm = TorchBackend(tiny_package, device="cpu", max_batch=4)
    warm.load("tiny")
    for j in range(10, 13):
        assert warm.render(warm.forward("tiny", [item(j, "k")]))[0].shape[2] == 3
    featurizer = warm._models["tiny"].featurizer
    assert featurizer is not None and stream_audio_for(featurizer, 25.0).encoded == 16 + 2
    bad = item(14, "k", t0=clip_t0_ms(14, FPS, SAMPLE_RATE) + 1.0)
    warm_out = warm.render(warm.forward("tiny", [item(13, "k"), bad]))
    assert isinstance(warm_out[1], ServiceError) and warm_out[1].code == ErrorCode.BAD_REQUEST
    cold = TorchBackend(tiny_package, device="cpu", max_batch=4)
    cold.load("tiny")
    (cold_out,) = cold.render(cold.forward("tiny", [item(13, None)]))
    assert isinstance(warm_out[0], np.ndarray) and isinstance(cold_out, np.ndarray)
    assert np.abs(warm_out[0].astype(int) - cold_out.astype(int)).max() <= 1
    warm.close()
    cold.close()


def test_several_frames_from_one_clip_equal_one_clip_each(tiny_package):
    """A stream request for frames j..j+3 (one clip, ``InferOpts.more_frames``), expanded
    by the worker (``workers.jobs.further_items``), renders what four requests of one
    frame each render (within a grey level: batch rounding)."""
    from shared.envelope import Request
    from shared.opts import InferOpts
    from shared.streamtime import clip_samples
    from workers.backend import InferItem
    from workers.engine import TorchBackend
    from workers.jobs import job_from_request

    stream = speechlike(1.5, SAMPLE_RATE, seed=3)
    j, n = 11, 4
    start, _ = clip_samples(j, FPS, SAMPLE_RATE)
    _, end = clip_samples(j + n - 1, FPS, SAMPLE_RATE)
    clip = stream[start:end].astype("<i2").tobytes()
    frame_ids = [(j + i) % 16 for i in range(n)]
    opts = InferOpts(
        mode="crop",
        audio_sr=SAMPLE_RATE,
        stream="g",
        stream_frame=j,
        audio_t0_ms=clip_t0_ms(j, FPS, SAMPLE_RATE),
        more_frames=tuple(frame_ids[1:]),
    )
    request = Request(id=1, op="infer", model="tiny", frame=frame_ids[0], opts=opts.to_map())
    job = job_from_request(request, [clip], 0.0, 0, 85, fps=FPS)
    assert [it.stream_frame for it in job.items] == [j, j + 1, j + 2, j + 3]
    assert [it.frame_id for it in job.items] == frame_ids

    def single(k: int) -> InferItem:
        return InferItem(
            frame_id=(j + k) % 16,
            mode="crop",
            audio=cut(stream, j + k, SAMPLE_RATE),
            audio_sr=SAMPLE_RATE,
            audio_t0_ms=clip_t0_ms(j + k, FPS, SAMPLE_RATE),
            stream=None,
            stream_frame=j + k,
        )

    backend = TorchBackend(tiny_package, device="cpu", max_batch=4)
    backend.load("tiny")
    try:
        grouped = backend.render(backend.forward("tiny", job.items))
        alone = [backend.render(backend.forward("tiny", [single(k)]))[0] for k in range(n)]
    finally:
        backend.close()
    for g, a in zip(grouped, alone, strict=True):
        assert isinstance(g, np.ndarray) and isinstance(a, np.ndarray)
        assert np.abs(g.astype(int) - a.astype(int)).max() <= 1
