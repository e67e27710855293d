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
                await self.sock.send_multipart([identity, *encode(Heartbeat())])
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
