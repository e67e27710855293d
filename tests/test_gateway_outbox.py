"""gateway/outbox.py: the drop-oldest outbox and the layout A sequencer, on their own."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, strategies as st

from gateway.outbox import Outbox, Sequencer


def test_outbox_drops_oldest_frame_first():
    drops: list[str] = []
    box = Outbox(max_items=3, max_bytes=1000, on_drop=drops.append)
    box.put("hello", "json", droppable=False)
    box.put(b"f1", "a")
    box.put(b"f2", "c")
    box.put(b"f3", "a")  # full: f1 goes, the JSON answer stays
    assert [i.data for i in box._items] == ["hello", b"f2", b"f3"]
    assert drops == ["a"] and box.dropped == 1


def test_outbox_drops_json_only_when_nothing_else_is_left():
    box = Outbox(max_items=2, max_bytes=1000)
    for text in ("one", "two", "three"):
        box.put(text, "json", droppable=False)
    assert [i.data for i in box._items] == ["two", "three"]


def test_outbox_byte_bound():
    box = Outbox(max_items=100, max_bytes=10)
    box.put(b"123456", "a")
    box.put(b"789012", "a")
    assert len(box) == 1 and box.queued_bytes == 6 and box.dropped == 1


async def test_outbox_sends_in_order_and_flushes():
    sent: list[tuple[bytes | str, str]] = []
    gate = asyncio.Event()

    async def send(data, kind):
        await gate.wait()
        sent.append((data, kind))

    box = Outbox(max_items=10, max_bytes=1000)
    runner = asyncio.create_task(box.run(send))
    box.put(b"x", "a")
    box.put("y", "json", droppable=False)
    await asyncio.sleep(0)
    assert sent == []
    gate.set()
    await asyncio.wait_for(box.flushed(), 5)
    assert sent == [(b"x", "a"), ("y", "json")]
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner


def test_sequencer_releases_in_order():
    seq = Sequencer(max_waiting=10)
    t = [seq.ticket() for _ in range(4)]
    assert seq.complete(t[2], b"c") == []
    assert seq.complete(t[1], b"b") == []
    assert seq.complete(t[0], b"a") == [b"a", b"b", b"c"]
    assert seq.complete(t[3], b"d") == [b"d"]
    assert seq.reordered == 2 and seq.pending == 0


def test_sequencer_drops_oldest_waiting_past_its_bound():
    seq = Sequencer(max_waiting=2)
    head = seq.ticket()
    rest = [seq.ticket() for _ in range(3)]
    for ticket, answer in zip(rest, (b"1", b"2", b"3"), strict=True):
        seq.complete(ticket, answer)
    assert seq.dropped == 1 and seq.waiting == 2
    assert seq.complete(head, b"0") == [b"0", b"2", b"3"]


def test_sequencer_rejects_unknown_tickets():
    seq = Sequencer(max_waiting=2)
    ticket = seq.ticket()
    seq.complete(ticket, b"")
    with pytest.raises(ValueError):
        seq.complete(ticket, b"")
    with pytest.raises(ValueError):
        seq.complete(99, b"")


@given(st.permutations(list(range(12))))
def test_sequencer_any_completion_order(order):
    seq = Sequencer(max_waiting=100)
    tickets = [seq.ticket() for _ in range(12)]
    out = []
    for i in order:
        out += seq.complete(tickets[i], bytes([i]))
    assert out == [bytes([i]) for i in range(12)]
