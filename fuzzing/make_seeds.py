"""Write a seed corpus for ``fuzz_parsers.py``: one valid input of every kind for every
parser, so that libFuzzer starts from inside the formats instead of guessing them::

    python fuzzing/make_seeds.py fuzzing/corpus
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from shared import browser, envelope, streamproto


__all__ = ["main", "seeds"]

SEP = b"\xff\x00"  # fuzz_parsers._frames splits on it


def seeds() -> list[bytes]:
    """Inputs for ``fuzz_parsers.one_input``: target byte, then the target's input."""
    headers = [
        envelope.Request(id=7, op="infer", model="m", frame=3, opts={"mode": "crop"}),
        envelope.Reply(id=7, worker="w", timings={"inference": 1.5}, bounds=[1.0, 2, 3, 4]),
        envelope.Error(id=7, code="overloaded", message="full"),
        envelope.Cancel(id=7),
        envelope.Ready(worker="w", capacity=8, models={"m": {"frame_count": 100}}),
        envelope.Heartbeat(in_flight=2, stats={"served": 3}),
        envelope.Disconnect(reason="bye"),
    ]
    out = [b"\x00" + SEP.join(envelope.encode(h, [b"payload"])) for h in headers]
    out += [
        b"\x01" + browser.RequestA("sanders", 12).serialize(),
        b"\x01" + browser.RequestB("sanders", 12, bytes(64)).serialize(),
        b"\x02" + json.dumps({"type": "get_metadata", "model_name": "m"}).encode(),
        b"\x02" + json.dumps({"model_name": "m", "frame_id": 3, "audio_override": "AAAA"}).encode(),
        b"\x02" + json.dumps({"type": "hello", "version": 1, "mode_a": "crop"}).encode(),
        b"\x03" + browser.ResponseC(3, 12, b"\xff\xd8jpeg", (1, 2, 3, 4)).serialize(),
        b"\x03" + browser.ErrorResponseC(3, 12, "overloaded: full").serialize(),
        b"\x03" + browser.VideoFrameD(3, "full_body", b"\xff\xd8jpeg").serialize(),
        b"\x04" + streamproto.encode_audio_chunk(5, bytes(320)),
        b"\x04"
        + streamproto.encode_tagged_frame(
            streamproto.TaggedFrame(
                stream=5,
                seq=1,
                frame_id=2,
                audio_ms=40,
                flags=0,
                bounds=(1.0, 2.0, 3.0, 4.0),
                processing_us=100,
                worker="w",
                image=b"\xff\xd8",
            )
        ),
        b"\x05" + json.dumps({"type": "stream_start", "model_name": "m", "stream": 5}).encode(),
        b"\x05" + json.dumps({"type": "stream_stop", "stream": 5}).encode(),
    ]
    return out


def main() -> int:
    corpus = Path(sys.argv[1] if len(sys.argv) > 1 else "fuzzing/corpus")
    corpus.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(seeds()):
        (corpus / f"seed-{i:02d}").write_bytes(data)
    print(f"{len(seeds())} seeds in {corpus}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
