"""Exactly-once bookkeeping for fault runs: WebSocket clients that account for every request.

Rule 1 (DESIGN.md section 3) says every accepted request gets exactly one answer. To check
it from the outside, each client sends layout B requests whose frame ids are all different
(a connection never reuses one), so every layout C answer names the one request it belongs
to. A second answer for the same id is a **duplicate**; an answer for an id never sent (or
no longer outstanding because its connection was replaced) is **unexpected**; a request
still outstanding when the client gives up waiting is **lost**. A connection that dies
(the gateway was killed) turns its outstanding requests into ``connection_closed``: the
client saw a clear failure, nothing was silently lost.

Used by the fault suite (``tests/test_faults_*.py``) and ``lipsync bench --soak``. The null
backend serves frame ids up to a package's ``frame_count``, so fault runs use a package
whose ``package_info.json`` claims a huge count (:func:`write_null_package`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from shared.browser import (
    ErrorResponseC,
    ProtocolError,
    RequestB,
    ResponseC,
    parse_inference_response,
)
from shared.errors import ErrorCode


__all__ = [
    "ABANDONED",
    "CLOSED",
    "LOST",
    "Ledger",
    "LedgerClient",
    "Outcome",
    "error_kind",
    "write_null_package",
]

CLOSED = "connection_closed"  # outstanding when the connection died: a clear failure
LOST = "lost"  # outstanding on a live connection when the client stopped waiting
ABANDONED = "abandoned"  # outstanding when the client itself dropped the connection
_CODES = frozenset(c.value for c in ErrorCode)
_U32 = (1 << 32) - 1


def error_kind(text: str) -> str:
    """The wire code of an error text (``code: message``, docs/protocol.md section 6)."""
    code = text.split(":", 1)[0].strip()
    return code if code in _CODES else "other"


def write_null_package(models_dir: Path, name: str, frames: int = 2**31 - 1) -> Path:
    """A package directory the null backend serves as ``name`` with ``frames`` frames: only
    ``package_info.json`` (the null backend reads nothing else). Returns the models dir.
    The default is every frame id a request can carry (an int32)."""
    pkg = models_dir / name
    pkg.mkdir(parents=True, exist_ok=True)
    info = {
        "package_version": "2.0",
        "dataset_name": name,
        "videos": {"full_body_img": {"video_file": "x.mp4", "frame_count": frames, "fps": 25}},
    }
    (pkg / "package_info.json").write_text(json.dumps(info))
    return models_dir


@dataclass(slots=True)
class Outcome:
    sent_at: float
    answered_at: float
    kind: str  # "ok", an error code, CLOSED, LOST or ABANDONED


@dataclass
class Ledger:
    """Every request of a run and how it ended, across all clients (one event loop)."""

    outcomes: list[Outcome] = field(default_factory=list)
    duplicates: int = 0
    unexpected: int = 0
    sent: int = 0

    def kinds(self) -> Counter[str]:
        return Counter(o.kind for o in self.outcomes)

    @property
    def answered(self) -> int:
        """Requests that got an answer from the server (result or error)."""
        return sum(o.kind not in (CLOSED, LOST, ABANDONED) for o in self.outcomes)

    @property
    def lost(self) -> int:
        return sum(o.kind == LOST for o in self.outcomes)

    def errors(self) -> Counter[str]:
        """Outcomes other than ``ok``, by kind."""
        return Counter(o.kind for o in self.outcomes if o.kind != "ok")

    def last_failure_after(self, t: float) -> float:
        """Seconds from ``t`` to the last non-ok outcome after it (0: none): how long
        clients kept seeing failures after a fault at ``t``."""
        late = [o.answered_at for o in self.outcomes if o.kind != "ok" and o.answered_at >= t]
        return max(late) - t if late else 0.0

    def first_ok_sent_after(self, t: float) -> float | None:
        """Seconds from ``t`` to the first ok answer of a request sent at or after ``t``
        (service is back for new requests), or None."""
        oks = [o.answered_at for o in self.outcomes if o.kind == "ok" and o.sent_at >= t]
        return min(oks) - t if oks else None

    def max_latency(self, since: float = 0.0) -> float:
        lat = [o.answered_at - o.sent_at for o in self.outcomes if o.sent_at >= since]
        return max(lat, default=0.0)

    def summary(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "answered": self.answered,
            "lost": self.lost,
            "duplicates": self.duplicates,
            "unexpected": self.unexpected,
            "outcomes": dict(sorted(self.kinds().items())),
        }


class LedgerClient:
    """One WebSocket client sending layout B requests with its own frame ids.

    ``run`` keeps ``window`` requests outstanding until ``stop`` is set (or ``limit``
    requests were sent), then waits for what is still outstanding. With ``reconnect``,
    a closed connection is opened again (the gateway restarted) and sending goes on.
    """

    def __init__(
        self,
        url: str,
        model: str,
        ledger: Ledger,
        *,
        first_frame: int = 0,
        window: int = 4,
        audio: bytes = b"",
        reconnect: bool = False,
        connect_timeout: float = 60.0,
    ) -> None:
        self.url = url
        self.model = model
        self.ledger = ledger
        self.next_frame = first_frame
        self.window = window
        self.audio = audio
        self.reconnect = reconnect
        self.connect_timeout = connect_timeout
        self.ws: ClientConnection | None = None
        self.outstanding: dict[int, float] = {}  # frame id -> sent at
        self.answered_ids: set[int] = set()
        self.connections = 0
        self._room = asyncio.Event()
        self._room.set()
        self._reader: asyncio.Task[None] | None = None

    # -- connection --------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, retrying while the gateway is not (yet, or again) listening."""
        deadline = time.monotonic() + self.connect_timeout
        while True:
            try:
                self.ws = await connect(
                    self.url, max_size=16 << 20, ping_interval=None, open_timeout=10,
                    close_timeout=2,
                )  # fmt: skip
                break
            except (OSError, InvalidHandshake, InvalidStatus, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        self.connections += 1
        self._reader = asyncio.create_task(self._read(self.ws))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, ConnectionClosed):
                pass
            self._reader = None
        if self.ws is not None:
            await self.ws.close()
            self.ws = None

    async def leave(self, *, abort: bool = False) -> None:
        """Leave with whatever is outstanding (those requests are counted ``abandoned``):
        with a close handshake, or with ``abort`` without one (a browser tab killed)."""
        if abort and self.ws is not None:
            self.ws.transport.abort()
        await self.close()
        self._settle_all(ABANDONED)

    # -- sending -----------------------------------------------------------------------

    def request_bytes(self, frame_id: int) -> bytes:
        return RequestB(self.model, frame_id, self.audio).serialize()

    async def send_one(self) -> int:
        """Send the next request; its frame id."""
        assert self.ws is not None
        frame_id = self.next_frame
        self.next_frame = (self.next_frame + 1) & _U32
        self.outstanding[frame_id] = time.monotonic()
        self.ledger.sent += 1
        await self.ws.send(self.request_bytes(frame_id))
        return frame_id

    async def burst(self, n: int) -> None:
        """Send ``n`` requests back to back, without waiting for answers."""
        for _ in range(n):
            await self.send_one()

    async def run(self, stop: asyncio.Event, *, limit: int | None = None) -> None:
        """Closed loop until ``stop`` (or ``limit`` sent); reconnects if asked to."""
        sent = 0
        while not stop.is_set() and (limit is None or sent < limit):
            if self.ws is None:
                await self.open()
            if self.reader_done:
                await self._connection_lost()
                if not self.reconnect:
                    return
                continue
            if len(self.outstanding) >= self.window:
                self._room.clear()
                waiter = asyncio.create_task(self._room.wait())
                stopper = asyncio.create_task(stop.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()
                continue
            try:
                await self.send_one()
                sent += 1
            except ConnectionClosed:
                await self._connection_lost()
                if not self.reconnect:
                    return

    async def wait_answers(self, timeout: float) -> None:
        """Wait until nothing is outstanding; what still is after ``timeout`` is lost."""
        deadline = time.monotonic() + timeout
        while self.outstanding and time.monotonic() < deadline:
            if self.ws is None or self.reader_done:
                await self._connection_lost()
                break
            await asyncio.sleep(0.02)
        self._settle_all(LOST)

    # -- receiving ---------------------------------------------------------------------

    @property
    def reader_done(self) -> bool:
        """The connection is closed (by either side) and nothing more will arrive on it."""
        return self._reader is not None and self._reader.done()

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                self._on_message(message)
        except ConnectionClosed:
            pass
        finally:
            self._room.set()  # wake ``run``: it notices the closed connection

    def _on_message(self, message: bytes | str) -> None:
        now = time.monotonic()
        if isinstance(message, str):
            self.ledger.unexpected += 1
            return
        try:
            answer = parse_inference_response(message)
        except ProtocolError:
            self.ledger.unexpected += 1
            return
        frame_id = answer.frame_id
        sent_at = self.outstanding.pop(frame_id, None)
        if sent_at is None:
            if frame_id in self.answered_ids:
                self.ledger.duplicates += 1
            else:
                self.ledger.unexpected += 1
            return
        self.answered_ids.add(frame_id)
        if isinstance(answer, ResponseC):
            kind = "ok" if answer.image[:2] == b"\xff\xd8" else "bad_image"
        else:
            assert isinstance(answer, ErrorResponseC)
            kind = error_kind(answer.error)
        self.ledger.outcomes.append(Outcome(sent_at, now, kind))
        self._room.set()

    async def _connection_lost(self) -> None:
        """The connection died under us: what it had outstanding failed visibly."""
        await self.close()
        self._settle_all(CLOSED)

    def _settle_all(self, kind: str) -> None:
        now = time.monotonic()
        for frame_id, sent_at in self.outstanding.items():
            self.answered_ids.add(frame_id)  # a late answer to it would be a duplicate
            self.ledger.outcomes.append(Outcome(sent_at, now, kind))
        self.outstanding.clear()
        self._room.set()
