"""The broker's sans-I/O core: scripted timelines of messages and times in, exact actions out.

No socket, no sleep, no clock: every event carries its own time, and what the core decides
is the list of ``ToGateway`` / ``ToWorker`` actions it returns. The same rules end to end,
with real processes, are in test_broker.py.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from broker.actions import ToGateway, ToWorker, Undelivered
from broker.core import BrokerCore
from broker.stats import Totals
from shared.config import BrokerConfig
from shared.envelope import (
    Cancel,
    Disconnect,
    Error,
    Heartbeat,
    Message,
    Ready,
    Reply,
    Request,
)


GW = b"\x00gw-1"
GW2 = b"\x00gw-2"
A, B, C = b"\x00w-a", b"\x00w-b", b"\x00w-c"
NAMES = {A: "a", B: "b", C: "c"}
HB = Heartbeat(instance="i-1")


def make(*, warmup_s: float = 0.0, queue_limit: int = 256) -> BrokerCore:
    config = BrokerConfig(heartbeat_s=1.0, liveness=3, warmup_s=warmup_s, queue_limit=queue_limit)
    return BrokerCore(config, now=0.0, instance="i-1")


def ready(core, identity, *, capacity=2, models=("m",), now=0.0):
    header = Ready(
        worker=NAMES[identity], capacity=capacity, models={m: {"frame_count": 10} for m in models}
    )
    return core.from_worker(identity, Message(header), now)


def infer(core, gid, *, model="m", ttl_ms=1000, now=0.0, gateway=GW, payload=None, **opts):
    header = Request(id=gid, op="infer", model=model, ttl_ms=ttl_ms, opts=opts)
    return core.from_gateway(
        gateway, Message(header, [b"pcm"] if payload is None else payload), now
    )


def reply(core, identity, bid, *, now=0.0, payload=None):
    message = Message(Reply(id=bid), [b"jpeg"] if payload is None else payload)
    return core.from_worker(identity, message, now)


def sent(bid, ttl_ms, *, model="m", op="infer", **opts):
    """The request a worker gets: the broker's id, the time left."""
    return Request(id=bid, op=op, model=model, ttl_ms=ttl_ms, opts=opts)


def work(actions):
    """The actions that are not heartbeats."""
    return [a for a in actions if not isinstance(a.header, Heartbeat)]


def answer(gid, worker, *, gateway=GW):
    return ToGateway(gateway, Reply(id=gid, worker=worker), [b"jpeg"])


def error(gid, code, message, *, gateway=GW):
    return ToGateway(gateway, Error(id=gid, code=code, message=message))


# -- routing and credits -----------------------------------------------------------------


def test_a_request_goes_to_a_worker_and_its_answer_back_untouched():
    """The worker sees the broker's id and the time left; the gateway its own id back, with
    the very payload objects that came in (never copied)."""
    core = make()
    assert ready(core, A) == ()
    audio = [memoryview(b"pcm")]
    actions = infer(core, 7, ttl_ms=2000, now=0.5, payload=audio)
    assert actions == [ToWorker(A, sent(1, 2000), audio)]
    assert actions[0].payload is audio
    jpeg = [b"jpeg"]
    back = reply(core, A, 1, now=0.75, payload=jpeg)
    assert back == [ToGateway(GW, Reply(id=7, worker="a"), jpeg)]
    assert back[0].payload is jpeg


def test_least_loaded_worker_first_ties_to_least_recently_used():
    core = make()
    ready(core, A, capacity=4)
    ready(core, B, capacity=2)
    targets = [infer(core, gid)[0].identity for gid in range(1, 6)]
    # free: A 4 / B 2 -> A; 3/2 -> A; 2/2 tie, B never used -> B; 2/1 -> A; 1/1 tie, B -> B
    assert targets == [A, A, B, A, B]


def test_a_full_worker_gets_nothing_until_it_answers():
    core = make()
    ready(core, A, capacity=2)
    assert [a.identity for a in infer(core, 1) + infer(core, 2)] == [A, A]
    assert infer(core, 3, now=0.25) == ()  # queued: no credit left
    assert core.tick(0.25) == ()
    reply(core, A, 1, now=0.5)
    assert core.tick(0.5) == [ToWorker(A, sent(3, 750), [b"pcm"])]


def test_credits_are_never_exceeded_and_every_request_is_answered_once():
    """A random timeline (seeded): requests, answers, cancels, ticks, a worker joining and
    leaving. Counted from the actions alone: a worker never holds more than its capacity,
    and every request the gateway did not cancel gets exactly one answer."""
    rng = random.Random(19)
    core = make()
    capacity = {A: 3, B: 1, C: 2}
    ready(core, A, capacity=3)
    ready(core, B, capacity=1)
    held: dict[bytes, set[int]] = {A: set(), B: set(), C: set()}
    answers: dict[int, int] = {}
    cancelled: set[int] = set()
    gid, now = 0, 0.0

    def observe(actions):
        for a in actions:
            if isinstance(a, ToWorker) and isinstance(a.header, Request):
                held[a.identity].add(a.header.id)
                assert len(held[a.identity]) <= capacity[a.identity]
            elif isinstance(a, ToGateway) and isinstance(a.header, Reply | Error):
                answers[a.header.id] = answers.get(a.header.id, 0) + 1

    for step in range(600):
        now += 0.01
        if step == 300:
            observe(ready(core, C, capacity=2, now=now))
        if step == 450:  # B leaves: what it held is re-sent or answered
            held[B].clear()
            observe(core.from_worker(B, Message(Disconnect(reason="bye")), now))
        choice = rng.random()
        if choice < 0.45:
            gid += 1
            observe(infer(core, gid, ttl_ms=rng.choice([50, 500, 5000]), now=now))
        elif choice < 0.8:
            busy = [(w, b) for w, bids in held.items() for b in bids]
            if busy:
                w, bid = rng.choice(busy)
                held[w].discard(bid)
                observe(reply(core, w, bid, now=now))
        elif choice < 0.85 and gid:
            k = rng.randint(1, gid)
            if k not in answers:
                cancelled.add(k)
            observe(core.from_gateway(GW, Message(Cancel(id=k)), now))
        for w in (A, B, C):  # the workers stay alive
            if core.registry.get(w) is not None:
                core.from_worker(w, Message(Heartbeat()), now)
        observe(core.tick(now))
    for w, bids in held.items():  # the workers answer what they still hold
        for bid in sorted(bids):
            observe(reply(core, w, bid, now=now))
    observe(core.tick(now + 10))
    assert {k for k in range(1, gid + 1) if k not in cancelled} <= set(answers)
    assert not cancelled & set(answers)  # a cancelled request is not answered
    assert set(answers.values()) == {1}
    assert core.totals.redispatched > 0 and core.totals.expired > 0  # the timeline did both
    assert len(core.requests) == 0


def test_a_full_queue_answers_overloaded():
    core = make(queue_limit=2)
    ready(core, A, capacity=1)
    infer(core, 1)
    assert infer(core, 2) == infer(core, 3) == ()  # queued
    assert infer(core, 4) == [error(4, "overloaded", "queue for model 'm' is full")]
    assert core.totals.overloaded == 1


@pytest.mark.parametrize(
    ("header", "payload", "expected"),
    [
        (Request(id=1, op="nope", model="m"), [], ("bad_request", "unknown op 'nope'")),
        (Request(id=1, op="infer"), [], ("bad_request", "model is required")),
        (Request(id=1, op="infer", model="m", ttl_ms=0), [], ("deadline_exceeded", "ttl <= 0")),
        (Request(id=1, op="infer", model="x"), [], ("unknown_model", "no worker holds model 'x'")),
        (
            Request(id=1, op="infer", model="m"),
            [b"\0" * (16 << 20), b"\0"],
            ("bad_request", "payload too large"),
        ),
    ],
    ids=["op", "model", "ttl", "unknown", "payload"],
)
def test_bad_requests_answered_at_once(header, payload, expected):
    core = make()
    ready(core, A)
    assert core.from_gateway(GW, Message(header, payload), 0.0) == [error(1, *expected)]


def test_a_request_id_in_use_is_refused_per_gateway():
    core = make()
    ready(core, A)
    infer(core, 1)
    assert infer(core, 1) == [error(1, "bad_request", "request id in use")]
    assert [a.identity for a in infer(core, 1, gateway=GW2)] == [A]  # another gateway's 1


def test_a_stream_sticks_to_its_worker_while_it_has_credits():
    core = make()
    ready(core, A, capacity=2)
    ready(core, B, capacity=2)
    first = infer(core, 1, stream="s")[0].identity
    assert infer(core, 2, stream="s")[0].identity == first  # not the least loaded
    other = B if first == A else A
    assert infer(core, 3, stream="s")[0].identity == other  # full: the other one


# -- deadlines -----------------------------------------------------------------------------


def test_a_queued_request_past_its_deadline_is_answered_and_never_sent():
    core = make()
    ready(core, A, capacity=1)
    infer(core, 1, ttl_ms=5000)
    infer(core, 2, ttl_ms=500, now=0.25)
    assert core.tick(0.5) == ()
    assert core.tick(0.75) == [error(2, "deadline_exceeded", "deadline passed while queued")]
    reply(core, A, 1, now=1.0)
    assert work(core.tick(1.0)) == []
    assert core.totals.expired == 1


def test_a_request_held_past_its_deadline_is_answered_but_keeps_its_credit():
    """A hung worker stops getting work; its late answer is dropped (``discarded``)."""
    core = make()
    ready(core, A, capacity=1)
    infer(core, 1, ttl_ms=1000)
    infer(core, 2, ttl_ms=5000)
    assert work(core.tick(1.25)) == []
    expired = error(1, "deadline_exceeded", "no answer from worker a by the deadline")
    assert work(core.tick(1.5)) == [expired]  # at the deadline + 0.5 s
    assert work(core.tick(2.0)) == []  # request 2 still waits: the credit is taken
    assert reply(core, A, 1, now=2.0) == ()  # nobody waits for it any more
    assert work(core.tick(2.0)) == [ToWorker(A, sent(2, 3000), [b"pcm"])]
    assert (core.totals.expired, core.totals.discarded) == (1, 1)


# -- dead workers --------------------------------------------------------------------------


def test_a_dead_workers_request_is_resent_once_within_its_deadline():
    core = make()
    ready(core, A, capacity=1)
    ready(core, B, capacity=1)
    ready(core, C, capacity=1)
    assert infer(core, 1, ttl_ms=10_000) == [ToWorker(A, sent(1, 10_000), [b"pcm"])]
    for t in (1.0, 2.0, 3.0):  # B and C stay alive, A is silent
        core.from_worker(B, Message(Heartbeat()), t)
        core.from_worker(C, Message(Heartbeat()), t)
    # silent for more than 3 intervals: dead, and its request goes to B with the time left
    assert work(core.tick(3.25)) == [ToWorker(B, sent(1, 6750), [b"pcm"])]
    assert core.registry.get(A) is None
    # B dies too: the request went to workers twice already, so it is answered, not re-sent
    gone = core.from_worker(B, Message(Disconnect(reason="stopping")), 3.5)
    assert gone == [error(1, "worker_lost", "worker b lost")]
    assert core.totals.redispatched == 1


def test_a_dead_workers_request_past_its_deadline_is_answered_worker_lost():
    core = make()
    ready(core, A, capacity=1)
    ready(core, B, capacity=1)
    infer(core, 1, ttl_ms=2000)  # to A
    gone = core.from_worker(A, Message(Disconnect()), 2.25)  # within the grace, past 2.0
    assert gone == [error(1, "worker_lost", "worker a lost")]
    assert core.totals.redispatched == 0


def test_when_the_last_holder_leaves_its_queue_is_answered():
    core = make()
    ready(core, A, capacity=1)
    infer(core, 1, ttl_ms=5000)
    infer(core, 2, ttl_ms=5000)
    actions = core.from_worker(A, Message(Disconnect()), 0.5)
    assert actions == [
        error(1, "worker_lost", "worker a lost"),
        error(2, "worker_lost", "no worker holds model 'm' any more"),
    ]


def test_a_worker_that_cannot_be_sent_to_is_dead_and_its_request_goes_elsewhere():
    """A send that fails (the peer is gone) comes back as ``undelivered``: the request
    never reached it, so it is not a re-dispatch (it may still go to workers twice)."""
    core = make()
    ready(core, A, capacity=1)
    ready(core, B, capacity=1)
    [to_a] = infer(core, 1, ttl_ms=1000)
    assert to_a.identity == A
    actions = core.undelivered([Undelivered(to_a, "unreachable")], 0.25)
    assert actions == [ToWorker(B, sent(1, 750), [b"pcm"])]
    assert core.registry.get(A) is None
    assert core.totals.redispatched == 0
    # B dies holding it: this was its first real attempt, so it may go once more (to C)
    ready(core, C, capacity=1, now=0.25)
    assert core.from_worker(B, Message(Disconnect()), 0.5) == ()
    assert work(core.tick(0.5)) == [ToWorker(C, sent(1, 500), [b"pcm"])]


def test_an_answer_from_a_worker_declared_dead_is_stale():
    core = make()
    ready(core, A, capacity=1)
    ready(core, B, capacity=1)
    infer(core, 1, ttl_ms=10_000)  # to A
    core.from_worker(B, Message(Heartbeat()), 3.0)
    core.tick(3.25)  # A dead: request 1 to B
    late = reply(core, A, 1, now=3.5)
    assert late == [ToWorker(A, Disconnect(reason="not registered: send ready"))]
    assert reply(core, A, 1, now=3.75) == ()  # told once an interval at most
    assert reply(core, B, 1, now=4.0) == [answer(1, "b")]
    assert core.totals.stale == 2


# -- warm-up -------------------------------------------------------------------------------


def test_during_the_warm_up_requests_wait_for_a_holder():
    core = make(warmup_s=6.0)
    assert infer(core, 1, ttl_ms=5000) == ()  # nobody holds m yet: it waits
    meta = core.from_gateway(GW, Message(Request(id=2, op="metadata", model="m")), 0.0)
    assert meta == ()
    assert core.totals.waited_for_workers == 2
    ready(core, A, capacity=2, now=1.0)
    assert work(core.tick(1.0)) == [
        ToGateway(GW, Reply(id=2, worker="broker", result=_meta(workers=1, capacity=2))),
        ToWorker(A, sent(1, 4000), [b"pcm"]),
    ]


def test_after_the_warm_up_what_waited_for_nobody_is_unknown_model():
    core = make(warmup_s=6.0)
    infer(core, 1, model="x", ttl_ms=60_000)
    core.from_gateway(GW, Message(Request(id=2, op="metadata", model="x", ttl_ms=60_000)), 0.0)
    assert core.next_wakeup() == 0.0  # the first liveness check
    core.tick(0.0)
    assert core.next_wakeup() == 0.25
    assert work(core.tick(5.75)) == []
    unknown = "no worker holds model 'x'"
    assert work(core.tick(6.0)) == [
        error(1, "unknown_model", unknown),
        error(2, "unknown_model", unknown),
    ]
    assert infer(core, 3, model="x", now=6.25) == [error(3, "unknown_model", unknown)]


def test_a_request_that_waited_in_the_warm_up_until_its_deadline_is_unknown_model():
    core = make(warmup_s=6.0)
    infer(core, 1, model="x", ttl_ms=1000)
    assert core.tick(1.0) == [error(1, "unknown_model", "no worker holds model 'x'")]
    assert core.totals.expired == 0


def _meta(**extra):
    return {"frame_count": 10, "model_name": "m", **extra}


# -- cancel ----------------------------------------------------------------------------------


def test_cancel_a_queued_request_it_is_never_sent():
    core = make()
    ready(core, A, capacity=1)
    infer(core, 1)
    infer(core, 2)
    assert core.from_gateway(GW, Message(Cancel(id=2)), 0.25) == ()
    reply(core, A, 1, now=0.5)
    assert work(core.tick(0.5)) == []
    assert core.totals.cancelled == 1


def test_cancel_a_request_in_flight_tells_its_worker_and_drops_its_answer():
    core = make()
    ready(core, A, capacity=1)
    infer(core, 1)
    infer(core, 2)
    assert core.from_gateway(GW, Message(Cancel(id=1)), 0.25) == [ToWorker(A, Cancel(id=1))]
    # the worker's answer frees the credit and goes nowhere; a cancelled job is not counted
    # as discarded work, a computed one is
    cancelled = Message(Error(id=1, code="cancelled", message="cancelled"))
    assert core.from_worker(A, cancelled, 0.5) == ()
    assert work(core.tick(0.5)) == [ToWorker(A, sent(2, 500), [b"pcm"])]
    core.from_gateway(GW, Message(Cancel(id=2)), 0.5)
    assert reply(core, A, 2, now=0.75) == ()
    assert (core.totals.cancelled, core.totals.discarded) == (2, 1)


def test_cancel_a_metadata_request_waiting_in_the_warm_up():
    core = make(warmup_s=6.0)
    core.from_gateway(GW, Message(Request(id=1, op="metadata", model="m")), 0.0)
    core.from_gateway(GW, Message(Cancel(id=1)), 0.25)
    ready(core, A, now=0.5)
    assert work(core.tick(0.5)) == []
    assert core.totals.cancelled == 1


# -- fan-out -----------------------------------------------------------------------------------


def _load(gid, **opts):
    return Message(Request(id=gid, op="load_package", model="pkg", ttl_ms=4000, opts=opts))


def test_a_fan_out_is_answered_once_when_every_worker_has_ended():
    core = make()
    for w in (A, B, C):
        ready(core, w, capacity=1)
    actions = core.from_gateway(GW, _load(9, workers="all", path="/p"), 0.0)
    child = sent(0, 4000, op="load_package", model="pkg", path="/p")  # fan-out opts dropped
    assert actions == [
        ToWorker(A, dataclasses.replace(child, id=1), []),
        ToWorker(B, dataclasses.replace(child, id=2), []),
        ToWorker(C, dataclasses.replace(child, id=3), []),
    ]
    ok = Reply(id=2, result={"model": "pkg", "frames": 10})
    assert core.from_worker(B, Message(ok), 0.25) == ()
    failed = Error(id=1, code="bad_request", message="no such package")
    assert core.from_worker(A, Message(failed), 0.5) == ()
    assert core.from_worker(C, Message(Disconnect(reason="bye")), 0.75) == [
        ToGateway(
            GW,
            Reply(
                id=9,
                worker="broker",
                result={
                    "op": "load_package",
                    "model": "pkg",
                    "workers": [
                        {
                            "worker": "a",
                            "ok": False,
                            "code": "bad_request",
                            "error": failed.message,
                        },
                        {"worker": "b", "ok": True, "frames": 10},
                        {
                            "worker": "c",
                            "ok": False,
                            "code": "worker_lost",
                            "error": "worker c lost",
                        },
                    ],
                },
            ),
        )
    ]
    assert core.totals.answered == {"ok": 1}  # one answer, whatever its parts
    assert len(core.requests) == 0


def test_a_fan_out_child_past_its_deadline_ends_its_part_and_the_request_id_is_free():
    core = make()
    ready(core, A, capacity=1)
    ready(core, B, capacity=1)
    core.from_gateway(GW, _load(9, workers=2), 0.0)
    # children never take a gateway's ids: its request 1 is not refused "request id in use"
    assert infer(core, 1, model="x") == [error(1, "unknown_model", "no worker holds model 'x'")]
    core.from_worker(A, Message(Reply(id=1, result={})), 1.0)
    core.from_worker(B, Message(Heartbeat()), 3.0)
    core.from_worker(A, Message(Heartbeat()), 3.0)
    [done] = work(core.tick(4.5))
    why = "no answer from worker b by the deadline"
    assert done.header.result["workers"] == [
        {"worker": "a", "ok": True},
        {"worker": "b", "ok": False, "code": "deadline_exceeded", "error": why},
    ]


def test_a_fan_out_to_nobody_is_refused():
    core = make()
    actions = core.from_gateway(GW, _load(9, workers="all"), 0.0)
    assert actions == [error(9, "bad_request", "no worker connected")]
    unload = Message(Request(id=10, op="unload_package", model="pkg", opts={"workers": 1}))
    assert core.from_gateway(GW, unload, 0.0) == [
        error(10, "unknown_model", "no worker holds model 'pkg'")
    ]


def test_an_admin_op_goes_to_its_worker_and_is_never_sent_elsewhere():
    core = make()
    ready(core, A, capacity=1)
    ready(core, B, capacity=1)
    infer(core, 1)  # A is full: the admin op goes there anyway
    actions = core.from_gateway(GW, _load(2, worker="a"), 0.0)
    admin = sent(2, 4000, op="load_package", model="pkg", worker="a")
    assert actions == [ToWorker(A, admin, [])]
    # A leaves: the infer request goes to B, the admin op (meant for A) is answered
    gone = core.from_worker(A, Message(Disconnect()), 0.5)
    assert gone == [error(2, "worker_lost", "worker a lost")]
    assert work(core.tick(0.5)) == [ToWorker(B, sent(1, 500), [b"pcm"])]


# -- liveness, shutdown, stats ---------------------------------------------------------------


def test_idle_peers_are_heartbeated_and_silent_ones_forgotten():
    core = make()
    ready(core, A)
    core.from_gateway(GW, Message(Heartbeat()), 0.0)
    assert core.tick(0.0) == ()  # both heard from us at 0 (the echo; the worker at 0)
    assert core.tick(1.0) == [ToWorker(A, HB), ToGateway(GW, HB)]
    assert core.tick(1.25) == ()
    infer(core, 1, ttl_ms=10_000, now=1.5)  # the request counts as hearing from us
    assert core.tick(2.25) == [ToGateway(GW, HB)]
    # A has sent nothing since 0: dead after 3 intervals, and nobody else holds m
    assert core.tick(3.25) == [error(1, "worker_lost", "worker a lost")]
    assert core.tick(60.0) == [ToGateway(GW, HB)]
    assert core.tick(61.75) == ()  # silent for over a minute (since 1.5): forgotten
    assert core.gateways == {}


def test_shutdown_answers_what_is_pending_and_tells_workers():
    core = make(warmup_s=6.0)
    ready(core, A, capacity=1)
    infer(core, 1)
    infer(core, 2)
    core.from_gateway(GW, Message(Request(id=3, op="metadata", model="x")), 0.0)
    assert core.shutdown(0.5) == [
        error(1, "shutting_down", "broker shutting down"),
        error(2, "shutting_down", "broker shutting down"),
        error(3, "shutting_down", "broker shutting down"),
        ToWorker(A, Disconnect(reason="broker shutting down")),
    ]
    assert infer(core, 4, now=0.5) == [error(4, "shutting_down", "broker shutting down")]


def test_bad_messages_are_counted_and_answered_when_they_have_an_id():
    core = make()
    ready(core, A, capacity=1)
    infer(core, 1)
    assert core.bad_from_gateway(GW, "header is not a map", 5, 0.0) == [
        error(5, "bad_request", "header is not a map")
    ]
    assert core.bad_from_gateway(GW, "too few frames", None, 0.0) == ()
    unexpected = core.from_gateway(GW, Message(Reply(id=6)), 0.0)
    assert unexpected == [error(6, "bad_request", "unexpected reply from a gateway")]
    # a worker's answer we cannot read still ends its request, and frees the credit
    assert core.bad_from_worker(A, "header is not valid msgpack", 1, 0.0) == [
        error(1, "internal", "malformed answer from worker")
    ]
    assert core.registry.get(A).free == 1
    assert core.totals.malformed == 4


def test_stats_totals():
    core = make()
    ready(core, A, capacity=1)
    infer(core, 1)
    infer(core, 2, ttl_ms=500)
    infer(core, 3, model="x")
    reply(core, A, 1, now=0.25)
    core.tick(0.5)  # 2 expires in its queue: a tick expires before it dispatches
    core.from_gateway(GW, Message(Heartbeat()), 0.5)
    stats_request = Message(Request(id=4, op="stats"))
    [action] = core.from_gateway(GW, stats_request, 0.75)
    assert action.header.worker == "broker"
    result = action.header.result
    assert result["broker"] == {
        "requests": 4,
        "answered": {"ok": 1, "deadline_exceeded": 1, "unknown_model": 1},
        "overloaded": 0,
        "expired": 1,
        "redispatched": 0,
        "malformed": 0,
        "cancelled": 0,
        "stale": 0,
        "undeliverable": 0,
        "waited_for_workers": 0,
        "discarded": 0,
        "warming_up": False,
        "uptime_s": 0.75,
        "pending": 0,
        "queued": 0,
        "gateways": 1,
    }
    assert result["models"] == {"m": {"queue": 0, "workers": ["a"]}}
    [worker] = result["workers"]
    assert (worker["id"], worker["served"], worker["in_flight"]) == ("a", 1, 0)
    # the stats answer itself is counted once sent
    assert core.totals.answered == {"ok": 2, "deadline_exceeded": 1, "unknown_model": 1}


def test_totals_are_what_the_gateway_exports():
    """Every counter the gateway's /metrics reads from ``stats["broker"]`` is a field of
    ``Totals``, and every field is exported."""
    pytest.importorskip("prometheus_client")
    from gateway.modelmetrics import BROKER_EVENTS

    fields = {f.name for f in dataclasses.fields(Totals)}
    assert fields == {"requests", "answered", *BROKER_EVENTS}


def test_an_undeliverable_answer_is_counted_and_an_unreachable_gateway_forgotten():
    core = make()
    ready(core, A)
    [to_a] = infer(core, 1)
    [back] = reply(core, A, 1, now=0.25)
    assert core.undelivered([Undelivered(back, "unreachable")], 0.25) == ()
    assert core.totals.undeliverable == 1
    [beat] = core.from_gateway(GW, Message(Heartbeat()), 0.5)
    assert core.undelivered([Undelivered(beat, "unreachable")], 0.5) == ()
    assert core.gateways == {}
    assert to_a.identity == A and back.identity == GW
