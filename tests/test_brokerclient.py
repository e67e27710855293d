"""BrokerClient against a broker played by the test (a real asyncio ROUTER socket)."""

from __future__ import annotations

import asyncio

import pytest
import zmq
import zmq.asyncio

from gateway.brokerclient import BrokerClient
from shared.envelope import Cancel, Error, Heartbeat, Reply, Request, decode, encode
from shared.errors import ErrorCode, ServiceError


class FakeBroker:
    """Answers heartbeats while ``alive``; records requests and cancels; answers a
    request only when its op is "echo" (twice when "echo-twice")."""

    def __init__(self) -> None:
        self.context = zmq.asyncio.Context()
        self.sock = self.context.socket(zmq.ROUTER)
        self.sock.linger = 0
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.alive = True
        self.instance = "first"  # sent in heartbeats; change it to play a restarted broker
        self.requests: list[Request] = []
        self.cancels: list[int] = []
        self.task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            identity, *frames = await self.sock.recv_multipart()
            header = decode(frames).header
            if not self.alive:
                continue
            if isinstance(header, Heartbeat):
                beat = Heartbeat(instance=self.instance)
                await self.sock.send_multipart([identity, *encode(beat)])
            elif isinstance(header, Cancel):
                self.cancels.append(header.id)
            elif isinstance(header, Request):
                self.requests.append(header)
                reply = encode(Reply(id=header.id, worker="fake"), [b"JPEG"])
                if header.op == "fail":
                    reply = encode(Error(id=header.id, code="unknown_model", message="no"))
                for _ in range({"echo": 1, "fail": 1, "echo-twice": 2}.get(header.op, 0)):
                    await self.sock.send_multipart([identity, *reply])

    async def close(self) -> None:
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass
        self.sock.close()
        self.context.term()


@pytest.fixture
async def broker():
    fake = FakeBroker()
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture
async def client(broker):
    c = BrokerClient(broker.endpoint, heartbeat_s=0.1, liveness=3, grace_s=0.1)
    await c.start(wait_s=20)
    try:
        yield c
    finally:
        await c.close()


async def test_reply_and_error(broker, client):
    assert client.broker_alive
    answer = await client.request("echo", model="m", frame=3, opts={"mode": "crop"})
    assert answer.payload == [b"JPEG"]
    assert answer.header.worker == "fake"
    assert broker.requests[-1] == Request(
        id=answer.header.id, op="echo", model="m", frame=3, opts={"mode": "crop"}
    )
    with pytest.raises(ServiceError) as err:
        await client.request("fail")
    assert err.value.code is ErrorCode.UNKNOWN_MODEL


async def test_ids_are_unique_and_duplicates_are_counted(broker, client):
    await asyncio.gather(*(client.request("echo-twice") for _ in range(20)))
    ids = [r.id for r in broker.requests]
    assert len(set(ids)) == 20
    await asyncio.wait_for(_until(lambda: client.counters["unmatched"] == 20), 20)
    assert client.counters["answered"] == 20


async def test_no_answer_means_deadline_exceeded_and_cancel(broker, client):
    with pytest.raises(ServiceError) as err:
        await client.request("silent", ttl_ms=50)
    assert err.value.code is ErrorCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(_until(lambda: broker.cancels == [broker.requests[-1].id]), 20)
    assert client.in_flight == 0


async def test_cancelled_task_sends_cancel(broker, client):
    task = asyncio.create_task(client.request("silent", ttl_ms=60_000))
    await asyncio.wait_for(_until(lambda: broker.requests), 20)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(_until(lambda: broker.cancels == [broker.requests[0].id]), 20)
    assert client.counters["cancelled"] == 1


async def test_in_flight_is_bounded(broker):
    client = BrokerClient(broker.endpoint, heartbeat_s=0.1, max_in_flight=2)
    await client.start(wait_s=20)
    try:
        held = [asyncio.create_task(client.request("silent", ttl_ms=60_000)) for _ in range(2)]
        await asyncio.wait_for(_until(lambda: client.in_flight == 2), 20)
        with pytest.raises(ServiceError) as err:
            await client.request("echo")
        assert err.value.code is ErrorCode.OVERLOADED
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
    finally:
        await client.close()


async def test_silent_broker_fails_in_flight_then_comes_back(broker, client):
    """Rule 3 on the gateway side: in-flight requests fail together, new ones fail fast,
    and the same client works again once the broker speaks."""
    waiting = asyncio.create_task(client.request("silent", ttl_ms=60_000))
    await asyncio.wait_for(_until(lambda: broker.requests), 20)
    broker.alive = False
    with pytest.raises(ServiceError) as err:
        await waiting
    assert err.value.code is ErrorCode.BROKER_UNAVAILABLE
    assert not client.broker_alive
    with pytest.raises(ServiceError) as err:
        await client.request("echo")
    assert err.value.code is ErrorCode.BROKER_UNAVAILABLE

    broker.alive = True
    await asyncio.wait_for(_until(lambda: client.broker_alive), 20)
    assert (await client.request("echo")).payload == [b"JPEG"]


async def test_start_without_broker_then_fail_fast():
    context = zmq.asyncio.Context()
    try:
        client = BrokerClient("tcp://127.0.0.1:1", heartbeat_s=0.05, context=context)
        await client.start(wait_s=0.1)
        with pytest.raises(ServiceError) as err:
            await client.request("echo")
        assert err.value.code is ErrorCode.BROKER_UNAVAILABLE
        await client.close()
    finally:
        context.term()


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


async def test_a_restarted_broker_fails_at_once_what_the_old_one_held(broker, client):
    """A heartbeat from a new broker instance fails the requests sent before the old one's
    last heartbeat (they went down with it) at once, not at their deadline; requests sent
    since keep waiting, and an answer to them still arrives."""
    held = asyncio.create_task(client.request("hold", ttl_ms=30_000))
    await asyncio.sleep(0.35)  # a few heartbeats from the "first" broker after it was sent
    assert not held.done()
    broker.instance = "second"
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(ServiceError) as err:
        await held
    assert err.value.code == ErrorCode.BROKER_UNAVAILABLE and "restarted" in err.value.message
    assert loop.time() - t0 < 5  # its deadline was 30 s away
    assert client.counters["broker_restarts"] == 1 and client.counters["broker_lost"] == 1
    answer = await client.request("echo", model="m")  # the new instance serves
    assert answer.payload == [b"JPEG"]
    assert client.broker_alive and client.counters["broker_restarts"] == 1


async def test_requests_sent_after_the_last_old_heartbeat_keep_waiting(broker):
    """Sent after the old broker's last heartbeat, a request may have reached the new one:
    a restart seen then does not fail it blindly (it waits for its answer or deadline)."""
    # A long liveness period: the old broker's silence below must not trip it.
    client = BrokerClient(broker.endpoint, heartbeat_s=0.1, liveness=30, grace_s=0.1)
    await client.start(wait_s=20)
    try:
        await asyncio.sleep(0.25)  # the client knows "first"
        broker.alive = False
        # A beat of "first" sent just before may still be on its way; received after the
        # send it would (rightly) count the request as held by "first". Let it land.
        await asyncio.sleep(0.5)
        waiting = asyncio.create_task(client.request("hold", ttl_ms=1_500))
        await asyncio.sleep(0.05)
        broker.instance, broker.alive = "second", True
        await asyncio.wait_for(_until(lambda: client.counters["broker_restarts"] == 1), 20)
        assert client.counters["broker_lost"] == 0
        assert not waiting.done()
        with pytest.raises(ServiceError) as err:
            await waiting
        assert err.value.code == ErrorCode.DEADLINE_EXCEEDED
    finally:
        await client.close()


async def test_a_dropped_connection_fails_what_was_sent_over_it(broker, client):
    """The broker process dies (its socket closes): requests in flight went down with the
    connection, and fail at once with ``broker_unavailable``, not at their deadlines."""
    held = asyncio.create_task(client.request("hold", ttl_ms=30_000))
    await asyncio.sleep(0.05)
    assert not held.done()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await broker.close()
    with pytest.raises(ServiceError) as err:
        await held
    assert err.value.code == ErrorCode.BROKER_UNAVAILABLE
    assert "connection to broker lost" in err.value.message
    assert loop.time() - t0 < 5  # its deadline was 30 s away; the message says which path
    assert client.counters["broker_lost"] == 1
