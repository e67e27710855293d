"""Admin operations (load, unload, reload a package at run time) through the gateway, the
broker's fan-out and real workers: null workers for the routing, torch workers for what
loading and unloading really do (a package copied in while serving, memory returned, a
broken package refused with its reason)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys

import pytest
from client_harness import ClientSystem, module_processes, rss_mb
from cluster import eventually
from conftest import ROOT, free_port

from lipsync.client import (
    ErrorCode,
    Frame,
    LipsyncClient,
    ServerError,
)


TOKEN = "admin-secret"
NO_FRAME_CACHES = shutil.ignore_patterns("*.framecache", "*.lock")


def url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/ws"


# -- routing over null workers -------------------------------------------------------------


@pytest.fixture
def null_system(processes):
    s = ClientSystem(processes)
    s.start_broker()
    s.start_null_worker("m", "w1")
    s.start_null_worker("m", "w2")
    _, s.port = s.start_gateway(env={"LIPSYNC_TOKEN": TOKEN})
    _, s.open_port = s.start_gateway()  # no token: admin refused
    s.wait_models(s.port, "m")
    return s


async def holders(c: LipsyncClient, model: str) -> tuple[str, ...]:
    """Workers holding ``model`` as the broker's registry says (through get_stats)."""
    stats = await c.stats()
    s = stats.model_stats.get(model)
    return s.workers if s is not None else ()


async def test_load_and_unload_fan_out(null_system):
    async with LipsyncClient(url(null_system.port), token=TOKEN) as c:
        result = await c.load_package("x")
        assert result.success and result.op == "load_package" and result.model_name == "x"
        assert sorted(w.worker for w in result.workers) == ["w1", "w2"]
        assert all(w.success and w.metadata["frame_count"] == 100 for w in result.workers)
        # READY comes before the answer: the change is visible at once
        assert await c.list_models() == ["m", "x"]
        assert await holders(c, "x") == ("w1", "w2")
        frame = await c.infer("x", 5)
        assert isinstance(frame, Frame) and frame.jpeg

        one = await c.unload_package("x", 1)
        assert one.success and len(one.workers) == 1
        left = await holders(c, "x")
        assert len(left) == 1 and left[0] != one.workers[0].worker
        named = await c.unload_package("x", left[0])
        assert [w.worker for w in named.workers] == [left[0]]
        assert await c.list_models() == ["m"]
        with pytest.raises(ServerError) as err:
            await c.infer("x", 5)
        assert err.value.code == ErrorCode.UNKNOWN_MODEL
        with pytest.raises(ServerError) as err:
            await c.unload_package("x")
        assert err.value.code == ErrorCode.UNKNOWN_MODEL
        assert "no worker holds model 'x'" in err.value.message

        # N workers: those without the model first
        first = await c.load_package("y", 1)
        second = await c.load_package("y", 1)
        assert {first.workers[0].worker, second.workers[0].worker} == {"w1", "w2"}
        reload = await c.reload_package("y")
        assert sorted(w.worker for w in reload.workers) == ["w1", "w2"]
        assert await c.infer("m", 1)  # the others kept serving throughout


async def test_bad_admin_requests(null_system):
    async with LipsyncClient(url(null_system.port), token=TOKEN) as c:
        for workers, why in ((0, "workers must be"), ("nobody", "no worker named")):
            with pytest.raises(ServerError) as err:
                await c.load_package("x", workers)
            assert err.value.code == ErrorCode.BAD_REQUEST
            assert why in err.value.message
        with pytest.raises(ServerError) as err:
            await c.reload_package("x")  # held by nobody
        assert err.value.code == ErrorCode.UNKNOWN_MODEL
        assert await c.list_models() == ["m"]


async def test_admin_needs_the_token(null_system):
    async with LipsyncClient(url(null_system.open_port)) as c:
        with pytest.raises(ServerError) as err:
            await c.load_package("x")
        assert err.value.code == ErrorCode.UNAUTHORIZED
        assert err.value.message == "admin operations need LIPSYNC_TOKEN"
        with pytest.raises(ServerError) as err:
            await c.unload_package("m")
        assert err.value.code == ErrorCode.UNAUTHORIZED
        assert await c.list_models() == ["m"]  # nothing changed; the connection still works
    for token in (None, "wrong"):
        with pytest.raises(ServerError) as err:
            async with LipsyncClient(url(null_system.port), token=token):
                pass
        assert err.value.code == ErrorCode.UNAUTHORIZED


def cli(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LIPSYNC_TOKEN"}
    if token is not None:
        env["LIPSYNC_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "lipsync", "models", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_models_cli(null_system):
    gw = f"ws://127.0.0.1:{null_system.port}/ws"
    done = await asyncio.to_thread(cli, "load", "x", "--url", gw, "--workers", "w2", token=TOKEN)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("w2: loaded x in ")
    listed = await asyncio.to_thread(cli, "list", "--url", gw, "--token", TOKEN)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].startswith("m  workers=w1,w2") and lines[1].startswith("x  workers=w2")
    refused = await asyncio.to_thread(cli, "unload", "x", "--url", gw)
    assert refused.returncode == 1
    assert "unauthorized" in refused.stderr
    done = await asyncio.to_thread(cli, "unload", "x", "--url", gw, "--json", token=TOKEN)
    assert done.returncode == 0, done.stderr
    assert '"success": true' in done.stdout
    nowhere = f"ws://127.0.0.1:{free_port()}/ws"
    gone = await asyncio.to_thread(cli, "list", "--url", nowhere)
    assert gone.returncode == 2 and "cannot connect" in gone.stderr


# -- what loading and unloading really do (torch workers) -------------------------------------

BIG = "big"
BIG_FRAMES = 120
BIG_SIZE = (640, 360)


@pytest.fixture(scope="module")
def torch_system(tmp_path_factory):
    pytest.importorskip("torch")
    from workers.make_package import make_package

    root = tmp_path_factory.mktemp("admin")
    models, spare = root / "models", root / "spare"
    make_package(models, name="tiny", frames=16, size=(320, 240), width="quarter")
    # Big enough that its decoded frames (120 x 640x360 = 83 MB of full frames) dwarf the
    # noise in a worker's resident memory; built outside the models dir, copied in later.
    make_package(spare, name=BIG, frames=BIG_FRAMES, size=BIG_SIZE, width="quarter")
    # the same avatar with other weights, for a reload after the files changed
    make_package(spare, name="tiny", frames=16, size=(320, 240), width="quarter", seed=1)
    with module_processes(root / "logs") as procs:
        s = ClientSystem(procs)
        s.start_broker()
        s.worker = s.start_torch_worker(models, "torch-1")
        _, s.port = s.start_gateway(
            env={"LIPSYNC_TOKEN": TOKEN, "LIPSYNC_REQUEST_TIMEOUT_MS": "30000"}
        )
        s.wait_models(s.port, "tiny", timeout=180)
        s.models_dir, s.spare = models, spare
        yield s


@pytest.mark.slow
async def test_load_while_serving_then_unload_returns_memory(torch_system):
    s = torch_system
    async with LipsyncClient(url(s.port), token=TOKEN, timeout=60) as c:
        assert await c.list_models() == ["tiny"]
        with pytest.raises(ServerError) as err:
            await c.load_package(BIG)  # not in the models dir yet
        assert err.value.code == ErrorCode.UNKNOWN_MODEL
        shutil.copytree(s.spare / BIG, s.models_dir / BIG)
        serving = asyncio.ensure_future(c.infer_batch("tiny", list(range(16)) * 2))
        result = await c.load_package(BIG)
        assert [w.worker for w in result.workers] == ["torch-1"]
        assert result.workers[0].metadata["frame_count"] == BIG_FRAMES
        assert result.workers[0].metadata["size"] == list(BIG_SIZE)
        assert len(await serving) == 32  # tiny served while big loaded
        assert await c.list_models() == ["big", "tiny"]
        meta = await c.metadata(BIG)
        assert meta.frame_count == BIG_FRAMES
        frame = await c.infer(BIG, 7, mode="composite")
        assert frame.frame_id == 7 and frame.jpeg[:2] == b"\xff\xd8"

        # touch every full frame so they are resident in the worker, then unload
        await asyncio.gather(*(c.video_frame(BIG, i) for i in range(BIG_FRAMES)))
        before = rss_mb(s.worker.pid)
        result = await c.unload_package(BIG)
        assert result.success and result.workers[0].worker == "torch-1"
        after = rss_mb(s.worker.pid)
        full_frames_mb = BIG_FRAMES * BIG_SIZE[0] * BIG_SIZE[1] * 3 / 2**20
        print(f"worker RSS {before:.0f} MB -> {after:.0f} MB ({full_frames_mb:.0f} MB touched)")
        assert before - after > 0.6 * full_frames_mb

        assert await c.list_models() == ["tiny"]
        with pytest.raises(ServerError) as err:
            await c.infer(BIG, 7)
        assert err.value.code == ErrorCode.UNKNOWN_MODEL
        assert "big" in err.value.message
        assert isinstance(await c.infer("tiny", 3), Frame)


@pytest.mark.slow
async def test_a_broken_package_is_refused_with_its_reason(torch_system):
    s = torch_system
    broken = s.models_dir / "broken"
    shutil.copytree(s.models_dir / "tiny", broken, ignore=NO_FRAME_CACHES)
    (broken / "rois_320_video.mp4").unlink()
    async with LipsyncClient(url(s.port), token=TOKEN, timeout=60) as c:
        before = await c.infer("tiny", 2)
        with pytest.raises(ServerError) as err:
            await c.load_package("broken")
        assert err.value.code == ErrorCode.BAD_REQUEST
        assert "rois_320_video.mp4" in err.value.message
        details = err.value.details
        assert details is not None and not details.success
        assert details.workers[0].worker == "torch-1" and not details.workers[0].success
        assert "rois_320_video.mp4" in details.workers[0].error
        assert await c.list_models() == ["tiny"]
        after = await c.infer("tiny", 2)
        assert after.jpeg == before.jpeg  # the others serve on, unchanged

        # a reload of a healthy package keeps it serving
        reload = await c.reload_package("tiny")
        assert reload.success and reload.workers[0].metadata["frame_count"] == 16
        assert (await c.infer("tiny", 2)).jpeg == before.jpeg


@pytest.mark.slow
async def test_stats_follow_the_model_set(torch_system):
    """A loaded model gets its own stats entry; an unloaded one loses it."""
    s = torch_system
    extra = s.models_dir / "extra"
    if not extra.exists():
        shutil.copytree(s.models_dir / "tiny", extra, ignore=NO_FRAME_CACHES)
    async with LipsyncClient(url(s.port), token=TOKEN, timeout=60) as c:
        await c.load_package("extra")
        await c.infer_batch("extra", range(4))

        async def counted():
            s = (await c.stats()).model_stats.get("extra")
            return s if s is not None and s.requests >= 4 else None

        stats = await eventually(counted, what="stats of the new model")
        assert stats.workers == ("torch-1",) and stats.errors == 0
        await c.unload_package("extra")
        assert "extra" not in (await c.stats()).model_stats


@pytest.mark.slow
async def test_reload_picks_up_changed_files(torch_system):
    """New weights copied over a loaded package's are served after ``reload``, and only
    after it; copying the old ones back and reloading restores the old frames."""
    s = torch_system
    pkg = s.models_dir / "swap"
    if not pkg.exists():
        shutil.copytree(s.models_dir / "tiny", pkg, ignore=NO_FRAME_CACHES)
    weights = pkg / "checkpoint" / "best_trainloss.pth"
    original = weights.read_bytes()
    async with LipsyncClient(url(s.port), token=TOKEN, timeout=60) as c:
        await c.load_package("swap")
        first = await c.infer("swap", 4)
        shutil.copyfile(s.spare / "tiny" / "checkpoint" / "best_trainloss.pth", weights)
        assert (await c.infer("swap", 4)).jpeg == first.jpeg  # nothing changes by itself
        result = await c.reload_package("swap")
        assert [w.worker for w in result.workers] == ["torch-1"] and result.success
        changed = await c.infer("swap", 4)
        assert changed.jpeg != first.jpeg
        assert changed.bounds == first.bounds  # same avatar, other weights
        weights.write_bytes(original)
        await c.reload_package("swap")
        assert (await c.infer("swap", 4)).jpeg == first.jpeg
        await c.unload_package("swap")
