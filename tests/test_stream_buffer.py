"""A stream's audio buffer (gateway/streams/audio.py): feed, slice, silence, trim, stop's
padding and arrival times. Sans-I/O: times are numbers the test passes."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.streams.audio import AudioBuffer


def pcm(values: list[int] | range) -> bytes:
    return np.asarray(list(values), dtype="<i2").tobytes()


def samples(data: bytes) -> list[int]:
    return np.frombuffer(data, dtype="<i2").tolist()


def test_feed_and_slice_with_zeros_before_the_first_sample():
    buf = AudioBuffer()
    buf.feed(pcm(range(1, 6)), now=1.0)
    buf.feed(pcm(range(6, 11)), now=2.0)
    assert (buf.base, buf.end, buf.held, buf.received) == (0, 10, 10, 10)
    assert samples(buf.slice(2, 5)) == [3, 4, 5]
    assert samples(buf.slice(-3, 2)) == [0, 0, 0, 1, 2]  # before the epoch: silence
    assert samples(buf.slice(8, 14)) == [9, 10]  # not held yet: what there is
    assert isinstance(buf.slice(0, 1), bytes)


def test_trim_forgets_the_past_and_keeps_indices():
    buf = AudioBuffer()
    buf.feed(pcm(range(100)), now=0.0)
    buf.trim(40)
    assert (buf.base, buf.held, buf.end) == (40, 60, 100)
    assert samples(buf.slice(40, 43)) == [40, 41, 42]
    buf.trim(30)  # behind what is kept: nothing
    assert buf.base == 40
    buf.trim(1000)  # past what is held: all of it, never more
    assert (buf.base, buf.held, buf.end) == (100, 0, 100)
    buf.feed(pcm([7, 8]), now=1.0)
    assert samples(buf.slice(100, 102)) == [7, 8]
    with pytest.raises(RuntimeError, match="trimmed too early"):
        buf.slice(99, 101)  # a bug in the caller, not input


def test_arrival_is_the_chunk_holding_the_last_sample():
    buf = AudioBuffer()
    buf.feed(pcm([1] * 10), now=1.0)  # samples 0..9
    buf.feed(pcm([1] * 10), now=2.0)  # 10..19
    buf.feed(pcm([1] * 10), now=3.0)  # 20..29
    assert buf.arrival(5) == 1.0
    assert buf.arrival(10) == 1.0  # sample 9
    assert buf.arrival(11) == 2.0
    assert buf.arrival(30) == 3.0
    assert buf.arrival(31) is None  # not arrived
    buf.pad(40)
    assert buf.end == 40 and buf.received == 30 and buf.padded_from == 30
    assert samples(buf.slice(28, 32)) == [1, 1, 0, 0]
    assert buf.arrival(30) == 3.0
    assert buf.arrival(31) is None  # padding: not audio the client sent


def test_pad_never_cuts_and_reset_starts_an_epoch():
    buf = AudioBuffer()
    buf.feed(pcm([5] * 10), now=1.0)
    buf.pad(4)
    assert buf.end == 10 and buf.padded_from == 10
    buf.reset()
    assert (buf.base, buf.end, buf.received, buf.padded_from) == (0, 0, 0, None)
    assert buf.arrival(1) is None
    buf.feed(pcm([3]), now=9.0)
    assert buf.arrival(1) == 9.0 and samples(buf.slice(0, 1)) == [3]


@pytest.mark.parametrize(("amplitude", "quiet"), [(0, True), (100, True), (200, False)])
def test_silence_is_an_rms_threshold(amplitude, quiet):
    """A sine of amplitude 100 has an RMS of about -53 dBFS, one of 200 about -47: one
    each side of a -50 dBFS threshold."""
    t = np.arange(1600)
    buf = AudioBuffer()
    buf.feed(pcm((amplitude * np.sin(t * 2 * np.pi * 200 / 16000)).astype(int)), now=0.0)
    assert buf.quieter_than(0, 1600, -50.0) is quiet
    assert buf.quieter_than(800, 800, -50.0)  # nothing is silence
    assert buf.quieter_than(-1600, 0, -50.0)  # before the epoch: zeros


def test_silence_looks_at_the_window_only():
    buf = AudioBuffer()
    buf.feed(bytes(2 * 1000) + pcm([10_000, -10_000] * 500), now=0.0)
    assert buf.quieter_than(0, 1000, -45.0)
    assert not buf.quieter_than(1000, 2000, -45.0)
    assert not buf.quieter_than(0, 2000, -45.0)
