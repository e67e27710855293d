"""How the compute and encode threads send through the I/O thread, which alone holds the
socket to the broker (ZeroMQ sockets are not thread-safe).

Messages go into one ``Mailbox`` (a deque: appends are atomic, and the frames, a JPEG
among them, are handed over by reference, never copied), and the sender rings the I/O
thread's inproc doorbell only when the mailbox may have been empty: one small wake-up
message per burst instead of a copy of every answer through an inproc socket. Each
entry says what it is:

- ``a``, session, frames: an answer to a request of that session. The I/O thread counts it
  off what it holds, or drops it when the session has ended (the broker that would
  understand it is gone).
- ``c``, 0, frames: a control message. Only READY, whose ``models`` are the worker's new
  set (after ``load_package`` or ``unload_package``); the I/O thread announces them with
  its own READY fields.

Order: what one thread puts goes out in that order; READY after the answers put before it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import zmq

from shared.envelope import Header, Ready, encode
from workers.backend import ModelInfo


__all__ = ["ANSWER", "CONTROL", "Mailbox", "Outbox", "model_map"]

ANSWER = "a"
CONTROL = "c"
_BELL = b""
_NOBLOCK = int(zmq.NOBLOCK)

Entry = tuple[str, int, list[Any]]


class Mailbox:
    """What the compute and encode threads have for the I/O thread, in order."""

    def __init__(self) -> None:
        self.entries: deque[Entry] = deque()
        self.rung = False  # a doorbell is on its way (cleared by the I/O thread first)


class Outbox:
    """One thread's way into the I/O thread's ``mailbox``, with its own PUSH end of the
    doorbell at ``address``."""

    def __init__(self, context: zmq.Context[Any], address: str, mailbox: Mailbox) -> None:
        self._sock: zmq.Socket[Any] = context.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)  # bounded by capacity, never block compute
        self._sock.connect(address)
        self._mailbox = mailbox

    def answer(self, session: int, header: Header, payload: Sequence[Any] = ()) -> None:
        self._put((ANSWER, session, encode(header, payload)))

    def models_changed(self, models: dict[str, ModelInfo]) -> None:
        """Tell the I/O thread to announce ``models`` (READY), after the answers sent
        before and before those sent after."""
        ready = Ready(worker="", capacity=0, models=model_map(models))
        self._put((CONTROL, 0, encode(ready)))

    def _put(self, entry: Entry) -> None:
        mailbox = self._mailbox
        mailbox.entries.append(entry)
        if not mailbox.rung:  # two threads may both ring: one wake-up too many, harmless
            mailbox.rung = True
            self._sock.send(_BELL, _NOBLOCK)

    def close(self) -> None:
        self._sock.close(linger=0)


def model_map(models: dict[str, ModelInfo]) -> dict[str, dict[str, Any]]:
    """Models as READY announces them."""
    return {name: info.to_map() for name, info in models.items()}
