"""workers.batchsize: the batch size that answers the most jobs by their deadlines, from a
table of measured batch times (no sockets, no clock)."""

from __future__ import annotations

import pytest

from workers.batchsize import batch_time, choose_batch_size, in_time


CPU = {1: 0.6, 2: 1.2, 3: 1.8, 4: 2.4}  # a batch of n costs n singles
GPU = {1: 0.010, 2: 0.011, 4: 0.012, 8: 0.015}


def test_a_full_batch_that_would_miss_every_deadline_is_cut_to_what_fits():
    """Four requests due in 2 s on a device where a batch of 4 takes 2.4 s: all four would
    fail together; three fit."""
    assert choose_batch_size([2.0] * 4, 0.0, CPU, 4) == 3


@pytest.mark.parametrize(
    ("deadlines", "now", "times", "max_batch", "expected"),
    [
        # nothing measured yet: as many as allowed (the old behaviour)
        ([1.0] * 6, 0.0, {}, 4, 4),
        # fewer queued than the maximum
        ([5.0] * 2, 0.0, CPU, 4, 2),
        # a GPU: every size fits, the largest answers the most
        ([0.5] * 8, 0.0, GPU, 8, 8),
        # loose deadlines on a CPU: the whole batch fits
        ([10.0] * 4, 0.0, CPU, 4, 4),
        # the first job is due soon: a batch of 1 meets it, a larger one would not; the
        # later jobs have room for the next batch
        ([0.7, 9.0, 9.0, 9.0], 0.0, CPU, 4, 1),
        # ... unless waiting does not pay: two due in 1.3 s fit together
        ([1.3, 1.3, 9.0, 9.0], 0.0, CPU, 4, 2),
        # the clock has moved on: the same deadlines, less time left
        ([2.0] * 4, 0.5, CPU, 4, 2),
        # nothing can make it: all at once (the caller refuses them, computing nothing)
        ([0.1] * 4, 0.0, CPU, 4, 4),
        # jobs that cannot make it even alone do not hold the others back
        ([0.1, 2.0, 2.0, 0.1], 0.0, CPU, 4, 4),
        ([0.1, 1.3, 1.3, 1.3], 0.0, CPU, 4, 3),
        # the first job's tight deadline: one now, the rest next (not all four late)
        ([0.7, 2.0, 2.0, 2.0], 0.0, CPU, 4, 1),
    ],
)
def test_choice_table(deadlines, now, times, max_batch, expected):
    assert choose_batch_size(deadlines, now, times, max_batch) == expected


def test_no_batch_ends_past_its_earliest_deadline_when_a_smaller_one_meets_it():
    """The rule, over many tables: the chosen batch ends by the earliest deadline of the
    jobs in it that could make it at all, unless even a batch of one would not."""
    import itertools

    for per_item, first, rest, now in itertools.product(
        (0.1, 0.3, 0.7), (0.2, 0.5, 1.5), (0.5, 1.0, 3), (0.0, 0.4)
    ):
        times = {n: per_item * n for n in range(1, 9)}
        deadlines = [first, rest, first + rest, rest] * 2
        size = choose_batch_size(deadlines, now, times, 8)
        live = [d for d in deadlines[:size] if d >= now + times[1]]
        if live:  # the batch computes only these
            assert now + times[len(live)] <= min(live)
            # and no larger batch would have: it is the largest that does
            for larger in range(size + 1, 9):
                alive = [d for d in deadlines[:larger] if d >= now + times[1]]
                assert now + times[len(alive)] > min(alive)


def test_unmeasured_sizes_are_guessed_optimistically_so_they_get_measured():
    assert batch_time({2: 0.2}, 4) == pytest.approx(0.2)  # as fast as the largest below
    assert batch_time({4: 0.4}, 1) == pytest.approx(0.1)  # scaled down from above
    assert batch_time({}, 3) is None


@pytest.mark.parametrize(
    ("deadlines", "now", "times", "expected"),
    [
        ([5.0] * 4, 0.0, CPU, [True] * 4),
        ([5.0] * 4, 0.0, {}, [True] * 4),  # nothing measured: refuse nothing
        # a fixed batch of four due in 2 s: the one due first goes, three fit
        ([1.9, 2.0, 2.0, 2.0], 0.0, CPU, [False, True, True, True]),
        # those that cannot make it even alone, and then no more
        ([0.1, 2.0, 2.0, 0.1], 0.0, CPU, [False, True, True, False]),
        ([0.1] * 3, 0.0, CPU, [False] * 3),
        ([1.0, 1.0], 0.5, CPU, [False, False]),
    ],
)
def test_in_time_keeps_the_most_that_can_all_make_it(deadlines, now, times, expected):
    assert in_time(deadlines, now, times) == expected
