"""shared/opts.py: request options typed, round-tripped through their maps, bad ones named."""

from __future__ import annotations

import pytest

from shared.errors import ErrorCode, ServiceError
from shared.opts import AdminOpts, InferOpts, VideoFrameOpts


@pytest.mark.parametrize(
    "opts",
    [
        InferOpts(),
        InferOpts(mode="crop", quality=70),
        InferOpts(mode="crop", audio_sr=16_000, stream="s1.0", stream_frame=12, audio_t0_ms=-320.0),
        VideoFrameOpts(),
        VideoFrameOpts("crops_328", 90),
        AdminOpts(workers="all"),
        AdminOpts(workers=2, reload=True),
        AdminOpts(worker="host:42"),
    ],
)
def test_round_trip(opts):
    assert type(opts).from_map(opts.to_map()) == opts


def test_absent_fields_stay_the_receivers_defaults():
    assert InferOpts(mode="crop").to_map() == {"mode": "crop"}  # quality: the worker's own
    assert InferOpts.from_map({}) == InferOpts()
    assert VideoFrameOpts.from_map({}).video_type == "full_body"


@pytest.mark.parametrize(
    ("cls", "opts", "message"),
    [
        (InferOpts, {"mode": "fullscreen"}, "mode must be crop or composite"),
        (InferOpts, {"quality": 0}, "quality must be an int in 1..100"),
        (InferOpts, {"quality": True}, "quality must be an int in 1..100"),
        (InferOpts, {"audio_sr": 4000}, "audio_sr must be an int in 8000..192000"),
        (InferOpts, {"stream": "x" * 129}, "stream must be a short string"),
        (InferOpts, {"audio_t0_ms": "soon", "stream_frame": 1}, "audio_t0_ms must be a number"),
        (InferOpts, {"audio_t0_ms": 0.0}, "stream_frame must be an int >= 0"),
        (InferOpts, {"audio_t0_ms": 0.0, "stream_frame": -1}, "stream_frame must be an int >= 0"),
        (VideoFrameOpts, {"video_type": 3}, "bad video_type or quality"),
        (AdminOpts, {"worker": 7}, "bad worker name"),
        (AdminOpts, {"workers": [1]}, "workers must be all, a count or a worker id"),
    ],
)
def test_bad_options_are_named(cls, opts, message):
    with pytest.raises(ServiceError) as err:
        cls.from_map(opts)
    assert err.value.code is ErrorCode.BAD_REQUEST and err.value.message == message
