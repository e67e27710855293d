"""How the compute and encode threads send through the I/O thread, which alone holds the
socket to the broker (ZeroMQ sockets are not thread-safe).

Each sending thread has its own PUSH socket to the I/O thread's inproc PULL. The first
frame of each message says what it is, the rest is the envelope to forward:

- ``a`` + session (8 bytes, big-endian): an answer to a request of that session. The I/O
  thread counts it off what it holds, or drops it when the session has ended (the broker
  that would understand it is gone).
- ``c``: a control message. Only READY, whose ``models`` are the worker's new set (after
  ``load_package`` or ``unload_package``); the I/O thread announces them with its own
  READY fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zmq

from shared.envelope import Header, Ready, encode
from workers.backend import ModelInfo


__all__ = ["ANSWER", "CONTROL", "Outbox", "model_map"]

ANSWER = b"a"
CONTROL = b"c"


class Outbox:
    """One thread's PUSH end of the I/O thread's inproc PULL at ``address``."""

    def __init__(self, context: zmq.Context[Any], address: str) -> None:
        self._sock: zmq.Socket[Any] = context.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)  # bounded by capacity, never block compute
        self._sock.connect(address)

    def answer(self, session: int, header: Header, payload: Sequence[Any] = ()) -> None:
        self._sock.send_multipart(
            [ANSWER + session.to_bytes(8, "big"), *encode(header, payload)], copy=False
        )

    def models_changed(self, models: dict[str, ModelInfo]) -> None:
        """Tell the I/O thread to announce ``models`` (READY), after the answers sent
        before and before those sent after."""
        ready = Ready(worker="", capacity=0, models=model_map(models))
        self._sock.send_multipart([CONTROL, *encode(ready)])

    def close(self) -> None:
        self._sock.close(linger=0)


def model_map(models: dict[str, ModelInfo]) -> dict[str, dict[str, Any]]:
    """Models as READY announces them."""
    return {name: info.to_map() for name, info in models.items()}
