"""Abusive and unlucky clients, end to end through real processes: clients that vanish with
requests in flight, a client that never reads, a client that opens and closes a thousand
connections, bursts far above what the workers can do, and a client that pipelines without
limit against a stalled worker.

What must hold (DESIGN.md sections 3 and 4): nothing leaks (gateway in flight and
connections back to 0, broker pending 0, every request a worker received answered, fds and
RSS back near where they started); the gateway's memory does not follow a client that does
not read (its oldest images are given up and counted, exactly); and a burst is answered in
full, each request exactly once, the excess with ``overloaded`` at once rather than queued
until its deadline.
"""

from __future__ import annotations

import asyncio
import signal
import time

import psutil
import pytest
from fault_harness import MIB, FaultSystem, eventually, gateway_outcomes, memory_line, report
from gateway_harness import FAST_BEATS, metric
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from lipsync.bench.ledger import ABANDONED, Ledger, LedgerClient
from shared.browser import (
    ErrorResponseC,
    RequestA,
    RequestB,
    ResponseC,
    parse_inference_response,
)


pytestmark = pytest.mark.fault


@pytest.fixture
def system(fault_system):
    return fault_system


def gateway_metric(system: FaultSystem, name: str, **labels: str) -> float:
    return metric(system.port, name, **labels)


async def gateway_settled(system: FaultSystem) -> None:
    """No connection open and nothing in flight at the gateway."""

    def settled() -> bool:
        return (
            gateway_metric(system, "lipsync_gateway_connections") == 0
            and gateway_metric(system, "lipsync_gateway_in_flight") == 0
        )

    await eventually(lambda: asyncio.to_thread(settled), what="the gateway to settle")


async def test_clients_vanish_with_requests_in_flight(system):
    """Ten clients send 20 requests each to a slow worker and leave at once, half with a
    close handshake and half by dropping the TCP connection. Everything they left behind is
    cancelled or answered into the void: nothing stays held anywhere, and the next client is
    served as if nothing happened."""
    system.start_broker()
    worker = system.start_null_worker("w1", delay_ms=40, max_batch=2, capacity=4)
    system.start_gateway_process()
    await system.wait_ready("w1")
    warm = Ledger()
    c = LedgerClient(system.url, system.model, warm, first_frame=900_000_000)
    await c.open()
    await c.run(asyncio.Event(), limit=20)
    await c.wait_answers(30)
    await c.close()
    await gateway_settled(system)
    before = {n: p.sample() for n, p in system.probes().items()}

    ledger = Ledger()
    leavers = [
        LedgerClient(system.url, system.model, ledger, first_frame=i * 10_000_000)
        for i in range(10)
    ]
    for client in leavers:
        await client.open()
        await client.burst(20)
    for i, client in enumerate(leavers):
        await client.leave(abort=bool(i % 2))  # half without a close handshake
    stats = await system.wait_idle()
    await gateway_settled(system)
    after = {n: p.sample() for n, p in system.probes().items()}

    assert ledger.duplicates == ledger.unexpected == 0
    assert ledger.sent == ledger.answered + ledger.kinds()[ABANDONED] == 200
    counters = stats["workers"][0]["counters"]
    broker = stats["broker"]
    # most were still queued at the broker when their client left: never sent to a worker
    assert broker["cancelled"] >= 100
    assert counters["received"] - 20 < 100  # 20: the warm-up
    assert counters["received"] == counters["served"] + counters["errors"]
    assert worker.poll() is None
    gw0, gw1 = before["gateway"], after["gateway"]
    assert gw1[1] <= gw0[1] + 2  # fds back to where they were

    after_ledger = Ledger()
    c = LedgerClient(system.url, system.model, after_ledger, first_frame=950_000_000)
    await c.open()
    await c.run(asyncio.Event(), limit=40)
    await c.wait_answers(30)
    await c.close()
    assert after_ledger.kinds() == {"ok": 40} and after_ledger.duplicates == 0
    report(
        "clients disconnect with requests in flight",
        ledger,
        recovery_s=0.0,
        memory=memory_line(before, after),
        broker_cancelled=broker["cancelled"],
        worker_received=counters["received"],
        worker_cancelled=counters["cancelled"],
    )


async def test_client_that_never_reads_costs_only_its_own_frames(system):
    """A client sends 800 requests for 100 kB frames (28 at a time, within its in-flight
    limit) and reads nothing until they are all done; meanwhile another client is served
    normally. The gateway gives up the slow client's oldest images, its memory stays far
    below what was produced, and the books balance exactly: when it finally reads, every
    request has one answer, an image or a ``slow_client`` C error naming its frame (as
    many as the gateway counted), no frame twice; the other client lost nothing."""
    n, step = 800, 28
    system.start_broker()
    system.start_null_worker("w1", delay_ms=0, max_batch=8, jpeg_bytes=100_000)
    system.start_gateway_process()
    await system.wait_ready("w1")
    gateway = system.probes()["gateway"]
    before = {name: p.sample() for name, p in system.probes().items()}

    def gauge(name: str, **labels: str) -> float:
        return gateway_metric(system, name, **labels)

    dropped0 = await asyncio.to_thread(gauge, "lipsync_gateway_dropped_frames_total", kind="c")
    normal = Ledger()
    stop = asyncio.Event()
    other = LedgerClient(system.url, system.model, normal, first_frame=500_000_000, window=4)
    await other.open()
    other_running = asyncio.create_task(other.run(stop))

    peak = before["gateway"][0]
    async with connect(system.url, max_size=1 << 20, max_queue=1, ping_interval=None) as slow:
        for first in range(0, n, step):
            # at most 4 in flight (the other client's): the slow one has room for 28 more
            await eventually(
                lambda: asyncio.to_thread(lambda: gauge("lipsync_gateway_in_flight") <= 4),
                what="room in flight",
            )
            for frame in range(first, min(n, first + step)):
                await slow.send(RequestB(system.model, frame).serialize())
            peak = max(peak, gateway.sample()[0])
        stop.set()
        await other_running
        await other.wait_answers(30)
        await other.close()
        await eventually(
            lambda: asyncio.to_thread(lambda: gauge("lipsync_gateway_in_flight") == 0),
            what="nothing in flight",
        )
        peak = max(peak, gateway.sample()[0])
        dropped = (
            await asyncio.to_thread(gauge, "lipsync_gateway_dropped_frames_total", kind="c")
            - dropped0
        )
        received = []
        for _ in range(n):
            received.append(parse_inference_response(await asyncio.wait_for(slow.recv(), 30)))
        await slow.send(RequestB(system.model, n).serialize())  # a sentinel
        sentinel = parse_inference_response(await asyncio.wait_for(slow.recv(), 30))
    after = {name: p.sample() for name, p in system.probes().items()}

    frames = [r.frame_id for r in received]
    images = [r for r in received if isinstance(r, ResponseC)]
    given_up = [r for r in received if isinstance(r, ErrorResponseC)]
    assert dropped > 0
    assert sorted(frames) == list(range(n))  # one answer per request, none twice
    assert all(r.image[:2] == b"\xff\xd8" for r in images)
    assert len(given_up) == dropped
    assert all(r.error.startswith("slow_client: ") for r in given_up)
    assert isinstance(sentinel, ResponseC) and sentinel.frame_id == n  # nothing else pending
    assert normal.lost == normal.duplicates == normal.unexpected == 0
    assert normal.kinds() == {"ok": normal.sent} and normal.sent > 0
    # the gateway produced every one of the slow client's frames (+ the sentinel), ok
    outcomes = await asyncio.to_thread(gateway_outcomes, system.port)
    assert outcomes == {"ok": normal.sent + n + 1}
    assert peak - before["gateway"][0] < 48 * MIB  # 80 MB were produced for it
    report(
        "client that never reads (800 x 100 kB) beside a normal one",
        normal,
        recovery_s=0.0,
        memory=memory_line(before, after) + f"; gateway peak {peak / MIB:.0f} MiB",
        slow_sent=n,
        slow_images=len(images),
        slow_dropped=int(dropped),
    )


async def test_thousand_connections_opened_and_closed(system):
    """1,000 connections, 25 at a time; each sends a request and either reads its answer
    and closes, or leaves at once (half of them without a close handshake). The gateway's
    open fds and RSS come back to where they were; every connection was accepted once."""
    system.start_broker()
    system.start_null_worker("w1", delay_ms=2)
    system.start_gateway_process()
    await system.wait_ready("w1")
    gateway = system.probes()["gateway"]
    accepted0 = await asyncio.to_thread(
        gateway_metric, system, "lipsync_gateway_connections_accepted_total"
    )
    answered = 0

    async def visit(i: int) -> None:
        nonlocal answered
        async with connect(system.url, ping_interval=None, close_timeout=2) as ws:
            await ws.send(RequestB(system.model, i).serialize())
            if i % 3 == 0:
                answer = parse_inference_response(await asyncio.wait_for(ws.recv(), 30))
                assert isinstance(answer, ResponseC) and answer.frame_id == i
                answered += 1
            elif i % 3 == 1:
                ws.transport.abort()

    async def visits(start: int, count: int) -> None:
        sem = asyncio.Semaphore(25)

        async def one(i: int) -> None:
            async with sem:
                await visit(i)

        await asyncio.gather(*(one(i) for i in range(start, start + count)))

    await visits(0, 100)  # warm up: what any server allocates once
    await gateway_settled(system)
    before = {name: p.sample() for name, p in system.probes().items()}
    started = time.monotonic()
    await visits(100, 1000)
    elapsed = time.monotonic() - started
    await gateway_settled(system)
    stats = await system.wait_idle()
    after = {name: p.sample() for name, p in system.probes().items()}

    accepted = (
        await asyncio.to_thread(
            gateway_metric, system, "lipsync_gateway_connections_accepted_total"
        )
        - accepted0
    )
    assert accepted == 1100
    assert answered == len([i for i in range(1100) if i % 3 == 0])
    rss0, fds0 = before["gateway"]
    rss1, fds1 = gateway.sample()
    assert fds1 <= fds0 + 2
    assert rss1 - rss0 < 32 * MIB
    assert stats["broker"]["pending"] == 0
    ledger = Ledger(sent=1000)
    print(f"1000 connections in {elapsed:.1f} s")
    report(
        "1,000 connections opened and closed",
        ledger,
        recovery_s=0.0,
        memory=memory_line(before, after),
        seconds=round(elapsed, 1),
    )


async def test_burst_far_above_capacity(system):
    """360 requests at once from 12 clients at a worker that holds 4 and a broker queue of
    20: the excess is answered ``overloaded`` at once (not queued until its deadline), the
    rest served; every request exactly once, and the broker's own overload count agrees."""
    deadline_s = 10.0
    system.start_broker("--queue-limit", "20")
    system.start_null_worker("w1", delay_ms=20, max_batch=2, capacity=4, max_delay_ms=1)
    system.start_gateway_process(timeout_ms=int(deadline_s * 1000))
    await system.wait_ready("w1")
    before = {name: p.sample() for name, p in system.probes().items()}
    ledger = Ledger()
    clients = [
        LedgerClient(system.url, system.model, ledger, first_frame=i * 10_000_000, window=30)
        for i in range(12)
    ]
    for c in clients:
        await c.open()
    started = time.monotonic()
    await asyncio.gather(*(c.burst(30) for c in clients))
    await asyncio.gather(*(c.wait_answers(deadline_s + 30) for c in clients))
    answered_in = max(o.answered_at for o in ledger.outcomes) - started
    for c in clients:
        await c.close()
    stats = await system.wait_idle()
    after = {name: p.sample() for name, p in system.probes().items()}

    kinds = ledger.kinds()
    assert ledger.lost == ledger.duplicates == ledger.unexpected == 0
    assert ledger.answered == ledger.sent == 360
    assert set(kinds) == {"ok", "overloaded"}, kinds  # none waited for its deadline
    assert kinds["overloaded"] >= 180
    assert kinds["overloaded"] == stats["broker"]["overloaded"]
    assert await asyncio.to_thread(gateway_outcomes, system.port) == kinds
    assert kinds["ok"] >= 24  # queue + worker capacity
    overloaded_wait = max(o.answered_at - o.sent_at for o in ledger.outcomes if o.kind != "ok")
    assert overloaded_wait < deadline_s  # refused at once: a queued one would wait it out
    report(
        "burst of 360 at capacity 4 + queue 20",
        ledger,
        recovery_s=0.0,
        memory=memory_line(before, after),
        burst_answered_in_s=round(answered_in, 2),
        slowest_overloaded_s=round(overloaded_wait, 2),
        deadline_s=deadline_s,
    )


async def test_pipelining_without_limit_against_a_stall_is_closed(system):
    """A client that keeps sending A requests while the worker of its model is stalled
    (every answer after the first waits behind it, in order): past ``max_undelivered``
    waiting answers the gateway closes it with 1008 and says why, its memory stays
    bounded, and another connection's frames all arrive meanwhile."""
    system.start_broker()
    system.start_null_worker("w1", delay_ms=2)
    stuck = system.processes.start(
        "worker", "--backend", "null", "--broker", system.backend, "--models", "stuck",
        "--worker-id", "stuck", env=FAST_BEATS, name="stuck",
    )  # fmt: skip
    system.start_gateway_process(env={"LIPSYNC_MAX_UNDELIVERED": "600"})
    await system.wait_ready("w1", "stuck")
    gateway = psutil.Process(system.gateway.pid)
    rss_before = gateway.memory_info().rss
    stuck.send_signal(signal.SIGSTOP)
    try:
        async with (
            connect(system.url) as flood,
            connect(system.url) as other,
        ):
            for frame in range(2000):
                try:
                    await flood.send(RequestA("stuck", frame).serialize())
                except ConnectionClosed:
                    break
            others = []
            for frame in range(50):
                await other.send(RequestA(system.model, frame).serialize())
                others.append(await asyncio.wait_for(other.recv(), 10))
            with pytest.raises(ConnectionClosed):
                while True:
                    await asyncio.wait_for(flood.recv(), 10)
            rss_after = gateway.memory_info().rss
        assert flood.close_code == 1008
        assert flood.close_reason == "more than 600 answers undelivered"
        assert all(len(a) == 20_000 for a in others)
        assert gateway_metric(system, "lipsync_gateway_overflow_closes_total") == 1
        assert gateway_metric(system, "lipsync_gateway_dropped_frames_total", kind="a") == 0
        assert rss_after - rss_before < 16 * MIB
    finally:
        stuck.send_signal(signal.SIGCONT)
    await gateway_settled(system)
