"""Multipart send and receive on ZeroMQ sockets, without pyzmq's per-call conveniences:
the two calls every process makes on the sockets it owns (this module owns none, and runs
no loop).

At the broker's ceiling its own Python is a small part of a request's cost; ZeroMQ calls
are most of the rest, and of those a good share is pyzmq's sugar around them, paid per
frame: ``send_multipart`` type-checks every part and ORs ``SNDMORE`` into the flags with
the ``Flag`` enum's ``__or__`` (about a microsecond a frame), ``recv_multipart`` asks the
socket for ``RCVMORE`` after every part. A request and its reply cross the broker as about
a dozen frames. Here the flags are plain ints computed once, frames are sent with the
Cython ``send`` directly, and a multipart message is read by following each frame's
``more``. Frames are received without copying (``zmq.Frame``); a bytes-like part is sent
as is (pyzmq copies small ones anyway, below its copy threshold, and passes large ones
through).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zmq
import zmq.backend


__all__ = ["recv_parts", "send_parts"]

_MORE = int(zmq.SNDMORE) | int(zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)
_send = zmq.backend.Socket.send
_recv = zmq.backend.Socket.recv


def send_parts(sock: zmq.Socket[Any], parts: Sequence[Any]) -> None:
    """Send ``parts`` as one message without blocking. Raises ``zmq.ZMQError`` (EAGAIN
    when the peer is not reading, EHOSTUNREACH for an unknown ROUTER identity) before any
    part is queued: ZeroMQ takes the whole message or none of it."""
    last = len(parts) - 1
    for i, part in enumerate(parts):
        _send(sock, part, _MORE if i < last else _LAST, False)


def recv_parts(sock: zmq.Socket[Any]) -> list[zmq.Frame]:
    """One whole message as frames, without blocking. Raises ``zmq.Again`` when none is
    waiting (the rest of a message is always there once its first frame is)."""
    frame: zmq.Frame = _recv(sock, _LAST, False)
    parts = [frame]
    while frame.more:
        frame = _recv(sock, 0, False)
        parts.append(frame)
    return parts
