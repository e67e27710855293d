"""Worker faults through the whole system, end to end: WebSocket clients -> gateway -> broker
-> workers, all real processes. A worker is SIGKILLed mid-batch, stalled with SIGSTOP until
the broker declares it dead and then resumed, or loses its package directory while serving.

Every request is accounted for (``lipsync.bench.ledger``): each client gives every request
its own frame id, so each answer names the one request it belongs to, and a second answer
for an id is a duplicate. test_broker.py checks the same faults at the broker's own door;
here the gateway is in the path too, and the assertions are the client's.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time

import pytest
from fault_harness import (
    FaultSystem,
    answered_at_least,
    eventually,
    gateway_outcomes,
    make_clients,
    memory_line,
    report,
    run_clients,
)

from lipsync.bench.ledger import Ledger, LedgerClient
from shared.errors import ErrorCode, ServiceError


pytestmark = pytest.mark.fault


@pytest.fixture
def system(fault_system):
    return fault_system


async def assert_exactly_once(system: FaultSystem, ledger: Ledger) -> None:
    """Every request answered once, and the gateway's own count of how each ended agrees
    with the clients' outcome by outcome."""
    assert ledger.lost == 0
    assert ledger.duplicates == 0
    assert ledger.unexpected == 0
    assert ledger.answered == ledger.sent == len(ledger.outcomes)
    assert await asyncio.to_thread(gateway_outcomes, system.port) == ledger.kinds()


async def test_worker_sigkill_mid_batch(system):
    """Three workers, every one full; one is SIGKILLed while it holds a batch. Its requests
    go once more to the others (rule 4): every request is answered ok, exactly once."""
    system.start_broker()
    victim = system.start_null_worker("victim", delay_ms=15, max_batch=4)
    system.start_null_worker("w2", delay_ms=15, max_batch=4)
    system.start_null_worker("w3", delay_ms=15, max_batch=4)
    system.start_gateway_process()
    await system.wait_ready("victim", "w2", "w3")
    ledger = Ledger()
    stop = asyncio.Event()
    # 4 x 10 outstanding > 3 x capacity 8: every worker always holds a full load
    running = asyncio.create_task(run_clients(make_clients(system, ledger, 4, 10), stop))
    await answered_at_least(ledger, 100)
    before = {n: p.sample() for n, p in system.probes().items()}

    async def victim_busy() -> bool:
        stats = await system.stats()
        return stats is not None and any(
            w["id"] == "victim" and w["in_flight"] >= 4 for w in stats["workers"]
        )

    await eventually(victim_busy, what="the victim to hold a batch")
    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    stats = await system.wait_workers("w2", "w3")
    await answered_at_least(ledger, ledger.answered + 300)
    stop.set()
    await running
    after = {n: p.sample() for n, p in system.probes().items()}
    stats = await system.wait_idle()

    await assert_exactly_once(system, ledger)
    assert ledger.kinds() == {"ok": ledger.sent}
    assert stats["broker"]["redispatched"] >= 1  # it did hold requests when it died
    report(
        "worker SIGKILL mid-batch",
        ledger,
        recovery_s=ledger.last_failure_after(killed_at),
        memory=memory_line(before, after),
        redispatched=stats["broker"]["redispatched"],
        slowest_answer_s=round(ledger.max_latency(killed_at - 10), 2),
    )


async def test_worker_sigstop_until_dead_then_sigcont(system):
    """A worker hung with SIGSTOP (its socket stays connected) until the broker declares it
    dead; its requests go to the other worker. Resumed with SIGCONT, it finishes its old
    batch: those late answers must not reach any client (they were answered already), and
    it registers again and serves."""
    system.start_broker()
    stalled = system.start_null_worker("stalled", delay_ms=15, max_batch=4)
    system.start_null_worker("w2", delay_ms=15, max_batch=4)
    system.start_gateway_process()
    await system.wait_ready("stalled", "w2")
    ledger = Ledger()
    stop = asyncio.Event()
    running = asyncio.create_task(run_clients(make_clients(system, ledger, 3, 8), stop))
    await answered_at_least(ledger, 100)
    before = {n: p.sample() for n, p in system.probes().items()}

    stopped_at = time.monotonic()
    os.kill(stalled.pid, signal.SIGSTOP)
    try:
        stats = await system.wait_workers("w2")  # declared dead
        declared_dead_s = time.monotonic() - stopped_at
        redispatched = stats["broker"]["redispatched"]
        await answered_at_least(ledger, ledger.answered + 100)
    finally:
        os.kill(stalled.pid, signal.SIGCONT)
    stats = await system.wait_workers("stalled", "w2")  # registered again
    served_before = next(w["served"] for w in stats["workers"] if w["id"] == "stalled")

    async def stalled_serves_again() -> bool:
        s = await system.stats()
        return s is not None and any(
            w["id"] == "stalled" and w["served"] > served_before + 20 for w in s["workers"]
        )

    await eventually(stalled_serves_again, what="the resumed worker to serve again")
    stop.set()
    await running
    after = {n: p.sample() for n, p in system.probes().items()}
    stats = await system.wait_idle(sessions_dropped=True)

    await assert_exactly_once(system, ledger)
    assert ledger.kinds() == {"ok": ledger.sent}
    assert redispatched >= 1  # it held requests when it stalled
    assert stalled.poll() is None
    assert {w["id"]: w["pid"] for w in stats["workers"]}["stalled"] == stalled.pid
    report(
        "worker SIGSTOP until declared dead, then SIGCONT",
        ledger,
        recovery_s=ledger.last_failure_after(stopped_at),
        memory=memory_line(before, after),
        declared_dead_s=round(declared_dead_s, 2),
        redispatched=redispatched,
        stale_dropped_at_broker=stats["broker"]["stale"],
        slowest_answer_s=round(ledger.max_latency(stopped_at - 10), 2),
    )


async def test_worker_loses_its_package_files(system, tiny_package, tmp_path):
    """A torch worker whose package directory is renamed, then deleted, while it serves:
    frames and audio features are memory-mapped, so requests are still answered (every one
    exactly once, and ok); a reload of the package fails with an error that says why; the
    worker survives and keeps serving."""
    models = tmp_path / "models"
    shutil.copytree(tiny_package, models, symlinks=True)  # caches included: no decode
    system.model = "tiny"
    system.start_broker()
    worker = system.processes.start(
        "worker", "--backend", "torch", "--device", "cpu", "--threads", "1",
        "--broker", system.backend, "--models-dir", str(models), "--worker-id", "torch",
        "--max-batch", "2", env={"LIPSYNC_HEARTBEAT_S": "0.2", "LIPSYNC_LIVENESS": "10"},
        name="torch-worker",
    )  # fmt: skip
    system.workers["torch"] = worker
    system.start_gateway_process(timeout_ms=30_000)
    await system.wait_workers("torch", timeout=180)
    await asyncio.to_thread(system.wait_models, system.port, "tiny", timeout=60)
    ledger = Ledger()
    before = {n: p.sample() for n, p in system.probes().items()}

    async def one_round() -> None:
        # 16 frames: one connection per round asks for each once, 4 at a time
        c = LedgerClient(system.url, "tiny", ledger, window=4)
        await c.open()
        await c.run(asyncio.Event(), limit=16)
        await c.wait_answers(120)
        await c.close()

    await one_round()
    (models / "tiny").rename(models / "tiny.moved")
    await one_round()
    shutil.rmtree(models / "tiny.moved")
    await one_round()
    await one_round()

    client = await system.client()
    with pytest.raises(ServiceError) as err:
        await client.request("load_package", model="tiny", ttl_ms=60_000)
    assert err.value.code is ErrorCode.UNKNOWN_MODEL
    assert "tiny" in err.value.message
    await one_round()  # the failed reload left the loaded model serving
    after = {n: p.sample() for n, p in system.probes().items()}
    stats = await system.wait_idle()

    await assert_exactly_once(system, ledger)
    assert ledger.kinds() == {"ok": 16 * 5}
    assert worker.poll() is None
    assert [(w["id"], w["pid"], w["models"]) for w in stats["workers"]] == [
        ("torch", worker.pid, ["tiny"])
    ]
    report(
        "worker's package dir renamed, then deleted",
        ledger,
        recovery_s=0.0,
        memory=memory_line(before, after),
        reload_error=f"{err.value.code.value}: {err.value.message}",
    )


async def test_worker_counters_balance_after_losing_its_broker(system):
    """A worker that loses its broker while it holds requests drops them (nobody is left to
    take the answers). Its own counters must still account for each request once:
    received = served + errors + dropped, as they do for any other worker."""
    system.start_broker()
    worker = system.start_null_worker("w1", delay_ms=1500, max_batch=1, capacity=4)
    client = await system.client()
    await system.wait_workers("w1")
    asks = [
        asyncio.create_task(client.request("infer", model="m", frame=i, ttl_ms=30_000))
        for i in range(4)
    ]

    async def held() -> bool:
        stats = await system.stats()
        return stats is not None and stats["workers"][0]["in_flight"] == 4

    await eventually(held, what="the worker to hold 4 requests")
    assert system.broker is not None
    system.broker.send_signal(signal.SIGKILL)
    system.broker.wait()
    answers = await asyncio.gather(*asks, return_exceptions=True)
    assert all(
        isinstance(a, ServiceError) and a.code is ErrorCode.BROKER_UNAVAILABLE for a in answers
    )
    system.start_broker()
    await system.wait_workers("w1")

    async def settled() -> dict[str, int] | None:
        stats = await system.stats()
        if stats is None or not stats["workers"]:
            return None
        c = stats["workers"][0]["counters"]
        if "received" not in c:  # registered, but no heartbeat with its counters yet
            return None
        return c if c["served"] + c["errors"] + c["dropped"] >= c["received"] == 4 else None

    counters = await eventually(settled, what="the worker's counters to settle")
    # it knew it had lost its broker, by its own liveness timeout (``reconnects``) or told
    # by the new broker to register again (a restart faster than the liveness period)
    assert counters["dropped"] >= 1
    assert counters["received"] == counters["served"] + counters["errors"] + counters["dropped"]
    assert worker.poll() is None
