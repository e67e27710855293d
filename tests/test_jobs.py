"""workers.jobs: a request becomes a job, or a bad_request naming the option at fault (no
sockets: the I/O thread answers these at once, before any batch)."""

from __future__ import annotations

import pytest

from shared.envelope import Request
from shared.errors import ErrorCode, ServiceError
from workers.jobs import job_from_request


AUDIO = [b"\x00\x00" * 10]


def test_an_infer_request_becomes_a_job_due_after_its_ttl():
    h = Request(id=7, op="infer", model="m", frame=3, ttl_ms=250, opts={"mode": "crop"})
    job = job_from_request(h, AUDIO, now=100.0, session=2, jpeg_quality=85)
    assert (job.rid, job.op, job.model, job.frame, job.session) == (7, "infer", "m", 3, 2)
    assert (job.received, job.deadline) == (100.0, pytest.approx(100.25))
    item = job.item
    assert (item.frame_id, item.mode, item.quality, item.audio, item.tag) == (
        3,
        "crop",
        85,
        AUDIO[0],
        7,
    )
    assert item.audio_t0_ms is None


def test_a_stream_frame_says_where_its_clip_lies():
    opts = {"audio_t0_ms": -480, "stream": "s1", "stream_frame": 12, "quality": 60}
    h = Request(id=1, op="infer", model="m", frame=0, opts=opts)
    item = job_from_request(h, AUDIO, 0.0, 0, 85).item
    assert (item.audio_t0_ms, item.stream, item.stream_frame, item.quality) == (
        -480.0,
        "s1",
        12,
        60,
    )


def test_other_ops_carry_no_item():
    h = Request(id=1, op="video_frame", model="m", frame=2, opts={"video_type": "crops_328"})
    assert job_from_request(h, [], 0.0, 0, 85).item is None


@pytest.mark.parametrize(
    ("opts", "payload", "message"),
    [
        ({"mode": "half"}, AUDIO, "mode must be crop or composite"),
        ({"quality": 0}, AUDIO, "quality must be an int in 1..100"),
        ({"quality": True}, AUDIO, "quality must be an int in 1..100"),
        ({"audio_sr": 4000}, AUDIO, "audio_sr must be an int in 8000..192000"),
        ({"audio_t0_ms": 0, "stream_frame": 0}, [], "audio_t0_ms without audio"),
        ({"audio_t0_ms": "0", "stream_frame": 0}, AUDIO, "audio_t0_ms must be a number"),
        ({"audio_t0_ms": 0, "stream": 5, "stream_frame": 0}, AUDIO, "stream must be a short"),
        ({"audio_t0_ms": 0, "stream_frame": -1}, AUDIO, "stream_frame must be an int >= 0"),
        ({"audio_t0_ms": 0}, AUDIO, "stream_frame must be an int >= 0"),
    ],
)
def test_bad_options_are_named(opts, payload, message):
    h = Request(id=1, op="infer", model="m", frame=0, opts=opts)
    with pytest.raises(ServiceError) as err:
        job_from_request(h, payload, 0.0, 0, 85)
    assert err.value.code is ErrorCode.BAD_REQUEST
    assert err.value.message.startswith(message)
