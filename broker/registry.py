"""The workers the broker knows, their credits, and the choice of one for a request.

Rule 2 (credits, not round-robin): a worker announces ``capacity`` in READY; the broker
never holds more than that many of its requests in flight, and among the live workers that
hold a model it picks the one with the most free credits, ties going to the least recently
used. Credits rather than round-robin because workers differ (GPU vs CPU, batch sizes), and
a slow worker then naturally gets less work without anyone measuring its speed.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterator

from broker.records import WorkerRecord
from shared.envelope import Ready


__all__ = ["AFFINITY_LIMIT", "MAX_CAPACITY", "Registry", "check_ready"]

MAX_CAPACITY = 100_000

AFFINITY_LIMIT = 10_000
"""Streams whose last worker is remembered (docs/streams.md: a stream's requests go to the
same worker while it lives, where its audio features are cached)."""


class Registry:
    """Live workers by routing identity, with a model -> holders index for ``choose``."""

    def __init__(self) -> None:
        self._workers: dict[bytes, WorkerRecord] = {}
        self._holders: dict[str, list[WorkerRecord]] = {}
        self._tick = itertools.count()
        self._affinity: OrderedDict[tuple[bytes, str], WorkerRecord] = OrderedDict()

    def __len__(self) -> int:
        return len(self._workers)

    def __iter__(self) -> Iterator[WorkerRecord]:
        return iter(list(self._workers.values()))

    def get(self, identity: bytes) -> WorkerRecord | None:
        return self._workers.get(identity)

    def by_id(self, worker_id: str) -> WorkerRecord | None:
        for record in self._workers.values():
            if record.id == worker_id:
                return record
        return None

    def add(self, record: WorkerRecord) -> None:
        self._workers[record.identity] = record
        self.reindex()

    def update(self, record: WorkerRecord, header: Ready) -> bool:
        """A registered worker re-announced itself (its models changed, or it drains with
        capacity 0); True if its capacity or model set changed."""
        changed = record.capacity != header.capacity or set(record.models) != set(header.models)
        record.capacity = header.capacity
        record.models = header.models
        record.device, record.backend = header.device, header.backend
        self.reindex()
        return changed

    def remove(self, record: WorkerRecord) -> None:
        if self._workers.get(record.identity) is record:
            del self._workers[record.identity]
            self.reindex()

    def reindex(self) -> None:
        """Rebuild the model index; call after a worker's model set changes."""
        holders: dict[str, list[WorkerRecord]] = {}
        for record in self._workers.values():
            for model in record.models:
                holders.setdefault(model, []).append(record)
        self._holders = holders

    def holders(self, model: str) -> list[WorkerRecord]:
        return self._holders.get(model, [])

    def holds(self, model: str) -> bool:
        return model in self._holders

    def models(self) -> list[str]:
        return sorted(self._holders)

    def choose(self, model: str, stream: tuple[bytes, str] | None = None) -> WorkerRecord | None:
        """The holder of ``model`` with the most free credits (ties: least recently used),
        or None when every holder is full.

        A stream's request (``stream`` = gateway identity, ``opts.stream``) goes to the
        worker that served the stream last if it is still registered, holds the model and
        has a free credit (its cache of the stream's audio features is warm there); else
        the choice above."""
        if stream is not None:
            last = self._affinity.get(stream)
            if (
                last is not None
                and self._workers.get(last.identity) is last
                and model in last.models
                and last.free > 0
            ):
                return last
        best: WorkerRecord | None = None
        for record in self._holders.get(model, ()):
            free = record.free
            if free <= 0:
                continue
            if (
                best is None
                or free > best.free
                or (free == best.free and record.last_assigned < best.last_assigned)
            ):
                best = record
        return best

    def choose_any(self) -> WorkerRecord | None:
        """Any live worker, most free credits first (admin ops that name no worker)."""
        return max(self._workers.values(), key=lambda r: (r.free, -r.last_assigned), default=None)

    def assigned(self, record: WorkerRecord, stream: tuple[bytes, str] | None = None) -> None:
        record.last_assigned = next(self._tick)
        if stream is not None:
            self._affinity[stream] = record
            self._affinity.move_to_end(stream)
            if len(self._affinity) > AFFINITY_LIMIT:
                self._affinity.popitem(last=False)


def check_ready(h: Ready) -> str:
    """What is wrong with a READY, or "" if nothing."""
    if not h.worker or len(h.worker) > 256:
        return "worker id must be 1..256 characters"
    if not 0 <= h.capacity <= MAX_CAPACITY:
        return f"capacity must be 0..{MAX_CAPACITY}"
    for name, meta in h.models.items():
        if not isinstance(name, str) or not 0 < len(name) <= 256 or not isinstance(meta, dict):
            return "models must map names to metadata maps"
    return ""
