"""Broker and gateway faults, end to end: WebSocket clients keep sending while the broker is
SIGKILLed and restarted, or while the gateway is SIGKILLed and restarted on its port.

Rule 3 (DESIGN.md section 3): what was in flight when the broker died fails with a clear
error, new requests fail fast while it is away, and service resumes by itself once it is
back (the same worker processes re-register, the gateway reconnects). Clients of a killed
gateway see their connection close, reconnect, and carry on. In both cases every request
is accounted for exactly once (``lipsync.bench.ledger``).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter

import pytest
from fault_harness import (
    answered_at_least,
    eventually,
    gateway_outcomes,
    make_clients,
    memory_line,
    report,
    run_clients,
)
from gateway_harness import metric

from lipsync.bench.ledger import CLOSED, Ledger


pytestmark = pytest.mark.fault

BROKER_GAP = {"broker_unavailable"}
"""What requests sent while the broker is away may end with: the gateway fails them at once
while it has no connection to the broker. A restarted broker that has not heard from its
workers yet holds requests for their models until they register (its warm-up), so
``unknown_model`` is not among them."""


@pytest.fixture
def system(fault_system):
    return fault_system


@pytest.mark.parametrize("gap", ["noticed", "quick"])
async def test_broker_killed_and_restarted_mid_stream(system, gap):
    """The broker is SIGKILLed under load and restarted, either once the gateway has
    declared it dead (``noticed``: its requests in flight fail at that moment with
    ``broker_unavailable``) or at once (``quick``: the gateway never notices, and what was
    in flight at the dead broker ends with ``deadline_exceeded`` at its deadline). Either
    way each request gets one answer, new requests fail fast meanwhile, the same worker
    processes re-register, and service resumes by itself."""
    timeout_ms = 10_000 if gap == "noticed" else 2_000
    system.start_broker()
    w1 = system.start_null_worker("w1", delay_ms=10)
    w2 = system.start_null_worker("w2", delay_ms=10)
    system.start_gateway_process(timeout_ms=timeout_ms)
    await system.wait_ready("w1", "w2")
    ledger = Ledger()
    stop = asyncio.Event()
    running = asyncio.create_task(run_clients(make_clients(system, ledger, 3, 6), stop))
    await answered_at_least(ledger, 150)
    before = {n: p.sample() for n, p in system.probes().items()}

    killed_at = time.monotonic()
    assert system.broker is not None
    system.broker.send_signal(signal.SIGKILL)
    system.broker.wait()
    if gap == "noticed":
        await eventually(
            lambda: asyncio.to_thread(lambda: not system.health(system.port)[1]["broker"]),
            what="the gateway to declare the broker dead",
        )
    restarted_at = time.monotonic()
    system.start_broker()
    await system.wait_workers("w1", "w2")
    await asyncio.to_thread(system.wait_models, system.port, system.model)
    healthy_at = time.monotonic()  # the gateway sees the new broker and its workers
    ok_healthy = ledger.kinds()["ok"]
    await eventually(
        lambda: ledger.kinds()["ok"] >= ok_healthy + 300, timeout=90, what="service back"
    )
    stop.set()
    await running
    after = {n: p.sample() for n, p in system.probes().items()}
    stats = await system.wait_idle(sessions_dropped=True)

    assert ledger.lost == ledger.duplicates == ledger.unexpected == 0
    assert ledger.answered == ledger.sent
    assert await asyncio.to_thread(gateway_outcomes, system.port) == ledger.kinds()
    # what the dead broker held: every request sent before the kill and not answered by then
    held = Counter(
        o.kind for o in ledger.outcomes if o.sent_at < killed_at < o.answered_at and o.kind != "ok"
    )
    if gap == "noticed":
        assert set(held) == {"broker_unavailable"}, held
    else:
        # the new broker's first heartbeat fails what the old one held (sent before its
        # last heartbeat); what was sent after that may have been lost in the gap too, and
        # ends at its deadline
        assert held["broker_unavailable"] > 0, held
        assert set(held) <= {"broker_unavailable", "deadline_exceeded"}, held
    errors = ledger.errors()
    assert set(errors) <= BROKER_GAP | {"deadline_exceeded"}, errors
    # once the gateway reports the new broker healthy, nothing fails any more
    late = Counter(o.kind for o in ledger.outcomes if o.sent_at > healthy_at)
    assert late == {"ok": late.total()} and late.total() >= 250
    assert sorted(w["pid"] for w in stats["workers"]) == sorted([w1.pid, w2.pid])
    assert w1.poll() is None and w2.poll() is None
    report(
        f"broker SIGKILL mid-stream, restarted ({gap})",
        ledger,
        recovery_s=ledger.first_ok_sent_after(restarted_at),
        memory=memory_line(before, after),
        outage_s=round(restarted_at - killed_at, 2),
        failures_until_s=round(ledger.last_failure_after(killed_at), 2),
        in_flight_at_kill=dict(held),
    )


async def test_gateway_killed_and_restarted(system):
    system.start_broker()
    system.start_null_worker("w1", delay_ms=10)
    system.start_null_worker("w2", delay_ms=10)
    system.start_gateway_process()
    await system.wait_ready("w1", "w2")
    ledger = Ledger()
    stop = asyncio.Event()
    clients = make_clients(system, ledger, 4, 6, reconnect=True)
    running = asyncio.create_task(run_clients(clients, stop))
    await answered_at_least(ledger, 150)
    before = {n: p.sample() for n, p in system.probes().items()}

    assert system.gateway is not None
    system.gateway.send_signal(signal.SIGKILL)
    system.gateway.wait()
    await eventually(
        lambda: all(c.ws is None or c.reader_done for c in clients),
        what="every client to see its connection close",
    )
    restarted_at = time.monotonic()
    system.start_gateway_process()
    await eventually(
        lambda: all(c.connections == 2 for c in clients), timeout=60, what="clients reconnected"
    )
    ok_after = ledger.kinds()["ok"]
    await eventually(
        lambda: ledger.kinds()["ok"] >= ok_after + 300, timeout=60, what="service back"
    )
    stop.set()
    await running
    after = {n: p.sample() for n, p in system.probes().items()}
    stats = await system.wait_idle()

    assert ledger.lost == ledger.duplicates == ledger.unexpected == 0
    kinds = ledger.kinds()
    assert set(kinds) == {"ok", CLOSED}, kinds
    assert 1 <= kinds[CLOSED] <= 4 * 6  # what was outstanding when it died
    assert ledger.answered + kinds[CLOSED] == ledger.sent
    assert [c.connections for c in clients] == [2] * 4
    assert await asyncio.to_thread(metric, system.port, "lipsync_gateway_connections") == 0
    report(
        "gateway SIGKILL, restarted on its port",
        ledger,
        recovery_s=ledger.first_ok_sent_after(restarted_at),
        memory=memory_line(before, after),
        connection_closed=kinds[CLOSED],
        broker_undeliverable=stats["broker"]["undeliverable"],
    )
