"""The worker runtime against a broker played by the test (a real ROUTER socket), the null
backend, and the real torch engine behind a real broker.

The fake broker lets a test see exactly what a worker sends (READY, heartbeats, answers)
and send it what a real broker rarely would (DISCONNECT, silence, garbage).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter

import cv2
import msgpack
import numpy as np
import pytest
import zmq
from cluster import Cluster

from shared.config import WorkerConfig
from shared.envelope import (
    Cancel,
    Disconnect,
    Error,
    Heartbeat,
    Kind,
    Ready,
    Reply,
    Request,
    decode,
    encode,
)
from shared.errors import ErrorCode, ServiceError
from workers.null import NullBackend, fixed_jpeg
from workers.runtime import WorkerRuntime, reconnect_backoff


class FakeBroker:
    """A ROUTER that answers heartbeats (unless told not to) and hands the test the rest."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.answer_heartbeats = True
        self.heartbeats: list[Heartbeat] = []

    def recv(self, timeout: float = 20.0):
        """The next message that is not a heartbeat: (identity, Message)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000)):
                raise AssertionError("fake broker: nothing received in time")
            identity, *frames = self.sock.recv_multipart()
            message = decode(frames)
            if isinstance(message.header, Heartbeat):
                self.heartbeats.append(message.header)
                if self.answer_heartbeats:
                    self.send(identity, Heartbeat())
                continue
            return identity, message

    def recv_until(self, predicate, timeout: float = 20.0):
        """Messages up to and including the first one ``predicate`` accepts."""
        seen = []
        while True:
            identity, message = self.recv(timeout)
            seen.append(message)
            if predicate(message):
                return identity, seen

    def wait_heartbeat(self, predicate, timeout: float = 20.0) -> Heartbeat:
        """Serve heartbeats until one satisfies ``predicate``; nothing else may arrive."""
        deadline = time.monotonic() + timeout
        while not any(predicate(h) for h in self.heartbeats):
            left = deadline - time.monotonic()
            assert left > 0, "no such heartbeat"
            if self.sock.poll(int(left * 1000)):
                identity, *frames = self.sock.recv_multipart()
                message = decode(frames)
                assert isinstance(message.header, Heartbeat), message
                self.heartbeats.append(message.header)
                if self.answer_heartbeats:
                    self.send(identity, Heartbeat())
        return next(h for h in self.heartbeats if predicate(h))

    def send(self, identity: bytes, header, payload=()) -> None:
        self.sock.send_multipart([identity, *encode(header, payload)])

    def close(self) -> None:
        self.sock.close()
        self.context.term()


def config(endpoint: str, **overrides) -> WorkerConfig:
    values = dict(
        broker=endpoint,
        backend="null",
        heartbeat_s=0.1,
        liveness=5,
        max_batch=4,
        max_delay_ms=2.0,
        worker_id="t1",
    )
    values.update(overrides)
    return WorkerConfig(**values)


class Running:
    """A WorkerRuntime serving a NullBackend in a thread."""

    def __init__(self, cfg: WorkerConfig, models=("m",)) -> None:
        backend = NullBackend.from_config(
            WorkerConfig(
                models=",".join(models), null_delay_ms=cfg.null_delay_ms, null_jpeg_bytes=1000
            )
        )
        self.runtime = WorkerRuntime(cfg, backend, drain_timeout_s=10)
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        self.exit_code = self.runtime.run()

    def stop(self) -> None:
        self.runtime.stop()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


@pytest.fixture
def broker():
    fake = FakeBroker()
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture
def start_worker(broker):
    started: list[Running] = []

    def start(**overrides) -> tuple[Running, bytes, Ready]:
        models = overrides.pop("models", ("m",))
        running = Running(config(broker.endpoint, **overrides), models)
        started.append(running)
        identity, message = broker.recv()
        assert isinstance(message.header, Ready)
        return running, identity, message.header

    try:
        yield start
    finally:
        for running in started:
            running.stop()


def request(rid: int, frame: int = 0, op: str = "infer", ttl_ms: int = 10_000, **opts):
    return Request(id=rid, op=op, model="m", frame=frame, ttl_ms=ttl_ms, opts=opts)


# -- null backend --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1000, 20_000, 200_000])
def test_fixed_jpeg_has_the_size_asked_for_and_decodes(size):
    jpeg = fixed_jpeg(size)
    assert len(jpeg) == size
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (64, 64, 3)


def test_fixed_jpeg_smaller_than_possible_is_the_bare_image():
    jpeg = fixed_jpeg(10)
    assert jpeg[:2] == b"\xff\xd8" and jpeg[-2:] == b"\xff\xd9"
    assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR) is not None


def test_null_models_by_name_then_packages_then_default(tmp_path):
    """--models names win; else the packages of the models dir; else one model "null"."""
    package = tmp_path / "avatar"
    package.mkdir()
    info = {"videos": {"full_body_img": {"frame_count": 7, "fps": 30}}}
    (package / "package_info.json").write_text(json.dumps(info))

    named = NullBackend.from_config(WorkerConfig(models="a,b", models_dir=str(tmp_path)))
    assert sorted(named.models()) == ["a", "b"]
    found = NullBackend.from_config(WorkerConfig(models_dir=str(tmp_path))).models()
    assert list(found) == ["avatar"]
    assert (found["avatar"].frame_count, found["avatar"].fps) == (7, 30.0)
    empty = NullBackend.from_config(WorkerConfig(models_dir=str(tmp_path / "none")))
    assert list(empty.models()) == ["null"]


# -- runtime against a fake broker ---------------------------------------------------------


def test_ready_then_reply_with_jpeg(broker, start_worker):
    """READY announces capacity (2 x max batch) and models; an infer gets a REPLY whose
    payload is the JPEG; heartbeats carry the worker's counters."""
    _, identity, ready = start_worker(max_batch=3)
    assert (ready.worker, ready.capacity, ready.backend) == ("t1", 6, "null")
    assert ready.models["m"]["frame_count"] == 100

    broker.send(identity, request(1, frame=5, mode="crop", quality=50))
    _, message = broker.recv()
    assert isinstance(message.header, Reply)
    assert message.header.id == 1
    assert message.header.worker == "t1"
    assert message.header.bounds == [480.0, 160.0, 800.0, 480.0]
    assert message.payload[0][:2] == b"\xff\xd8"
    assert message.header.timings["batch"] == 1

    beat = broker.wait_heartbeat(lambda h: h.stats.get("served") == 1)
    assert beat.stats["computed"] == 1
    assert beat.in_flight == 0


def test_batches_up_to_max_batch(broker, start_worker):
    """Requests that arrive together are computed together, max_batch at a time."""
    _, identity, _ = start_worker(max_batch=4, capacity=8, max_delay_ms=500)
    for rid in range(8):
        broker.send(identity, request(rid, frame=rid))
    answers = [broker.recv()[1].header for _ in range(8)]
    assert sorted(a.id for a in answers) == list(range(8))
    assert [a.timings["batch"] for a in answers] == [4] * 8


def test_one_bad_request_is_one_error(broker, start_worker):
    """Batch-mates of a bad request are served; each bad one gets its own error."""
    _, identity, _ = start_worker(max_batch=4, max_delay_ms=500)
    broker.send(identity, request(1, frame=1))
    broker.send(identity, request(2, frame=999))  # out of range: fails inside the batch
    broker.send(identity, request(3, frame=2, quality=1000))  # refused before batching
    broker.send(identity, request(4, frame=3))
    broker.send(identity, Request(id=5, op="stats"))  # not a worker op
    broker.send(identity, Request(id=6, op="infer", model="other", frame=0))
    answers = {m.header.id: m.header for m in (broker.recv()[1] for _ in range(6))}
    assert {i for i, a in answers.items() if isinstance(a, Reply)} == {1, 4}
    codes = {i: a.code for i, a in answers.items() if isinstance(a, Error)}
    assert codes == {
        2: "frame_out_of_range",
        3: "bad_request",
        5: "bad_request",
        6: "unknown_model",
    }


def test_expired_request_is_answered_not_computed(broker, start_worker):
    running, identity, _ = start_worker(null_delay_ms=300, max_batch=1, max_delay_ms=0)
    broker.send(identity, request(1))
    broker.send(identity, request(2, ttl_ms=50))  # queued behind a 300 ms batch
    answers = {m.header.id: m.header for m in (broker.recv()[1] for _ in range(2))}
    assert isinstance(answers[1], Reply)
    assert answers[2].code == "deadline_exceeded"
    counters = running.runtime.counters.snapshot()
    assert (counters["computed"], counters["expired"]) == (1, 1)


def test_cancel_removes_queued_request(broker, start_worker):
    running, identity, _ = start_worker(null_delay_ms=300, max_batch=1, max_delay_ms=0)
    broker.send(identity, request(1))
    broker.send(identity, request(2))
    broker.send(identity, Cancel(id=2))
    answers = {m.header.id: m.header for m in (broker.recv()[1] for _ in range(2))}
    assert isinstance(answers[1], Reply)
    assert answers[2].code == "cancelled"
    assert running.runtime.counters.snapshot()["computed"] == 1


def test_video_frame(broker, start_worker):
    _, identity, _ = start_worker()
    broker.send(identity, request(1, op="video_frame", frame=2, video_type="crops_328"))
    broker.send(identity, request(2, op="video_frame", frame=2, video_type="nope"))
    answers = {m.header.id: m for m in (broker.recv()[1] for _ in range(2))}
    assert answers[1].payload[0][:2] == b"\xff\xd8"
    assert answers[2].header.code == "unknown_video"


def test_heartbeats_flow_while_a_batch_runs(broker, start_worker):
    """Rule 7: the I/O thread heartbeats during a long forward pass."""
    _, identity, _ = start_worker(null_delay_ms=1500, max_batch=1)
    broker.heartbeats.clear()
    broker.send(identity, request(1))
    _, message = broker.recv()
    assert isinstance(message.header, Reply)
    assert len(broker.heartbeats) >= 5  # 1.5 s of compute at 0.1 s intervals
    assert any(h.in_flight == 1 for h in broker.heartbeats)


def test_disconnect_means_register_again_and_forget(broker, start_worker):
    """DISCONNECT from the broker: READY again, and answers of requests held before are
    never sent (the broker reassigned them)."""
    running, identity, _ = start_worker(null_delay_ms=300, max_batch=1, max_delay_ms=0)
    broker.send(identity, request(1))
    broker.send(identity, Disconnect(reason="who are you"))
    again, message = broker.recv()
    assert isinstance(message.header, Ready)
    assert again == identity
    broker.send(identity, request(2))
    _, seen = broker.recv_until(lambda m: m.kind is Kind.REPLY and m.header.id == 2)
    assert [m.header.id for m in seen] == [2]  # nothing for request 1
    assert running.runtime.counters.snapshot()["dropped"] == 1


def test_reconnects_when_the_broker_goes_silent(broker, start_worker):
    """Rule 3: no heartbeat for liveness intervals: close, back off, reconnect, READY."""
    running, identity, _ = start_worker(liveness=3)
    broker.answer_heartbeats = False
    again, message = broker.recv()
    assert isinstance(message.header, Ready)
    assert again != identity  # a new socket
    broker.answer_heartbeats = True
    broker.send(again, request(1))
    assert isinstance(broker.recv()[1].header, Reply)
    assert running.runtime.counters.snapshot()["reconnects"] == 1


@pytest.mark.parametrize(
    ("heartbeat_s", "liveness", "waits"),
    [(1.0, 3, [1.0, 2.0, 3.0, 3.0, 3.0]), (0.05, 3, [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0])],
)
def test_reconnect_backoff_doubles_up_to_one_liveness_period(heartbeat_s, liveness, waits):
    """A worker that lost its broker retries soon enough to find a restarted one within a
    few seconds (RELIABILITY.md finding 2: with a 16 s cap it took 14.7 s), never sooner
    than one heartbeat, and not below 1 s apart once the cap is reached."""
    seen = [heartbeat_s]
    while len(seen) < len(waits):
        seen.append(reconnect_backoff(seen[-1], heartbeat_s, liveness))
    assert seen == pytest.approx(waits)


def test_garbage_from_the_broker_is_survived(broker, start_worker):
    _, identity, _ = start_worker()
    broker.sock.send_multipart([identity, b"\x09", b"\x80"])
    broker.sock.send_multipart([identity, b"\x01", b"\xc1"])
    broker.sock.send_multipart([identity, b"\x01", msgpack.packb({"id": 9, "op": 1})])
    _, message = broker.recv()
    assert message.header == Error(
        id=9, code="bad_request", message=message.header.message, worker="t1"
    )
    broker.send(identity, request(1))
    assert isinstance(broker.recv()[1].header, Reply)


def test_stop_drains_then_disconnects(broker, start_worker):
    """stop(): READY with capacity 0 (no new work), finish what is held, DISCONNECT."""
    running, identity, _ = start_worker(null_delay_ms=200, max_batch=1, max_delay_ms=0)
    broker.send(identity, request(1))
    broker.send(identity, request(2))
    deadline = time.monotonic() + 20
    while running.runtime.counters.snapshot()["received"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    threading.Thread(target=running.runtime.stop).start()
    _, seen = broker.recv_until(lambda m: m.kind is Kind.DISCONNECT)
    kinds = [(m.kind.name, getattr(m.header, "id", None)) for m in seen]
    assert kinds[0] == ("READY", None) and seen[0].header.capacity == 0
    assert Counter(kinds) == {
        ("READY", None): 1,
        ("REPLY", 1): 1,
        ("REPLY", 2): 1,
        ("DISCONNECT", None): 1,
    }
    running.thread.join(timeout=30)
    assert running.exit_code == 0


def test_load_and_unload_reannounce(broker, start_worker):
    """Admin ops run on the worker, which sends a fresh READY with its models before the
    answer (whoever reads the answer then finds the new model set registered)."""
    _, identity, _ = start_worker()
    broker.send(identity, Request(id=1, op="load_package", model="extra"))
    _, seen = broker.recv_until(lambda m: m.kind is Kind.REPLY)
    assert seen[-1].header.result["model"] == "extra"
    ready = [m.header for m in seen if m.kind is Kind.READY]
    assert ready and sorted(ready[-1].models) == ["extra", "m"]
    broker.send(identity, Request(id=2, op="unload_package", model="m"))
    _, seen = broker.recv_until(lambda m: m.kind is Kind.REPLY)
    ready = [m.header for m in seen if m.kind is Kind.READY]
    assert ready and sorted(ready[-1].models) == ["extra"]


# -- the real engine -------------------------------------------------------------------------


@pytest.fixture
async def cluster(processes, tmp_path):
    c = Cluster(processes, tmp_path)
    try:
        yield c
    finally:
        await c.close()


@pytest.mark.slow
async def test_torch_worker_serves_a_real_package(cluster, tiny_package):
    """A torch worker loads and warms up the tiny package before READY, then serves
    composite and crop frames through a real broker."""
    pytest.importorskip("workers.engine")
    cluster.start_broker()
    cluster.processes.start(
        "worker",
        "--backend",
        "torch",
        "--broker",
        cluster.backend,
        "--models-dir",
        str(tiny_package),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--worker-id",
        "torch1",
        env={"LIPSYNC_HEARTBEAT_S": "0.2", "LIPSYNC_LIVENESS": "10"},
        name="torch1",
    )
    client = await cluster.client()
    stats = await cluster.wait_workers(client, "torch1")
    assert stats["workers"][0]["backend"] == "torch"

    meta = (await client.request("metadata", model="tiny")).header.result
    assert meta["frame_count"] == 16
    assert meta["size"] == [320, 240]
    full, crop = await asyncio.gather(
        client.request("infer", model="tiny", frame=3, ttl_ms=30_000),
        client.request("infer", model="tiny", frame=3, ttl_ms=30_000, opts={"mode": "crop"}),
    )
    image = cv2.imdecode(np.frombuffer(full.payload[0], np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (240, 320, 3)
    x1, y1, x2, y2 = crop.header.bounds
    face = cv2.imdecode(np.frombuffer(crop.payload[0], np.uint8), cv2.IMREAD_COLOR)
    assert face.shape[:2] == (round(y2 - y1), round(x2 - x1))
    with pytest.raises(ServiceError) as err:
        await client.request("infer", model="tiny", frame=16)
    assert err.value.code is ErrorCode.FRAME_OUT_OF_RANGE
