"""workers.batcher: what the compute thread runs next and what it refuses, from a script of
jobs and times (no sockets, no threads, no clock)."""

from __future__ import annotations

import pytest

from shared.errors import ErrorCode
from workers.batcher import Batcher
from workers.jobs import Job
from workers.servicetime import PROBE_AFTER_S


CPU = {1: 0.6, 2: 1.2, 3: 1.8, 4: 2.4}  # a batch of n costs n singles
GPU = {1: 0.010, 2: 0.011, 4: 0.012}


class Times:
    """Fixed batch-time estimates, as ``ServiceTimes`` would have measured them."""

    def __init__(self, tables=None, age: float = 0.0) -> None:
        self.tables = tables or {}
        self.ages = age

    def table(self, model):
        return dict(self.tables.get(model, {}))

    def age(self, model):
        return self.ages


def job(rid: int, at: float = 0.0, ttl: float = 10.0, model: str = "m", session: int = 0) -> Job:
    """An infer job received at ``at``, due ``ttl`` seconds later."""
    return Job(rid, "infer", model, rid, {}, at + ttl, at, session)


def batcher(max_batch=4, max_delay=0.005, tables=None, age=0.0, sizing="deadline") -> Batcher:
    return Batcher(max_batch, max_delay, Times(tables, age), sizing)


def play(b: Batcher, script) -> list[tuple]:
    """Feed ``script`` (rows of ``(now, event, *args)``) to ``b``; what it decided, in order:
    ``(now, "refuse", rid, code, reason)`` and ``(now, "batch", model, [rids])``.

    Events: ``("add", job)``, ``("cancel", session, rid)``, ``("step", session)`` (one
    turn of the compute loop: ``next_batch``, then what it refused, then the batch)."""
    seen: list[tuple] = []
    for now, event, *args in script:
        batch = None
        if event == "add":
            b.add(args[0])
        elif event == "cancel":
            b.cancel(*args)
        elif event == "step":
            batch = b.next_batch(now, *args)
        else:
            raise AssertionError(event)
        seen += [(now, "refuse", r.job.rid, r.code.value, r.reason) for r in b.refusals()]
        if batch is not None:
            model, jobs = batch
            seen.append((now, "batch", model, [j.rid for j in jobs]))
    return seen


# -- when to run -----------------------------------------------------------------------


def test_timeout_forever_when_idle_zero_when_full_else_until_the_oldest_has_waited():
    b = batcher(max_batch=2, max_delay=0.010)
    assert b.timeout(0.0) is None
    b.add(job(1, at=1.000))
    assert b.timeout(1.004) == pytest.approx(0.006)
    assert b.timeout(1.050) == 0.0  # overdue: at once, never negative
    b.add(job(2, at=1.001))
    assert b.timeout(1.002) == 0


def test_a_batch_waits_for_more_jobs_up_to_max_delay():
    b = batcher(max_batch=4, max_delay=0.010)
    seen = play(
        b,
        [
            (0.000, "add", job(1, at=0.000)),
            (0.002, "add", job(2, at=0.002)),
            (0.005, "step", 0),  # two of four, the first has waited 5 of 10 ms: wait
            (0.010, "step", 0),
            (0.011, "step", 0),  # nothing left
        ],
    )
    assert seen == [(0.010, "batch", "m", [1, 2])]


def test_max_batch_at_a_time_in_queue_order():
    b = batcher(max_batch=4)
    script = [(0.0, "add", job(rid)) for rid in range(6)]
    script += [(0.0, "step", 0), (0.0, "step", 0), (0.01, "step", 0)]
    assert play(b, script) == [
        (0.0, "batch", "m", [0, 1, 2, 3]),
        (0.01, "batch", "m", [4, 5]),  # the rest once they have waited max_delay
    ]


def test_a_full_queue_goes_first_then_the_model_waiting_longest():
    b = batcher(max_batch=2, max_delay=0.010)
    seen = play(
        b,
        [
            (0.000, "add", job(1, at=0.000, model="old")),
            (0.001, "add", job(2, at=0.001, model="b")),
            (0.002, "add", job(3, at=0.002, model="a")),
            (0.003, "add", job(4, at=0.003, model="a")),
            (0.003, "step", 0),  # "a" is full: it goes first, though "old" waited longer
            (0.003, "step", 0),  # nobody full, nobody waited 10 ms
            (0.012, "step", 0),  # "old" and "b" both overdue: the oldest first
            (0.012, "step", 0),
        ],
    )
    assert seen == [
        (0.003, "batch", "a", [3, 4]),
        (0.012, "batch", "old", [1]),
        (0.012, "batch", "b", [2]),
    ]


# -- what is not computed ----------------------------------------------------------------


def test_expired_jobs_are_refused_and_old_sessions_dropped_in_silence():
    b = batcher(max_batch=4, max_delay=0.0)
    seen = play(
        b,
        [
            (0.0, "add", job(1, ttl=0.5, session=1)),
            (0.0, "add", job(2, ttl=5.0, session=0)),
            (0.0, "add", job(3, ttl=5.0, session=1)),
            (1.0, "step", 1),  # session 1 is current: 2 belongs to a broker that forgot us
        ],
    )
    assert seen == [(1.0, "refuse", 1, "deadline_exceeded", "expired"), (1.0, "batch", "m", [3])]
    assert len(b) == 0


def test_expired_message_says_why():
    b = batcher()
    b.add(job(1, ttl=0.1))
    assert b.next_batch(1.0, 0) is None
    [refusal] = b.refusals()
    assert (refusal.code, refusal.message) == (
        ErrorCode.DEADLINE_EXCEEDED,
        "deadline passed before compute",
    )
    assert b.refusals() == []  # each refusal handed out once


def test_cancel_takes_a_queued_job_of_its_session_only():
    b = batcher(max_batch=4, max_delay=0.010)
    seen = play(
        b,
        [
            (0.0, "add", job(1)),
            (0.0, "add", job(2)),
            (0.0, "cancel", 0, 2),
            (0.0, "cancel", 1, 1),  # another session's request 1: not this one
            (0.0, "cancel", 0, 7),  # never received
            (0.02, "step", 0),
            (0.02, "cancel", 0, 1),  # already in a batch, which answers it
        ],
    )
    assert seen == [(0.0, "refuse", 2, "cancelled", "cancelled"), (0.02, "batch", "m", [1])]


def test_cancelling_a_models_last_job_leaves_nothing_to_wait_for():
    b = batcher()
    b.add(job(1))
    assert b.cancel(0, 1)
    assert b.timeout(0.0) is None
    assert b.next_batch(1.0, 0) is None


# -- sized to the deadlines ----------------------------------------------------------------


def test_a_batch_that_would_miss_every_deadline_is_cut_to_what_fits():
    """Four due in 2 s where a batch of 4 takes 2.4 s: three now, the fourth next."""
    b = batcher(max_batch=4, tables={"m": CPU})
    script = [(0.0, "add", job(rid, ttl=2.0)) for rid in range(4)]
    script += [(0.0, "step", 0), (0.01, "step", 0)]
    assert play(b, script) == [
        (0.0, "batch", "m", [0, 1, 2]),
        (0.01, "batch", "m", [3]),
    ]


def test_on_a_gpu_the_largest_batch_wins():
    b = batcher(max_batch=4, tables={"m": GPU})
    script = [(0.0, "add", job(rid, ttl=0.5)) for rid in range(4)] + [(0.0, "step", 0)]
    assert play(b, script) == [(0.0, "batch", "m", [0, 1, 2, 3])]


def test_a_job_that_cannot_make_it_is_refused_and_the_rest_computed():
    b = batcher(max_batch=4, max_delay=0.0, tables={"m": CPU})
    seen = play(
        b,
        [
            (0.0, "add", job(1, ttl=0.1)),  # a batch of one takes 0.6 s
            (0.0, "add", job(2, ttl=2.0)),
            (0.0, "add", job(3, ttl=2.0)),
            (0.0, "step", 0),
        ],
    )
    assert seen == [
        (0.0, "refuse", 1, "deadline_exceeded", "too_late"),
        (0.0, "batch", "m", [2, 3]),
    ]


def test_the_too_late_message_gives_the_batch_time():
    b = batcher(max_batch=4, max_delay=0.0, tables={"m": CPU})
    for rid, ttl in ((1, 0.1), (2, 2.0), (3, 2.0)):
        b.add(job(rid, ttl=ttl))
    b.next_batch(0.0, 0)
    [refusal] = b.refusals()
    assert refusal.message == "would be ready after its deadline (a batch takes ~1200 ms)"


@pytest.mark.parametrize(
    ("age", "expected"),
    [
        # measured recently: all refused, nothing computed
        (0.0, [(0.0, "refuse", rid, "deadline_exceeded", "too_late") for rid in (1, 2)]),
        # refusing all for longer than PROBE_AFTER_S: run them, to measure again
        (PROBE_AFTER_S + 0.5, [(0.0, "batch", "m", [1, 2])]),
    ],
)
def test_when_all_would_be_late_the_batch_runs_only_to_measure_again(age, expected):
    b = batcher(max_batch=4, max_delay=0.0, tables={"m": CPU}, age=age)
    script = [(0.0, "add", job(1, ttl=0.3)), (0.0, "add", job(2, ttl=0.3)), (0.0, "step", 0)]
    assert play(b, script) == expected


def test_nothing_measured_nothing_refused_before_its_deadline():
    b = batcher(max_batch=4, tables={})
    script = [(0.0, "add", job(rid, ttl=0.001)) for rid in range(4)] + [(0.0, "step", 0)]
    assert play(b, script) == [(0.0, "batch", "m", [0, 1, 2, 3])]


def test_estimates_are_per_model():
    b = batcher(max_batch=2, tables={"slow": CPU, "fast": GPU})
    seen = play(
        b,
        [
            (0.0, "add", job(1, ttl=0.3, model="slow")),
            (0.0, "add", job(2, ttl=0.3, model="slow")),
            (0.0, "add", job(3, ttl=0.3, model="fast")),
            (0.0, "add", job(4, ttl=0.3, model="fast")),
            (0.0, "step", 0),
            (0.0, "step", 0),
        ],
    )
    assert seen == [
        (0.0, "refuse", 1, "deadline_exceeded", "too_late"),
        (0.0, "refuse", 2, "deadline_exceeded", "too_late"),
        (0.0, "batch", "fast", [3, 4]),
    ]


# -- batch_sizing "fixed" ------------------------------------------------------------------


def test_fixed_sizing_takes_all_and_refuses_by_the_whole_batchs_time():
    """As before deadline sizing: the batch is as large as queued; a job due before the
    whole batch would be ready is refused, the message giving the time of what is left."""
    b = batcher(max_batch=4, tables={"m": CPU}, sizing="fixed")
    seen = play(
        b,
        [
            (0.0, "add", job(1, ttl=2.0)),  # a batch of 4 takes 2.4 s
            (0.0, "add", job(2, ttl=3.0)),
            (0.0, "add", job(3, ttl=3.0)),
            (0.0, "add", job(4, ttl=3.0)),
            (0.0, "step", 0),
        ],
    )
    assert seen == [
        (0.0, "refuse", 1, "deadline_exceeded", "too_late"),
        (0.0, "batch", "m", [2, 3, 4]),
    ]
    assert b.next_batch(0.0, 0) is None


def test_deadline_sizing_serves_what_fixed_sizing_refuses():
    """The same four jobs, sized to their deadlines: three in time now instead of a batch
    that makes them all late."""
    script = [(0.0, "add", job(rid, ttl=2.0)) for rid in range(4)] + [(0.0, "step", 0)]
    fixed = play(batcher(max_batch=4, tables={"m": CPU}, sizing="fixed"), script)
    assert fixed == [(0.0, "refuse", rid, "deadline_exceeded", "too_late") for rid in range(4)]
    script = [(0.0, "add", job(rid, ttl=2.0)) for rid in range(4)] + [(0.0, "step", 0)]
    deadline = play(batcher(max_batch=4, tables={"m": CPU}), script)
    assert deadline == [(0.0, "batch", "m", [0, 1, 2])]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch": 0}, "max_batch must be >= 1"),
        ({"sizing": "largest"}, "batch_sizing must be deadline or fixed, not 'largest'"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        batcher(**kwargs)
