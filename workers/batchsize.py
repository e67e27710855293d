"""How many of the queued jobs to put in the next batch: the most that finish in time.

Why not always the largest batch: a batch ends for all its jobs at once, and on a CPU (or
a GPU already full) a batch of n takes about n times one. With deadlines near the service
time, a full batch can end after every one of its jobs' deadlines, where a smaller one
would have answered most of them: four pipelined requests on a slow CPU, batched together,
all came back ``deadline_exceeded``; served two and two, the first two would have been in
time. On a GPU a batch of 32 costs little more than one, the estimates say so, and the
largest batch wins.

Sans-I/O: a table of measured batch times and the jobs' deadlines in, a size (and which
of the batch's jobs can still make it) out. ``workers.servicetime`` measures; the compute
loop asks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


__all__ = ["batch_time", "choose_batch_size", "in_time"]


def batch_time(times: Mapping[int, float], size: int) -> float | None:
    """Seconds a batch of ``size`` takes, from the measured ``times`` (size -> seconds).

    An unmeasured size is guessed on the optimistic side, so that it gets tried and
    measured rather than avoided for ever: as fast as the largest measured size below it,
    or, with only larger sizes measured, the smallest of them scaled down linearly. None
    when nothing is measured."""
    at_or_below = [n for n in times if n <= size]
    if at_or_below:
        return times[max(at_or_below)]
    if times:
        n = min(times)
        return times[n] * size / n
    return None


def choose_batch_size(
    deadlines: Sequence[float], now: float, times: Mapping[int, float], max_batch: int
) -> int:
    """How many of the jobs whose ``deadlines`` are given (in the order the queue hands
    them out) the next batch should take, at time ``now``: the largest batch estimated to
    end by the earliest deadline in it, so that it answers every one of its jobs in time
    and leaves the rest to the next batch; without measurements, as many as allowed.

    Jobs that could not make it even in a batch of one do not count (the caller refuses
    them, ``deadline_exceeded``, without computing them): they neither hold the batch
    back nor add to its time. So a batch never ends past the earliest deadline in it when
    a smaller one would meet it; and the first job's tight deadline does not make its
    batch-mates late, it makes the batch smaller (one now, the rest next, instead of all
    together and the first one late)."""
    most = min(max_batch, len(deadlines))
    if most <= 1 or not times:
        return most
    alone = now + (batch_time(times, 1) or 0.0)
    alive = [d >= alone for d in deadlines[:most]]
    if not any(alive):
        return most  # all refused at once
    best, earliest, computed = 1, float("inf"), 0
    for size in range(1, most + 1):
        if alive[size - 1]:
            earliest = min(earliest, deadlines[size - 1])
            computed += 1
        if now + (batch_time(times, max(1, computed)) or 0.0) <= earliest:
            best = size
    return best


def in_time(deadlines: Sequence[float], now: float, times: Mapping[int, float]) -> list[bool]:
    """Which of a batch's jobs (by their ``deadlines``) to compute at ``now``: the most
    that can all be ready in time together, which are those with the latest deadlines (the
    k latest, for the largest k whose batch of k ends by the k-th latest). The others
    would be ready after their deadlines whatever is done: the caller answers them
    ``deadline_exceeded`` without computing them, and the batch ends sooner for the rest.
    Without measurements, all of them."""
    order = sorted(range(len(deadlines)), key=lambda i: deadlines[i], reverse=True)
    keep = 0
    for k in range(1, len(order) + 1):
        if deadlines[order[k - 1]] >= now + (batch_time(times, k) or 0.0):
            keep = k
    kept = set(order[:keep])
    return [i in kept for i in range(len(deadlines))]
