"""gateway/outbox.py: the outbox that gives up images but never slots, and the layout A
sequencer, on their own (no sockets; a hand-driven clock)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, strategies as st

from gateway.outbox import KEEP, Outbox, Sequencer


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def contents(box: Outbox) -> list[bytes | str]:
    return [i.data for i in box._items]


def test_past_the_byte_bound_the_oldest_images_become_their_fallbacks():
    drops: list[str] = []
    box = Outbox(max_bytes=10, max_age_s=5, on_drop=drops.append)
    box.put("hi", "json")
    box.put(b"123456", "a", b"")
    box.put(b"789012", "c", b"E1")  # 14 bytes: the oldest image goes
    assert contents(box) == ["hi", b"", b"789012"]
    assert box.queued_bytes == 8 and drops == ["a"] and box.dropped == 1
    box.put(b"abcdef", "d", b"E2")
    assert contents(box) == ["hi", b"", b"E1", b"abcdef"]
    assert len(box) == 4  # every slot is still there


def test_tagged_frames_are_left_out_and_json_is_never_given_up():
    box = Outbox(max_bytes=4, max_age_s=5)
    box.put(b"tag1", "tagged", None)
    box.put("a long json answer", "json")  # over the bound alone: kept anyway
    assert contents(box) == ["a long json answer"]
    box.put("another", "json")
    assert contents(box) == ["a long json answer", "another"]
    assert box.dropped == 1


def test_an_image_given_up_is_never_given_up_twice():
    box = Outbox(max_bytes=3, max_age_s=5)
    box.put(b"aaaa", "c", b"err")
    box.put(b"bbbb", "c", b"err")
    assert contents(box) == [b"err", b"err"] and box.dropped == 2


async def test_a_burst_to_a_reading_client_goes_out_whole():
    """Many answers released at once (the sequencer after a stall) are all sent as they
    are: only age or bytes give an image up, never the count."""
    sent: list[bytes | str] = []

    async def send(data, kind):
        sent.append(data)

    box = Outbox(max_bytes=10**6, max_age_s=1)
    for i in range(500):
        box.put(bytes([i % 256]) * 100, "a", b"")
    runner = asyncio.create_task(box.run(send))
    await asyncio.wait_for(box.flushed(), 5)
    runner.cancel()
    assert sent == [bytes([i % 256]) * 100 for i in range(500)]
    assert box.dropped == 0


async def test_answers_the_client_did_not_take_in_time_go_out_as_fallbacks():
    """The socket did not move for longer than max_age_s: what waited that long is sent as
    its fallback (an A slot as an empty message), in order; fresher answers go as they
    are."""
    clock = Clock()
    sent: list[bytes | str] = []
    gate = asyncio.Event()

    async def send(data, kind):
        await gate.wait()
        sent.append(data)

    drops: list[str] = []
    box = Outbox(max_bytes=10**6, max_age_s=2, on_drop=drops.append, clock=clock)
    runner = asyncio.create_task(box.run(send))
    box.put(b"first", "a", b"")  # taken by the sender, which then blocks
    await asyncio.sleep(0)
    box.put(b"old", "a", b"")
    box.put(b"tag", "tagged", None)
    box.put("json", "json")
    clock.now = 2.5
    box.put(b"fresh", "c", b"E")
    gate.set()
    await asyncio.wait_for(box.flushed(), 5)
    runner.cancel()
    assert sent == [b"first", b"", "json", b"fresh"]
    assert drops == ["a", "tagged"]


async def test_outbox_sends_in_order_and_flushes():
    sent: list[tuple[bytes | str, str]] = []
    gate = asyncio.Event()

    async def send(data, kind):
        await gate.wait()
        sent.append((data, kind))

    box = Outbox(max_bytes=1000, max_age_s=5)
    runner = asyncio.create_task(box.run(send))
    box.put(b"x", "a", b"")
    box.put("y", "json", KEEP)
    await asyncio.sleep(0)
    assert sent == []
    gate.set()
    await asyncio.wait_for(box.flushed(), 5)
    assert sent == [(b"x", "a"), ("y", "json")]
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner


def test_outbox_limits_must_be_positive():
    with pytest.raises(ValueError):
        Outbox(max_bytes=0, max_age_s=1)
    with pytest.raises(ValueError):
        Outbox(max_bytes=1, max_age_s=0)


def test_sequencer_releases_in_order():
    seq = Sequencer(max_bytes=100)
    t = [seq.ticket() for _ in range(4)]
    assert seq.complete(t[2], b"c") == []
    assert seq.complete(t[1], b"b") == []
    assert seq.waiting == 2 and seq.waiting_bytes == 2
    assert seq.complete(t[0], b"a") == [b"a", b"b", b"c"]
    assert seq.complete(t[3], b"d") == [b"d"]
    assert seq.reordered == 2 and seq.pending == 0 and seq.waiting_bytes == 0


def test_sequencer_past_its_byte_bound_keeps_slots_and_empties_the_oldest_images():
    seq = Sequencer(max_bytes=6)
    head = seq.ticket()
    rest = [seq.ticket() for _ in range(4)]
    seq.complete(rest[0], b"111")
    seq.complete(rest[1], b"")  # an error answer: nothing to give up
    seq.complete(rest[2], b"222")
    assert seq.dropped == 0
    seq.complete(rest[3], b"333")  # 9 bytes waiting: the oldest image goes
    assert seq.dropped == 1 and seq.waiting == 4 and seq.waiting_bytes == 6
    assert seq.complete(head, b"0") == [b"0", b"", b"", b"222", b"333"]


def test_sequencer_rejects_unknown_tickets():
    seq = Sequencer(max_bytes=2)
    ticket = seq.ticket()
    seq.complete(ticket, b"")
    with pytest.raises(ValueError):
        seq.complete(ticket, b"")
    with pytest.raises(ValueError):
        seq.complete(99, b"")


@given(st.permutations(list(range(12))), st.integers(1, 40))
def test_sequencer_any_completion_order_keeps_count_and_order(order, max_bytes):
    """Whatever the completion order and the byte bound: one answer per ticket, in ticket
    order, each the answer given or (when given up) empty."""
    seq = Sequencer(max_bytes=max_bytes)
    tickets = [seq.ticket() for _ in range(12)]
    out = []
    for i in order:
        out += seq.complete(tickets[i], bytes([65 + i]) * 3)
    assert len(out) == 12
    assert all(a in (bytes([65 + i]) * 3, b"") for i, a in enumerate(out))
    assert sum(1 for a in out if not a) == seq.dropped
