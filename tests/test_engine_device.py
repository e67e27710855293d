"""The engine's GPU path, run on CPU where the same tensor code runs: frames resident on
the device, tensor paste-back, bucket padding, and overlapping batches, each against
today's host path (the one tests/test_engine.py holds to DESIGN.md section 5).

GPU-only checks (graph capture, memory returned on unload) are marked ``gpu`` and skipped
without CUDA.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from shared.streamtime import clip_samples, clip_t0_ms
from workers.backend import InferItem, InferResult
from workers.engine import TorchBackend
from workers.resident import TIERS


CUDA = torch.cuda.is_available()


def clip(seed: int, sr: int = 16000) -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(int(0.64 * sr)) / sr
    y = 0.3 * np.sin(2 * np.pi * 170 * t) * np.sin(2 * np.pi * 2 * t) ** 2
    y += 0.02 * rng.standard_normal(len(t))
    return (y * 32767).astype("<i2").tobytes()


STREAM = (0.2 * np.random.default_rng(9).standard_normal(3 * 16000) * 32767).astype("<i2")


def stream_item(frame_id: int, j: int, stream: str) -> InferItem:
    """Stream frame ``j``: the clip the gateway would send for it (docs/streams.md)."""
    start, end = clip_samples(j, 25.0, 16000)
    return InferItem(
        frame_id=frame_id,
        mode="crop",
        audio=STREAM[start:end].tobytes(),
        audio_sr=16000,
        audio_t0_ms=clip_t0_ms(j, 25.0, 16000),
        stream=stream,
        stream_frame=j,
    )


def batches() -> list[list[InferItem]]:
    """Mixed batches: both modes, repeats, package audio, layout B, a bad clip."""
    return [
        [InferItem(0, "composite"), InferItem(5, "crop", quality=70), InferItem(15, "composite")],
        [InferItem(3, "crop"), InferItem(3, "crop", audio=clip(1), audio_sr=16000)],
        [InferItem(7, "composite", audio=clip(2), audio_sr=24000), InferItem(8, "crop")],
        [InferItem(9, "crop", audio=b"", audio_sr=16000), InferItem(10, "composite")],
        [InferItem(i % 16, "crop") for i in range(11, 15)],
    ]


def render_all(backend: TorchBackend, groups: list[list[InferItem]]) -> list[list]:
    return [backend.render(backend.forward("tiny", items)) for items in groups]


@pytest.fixture(scope="module")
def host(tiny_package):
    """Today's path: frames staged from the host, OpenCV paste-back."""
    b = TorchBackend(tiny_package, device="cpu", max_batch=4)
    b.load("tiny")
    yield b
    b.close()


@pytest.fixture(scope="module")
def expected(host):
    return render_all(host, batches())


def same(a, b) -> bool:
    if isinstance(a, BaseException) or isinstance(b, BaseException):
        return type(a) is type(b) and str(a) == str(b)
    return a.shape == b.shape and np.array_equal(a, b)


def compare(expected: list[list], got: list[list]) -> tuple[int, int, int]:
    """(largest difference, values that differ, values) over all pictures; errors must
    be the same errors."""
    largest = differing = total = 0
    for want_batch, got_batch in zip(expected, got, strict=True):
        for w, g in zip(want_batch, got_batch, strict=True):
            if isinstance(w, BaseException):
                assert same(w, g)
                continue
            assert w.shape == g.shape
            diff = np.abs(w.astype(int) - g.astype(int))
            largest = max(largest, int(diff.max()))
            differing += int((diff > 0).sum())
            total += diff.size
    return largest, differing, total


def test_device_staging_gives_the_host_paths_pixels(tiny_package, expected):
    """Frames resident on the device (here: cpu), batches index-selected there, OpenCV
    paste-back: exactly today's pixels."""
    b = TorchBackend(tiny_package, device="cpu", max_batch=4, resident=True, paste="host")
    b.load("tiny")
    try:
        assert b.resident_videos("tiny") == [kind for tier in TIERS for kind in tier]
        got = render_all(b, batches())
    finally:
        b.close()
    assert compare(expected, got)[0] == 0


def test_device_paste_is_within_one_grey_level(tiny_package, expected):
    b = TorchBackend(tiny_package, device="cpu", max_batch=4, resident=True, paste="device")
    b.load("tiny")
    try:
        got = render_all(b, batches())
    finally:
        b.close()
    largest, differing, total = compare(expected, got)
    assert largest <= 1
    assert differing < 0.001 * total  # measured: a few values in 10^5


def test_bucket_padding_returns_the_unpadded_frames(tiny_package, expected):
    """Batches of 1..4 items run at buckets 1, 2, 4 from static buffers (the CUDA-graph
    path, eager here): a batch of 3 padded to 4 gives the pixels the same 3 items give
    unpadded. (Against the same frames in batches of another size, oneDNN may round a
    value differently: 15 values of a 120x120 face differ by one grey level between a
    batch of 3 and a batch of 1, padding or not, so that is not what is compared.)"""
    b = TorchBackend(tiny_package, device="cpu", max_batch=4, pad=True)
    b.load("tiny")
    try:
        runner = b._models["tiny"].runner
        assert runner is not None and runner.buckets == (1, 2, 4) and not runner.graphed
        got = render_all(b, batches())
    finally:
        b.close()
    assert [len(g) for g in batches()] == [3, 2, 2, 2, 4]  # padded: 3 -> 4; 1 good -> 1
    assert compare(expected, got)[0] == 0


@pytest.mark.parametrize("paste", ["device", "host"])
def test_overlapping_batches_give_the_same_results(tiny_package, paste):
    """Batch k+1 is staged and computed before batch k is encoded (as the runtime's
    threads do, further ahead): with static buffers (which every batch reuses), stream
    audio, and paste-back on the device or left to ``encode``, every JPEG equals the one
    a strictly sequential run makes."""
    groups = batches() + [
        [stream_item(2, 30, "s"), stream_item(3, 31, "s"), InferItem(4)],
        [stream_item(4, 32, "s"), stream_item(6, 33, "t")],
    ]

    def run(ahead: bool) -> list[list]:
        b = TorchBackend(
            tiny_package,
            device="cpu",
            max_batch=4,
            resident=True,
            pad=True,
            paste=paste,
            overlap=ahead,  # off: forward waits for the device (a no-op on CPU)
        )
        b.load("tiny")
        try:
            if ahead:
                forwards = [b.forward("tiny", items) for items in groups]
                return [b.encode(f) for f in forwards]
            return [b.encode(b.forward("tiny", items)) for items in groups]
        finally:
            b.close()

    sequential, ahead = run(False), run(True)
    n = 0
    for s_batch, a_batch in zip(sequential, ahead, strict=True):
        for s, a in zip(s_batch, a_batch, strict=True):
            if isinstance(s, InferResult):
                assert isinstance(a, InferResult) and a.jpeg == s.jpeg and a.bounds == s.bounds
                n += 1
            else:
                assert same(s, a)
    assert n == sum(len(g) for g in groups) - 1  # all but the bad clip


def test_budget_keeps_what_fits_and_stages_the_rest(tiny_package, expected, caplog):
    """A budget that holds the model inputs and crops but not the full frames: crop items
    are pasted on the device, composite ones on the host; pixels as before."""
    from workers.framecache import open_frames
    from workers.package import load_package

    package = load_package(tiny_package, "tiny")
    sizes = {k: open_frames(package.videos[k].path, package.cache_dir).frames.nbytes for k in
             ("rois_320", "model_inputs", "crops_328")}  # fmt: skip
    budget_mb = (sum(sizes.values()) + 1000) / 2**20
    b = TorchBackend(
        tiny_package, device="cpu", max_batch=4, resident=True, gpu_frames_mb=budget_mb
    )
    with caplog.at_level(logging.INFO, logger="workers.engine"):
        b.load("tiny")
    try:
        assert b.resident_videos("tiny") == ["rois_320", "model_inputs", "crops_328"]
        assert "staged from the host: full_body" in caplog.text
        got = render_all(b, batches())
    finally:
        b.close()
    assert compare(expected, got)[0] <= 1
    nothing = TorchBackend(tiny_package, device="cpu", resident=True, gpu_frames_mb=0)
    nothing.load("tiny")
    assert nothing.resident_videos("tiny") == []
    nothing.close()


def test_feathered_paste_back_on_the_device(tiny_package):
    """A model's paste alpha blends the face over the frame in both modes: alpha 1 is the
    hard paste, alpha 0 leaves the frame's own pixels."""
    b = TorchBackend(tiny_package, device="cpu", max_batch=4, resident=True, paste="device")
    b.load("tiny")
    items = [InferItem(6, "crop"), InferItem(6, "composite")]
    try:
        hard = b.render(b.forward("tiny", items))
        m = b._models["tiny"]
        m.paste_alpha = lambda side: torch.ones(side, side)
        ones = b.render(b.forward("tiny", items))
        m.paste_alpha = lambda side: torch.zeros(side, side)
        zeros = b.render(b.forward("tiny", items))
        full = m.frames("full_body")[6]
        x1, y1, x2, y2 = (int(v) for v in m.package.rects[6])
    finally:
        b.close()
    assert all(np.array_equal(h, o) for h, o in zip(hard, ones, strict=True))
    assert np.array_equal(zeros[0], full[y1:y2, x1:x2])
    assert np.array_equal(zeros[1], full)


def test_graphs_on_cpu_fall_back_to_eager_logged_once(tiny_package, caplog):
    import workers.graphs as graphs

    graphs._fallback_logged = False
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            b = TorchBackend(tiny_package, device="cpu", graphs=True)
            b.load("tiny")
            assert b._models["tiny"].runner is None and not b.graphed("tiny")
            b.close()
    assert caplog.text.count("CUDA graphs off, running eagerly: they need a CUDA device") == 1
    assert "decode eager" in caplog.text


# -- on a GPU ---------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@pytest.mark.gpu
@gpu
def test_cuda_path_matches_the_host_path(tiny_package, expected):
    """Everything on the device (resident frames, graphs, tensor paste-back; fp32 so that
    the network rounds as on CPU up to cuDNN's choices): within two grey levels."""
    b = TorchBackend(tiny_package, device="cuda", max_batch=4)
    b.load("tiny")
    try:
        assert b.graphed("tiny")
        assert b.resident_videos("tiny") == [kind for tier in TIERS for kind in tier]
        got = render_all(b, batches())
    finally:
        b.close()
    assert compare(expected, got)[0] <= 2


@pytest.mark.gpu
@gpu
def test_unload_returns_gpu_memory(tiny_package):
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    b = TorchBackend(tiny_package, device="cuda", max_batch=8, fp16=True)
    b.load("tiny")
    b.warmup()
    loaded = torch.cuda.memory_allocated()
    b.close()
    after = torch.cuda.memory_allocated()
    assert loaded > before + 1_000_000  # frames, weights, graphs' buffers
    assert after - before < 1_000_000, (before, loaded, after)


def test_a_feathered_package_blends_alike_on_the_device_and_the_host(tiny_package, tmp_path):
    """``"paste": {"feather_px": N}`` reaches the device paste too: its frames equal the
    host paste's (``workers.paste``) within a grey level, and differ from the hard paste."""
    import json
    import shutil

    models = tmp_path / "models"
    shutil.copytree(tiny_package / "tiny", models / "tiny")
    info_file = models / "tiny" / "package_info.json"
    info = json.loads(info_file.read_text())
    info["paste"] = {"feather_px": 6}
    info_file.write_text(json.dumps(info))
    items = [InferItem(3, "crop"), InferItem(3, "composite")]
    out = {}
    for where, base in (("device", models), ("host", models), ("hard", tiny_package)):
        paste = "host" if where == "hard" else where
        b = TorchBackend(base, device="cpu", max_batch=4, resident=True, paste=paste)
        b.load("tiny")
        try:
            out[where] = b.render(b.forward("tiny", items))
        finally:
            b.close()
    for device, host, hard in zip(out["device"], out["host"], out["hard"], strict=True):
        diff = np.abs(device.astype(int) - host.astype(int))
        assert diff.max() <= 1
        assert not np.array_equal(host, hard)
