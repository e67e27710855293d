"""The README's own example on a freshly started system: ``await c.infer_batch("demo",
range(32))`` against the demo avatar, one CPU worker started as ``lipsync up`` starts it
(default batch size and deadline), returns 32 frames.

It used to fail with ``deadline_exceeded``: the client kept the gateway's whole limit of
32 requests in flight, far more than one CPU worker serves within the 2 s deadline on its
first, cold pass over the avatar (the image half of every frame computed for the first
time), so the queued ones outlived their deadlines. The client now keeps in flight what
the model's workers may hold (their capacity, as the broker reports it in ``metadata``).
"""

from __future__ import annotations

import pytest
from client_harness import ClientSystem, module_processes

from lipsync.client import Frame, LipsyncClient


pytestmark = pytest.mark.slow


async def test_readme_infer_batch_on_a_fresh_system(tmp_path):
    pytest.importorskip("torch")
    from workers.demo.build import build_demo_package

    models = tmp_path / "models"
    build_demo_package(models, name="demo", seed=0, progress=False)
    with module_processes(tmp_path / "logs") as procs:
        s = ClientSystem(procs)
        s.start_broker()
        s.processes.start(
            "worker", "--backend", "torch", "--broker", s.backend, "--models-dir", str(models),
            "--device", "cpu", "--worker-id", "w1", name="w1",
        )  # fmt: skip
        _, port = s.start_gateway()  # the default 2 s deadline
        s.wait_models(port, "demo", timeout=180)
        async with LipsyncClient(f"ws://127.0.0.1:{port}/ws", timeout=30) as c:
            meta = await c.metadata("demo")
            assert meta.workers == 1 and meta.capacity == 8  # 2 x the default batch of 4
            assert await c.serving_window("demo") == 8
            frames = await c.infer_batch("demo", range(32))
    assert [f.frame_id for f in frames] == list(range(32))
    assert all(isinstance(f, Frame) and f.jpeg[:2] == b"\xff\xd8" for f in frames)
