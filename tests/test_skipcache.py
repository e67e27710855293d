"""The per-frame image-half cache: same pixels as a plain forward, bounded memory, LRU."""

from __future__ import annotations

import pytest
import torch

from workers.backend import InferItem
from workers.engine import TorchBackend
from workers.skipcache import SkipCache
from workers.unet import WIDTHS, UNet328, prepare_module


@pytest.fixture(scope="module")
def net() -> UNet328:
    torch.manual_seed(0)
    module = UNet328(WIDTHS["quarter"])
    for m in module.modules():  # non-trivial batch-norm statistics, so folding matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return prepare_module(module, "cpu")  # type: ignore[return-value]


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    """Six frames' model inputs, ``[6, 6, 320, 320]``."""
    g = torch.Generator().manual_seed(1)
    return torch.rand(6, 6, 320, 320, generator=g)


def entry_bytes(net: UNet328, frames: torch.Tensor) -> int:
    with torch.inference_mode():
        return sum(t.numel() * t.element_size() for t in net.encode_image(frames[:1]))


def run(cache: SkipCache, net: UNet328, frames: torch.Tensor, ids: list[int], audio):
    """``decode`` through the cache for frame ids ``ids`` (indices into ``frames``)."""
    asked: list[list[int]] = []

    def images(rows: list[int]) -> torch.Tensor:
        asked.append([ids[r] for r in rows])
        return frames[[ids[r] for r in rows]]

    with torch.inference_mode():
        out = net.decode(cache.skips(net.encode_image, ids, images), audio)
    return out, asked


def test_decode_of_cached_skips_equals_the_plain_forward(net, frames):
    cache = SkipCache(1 << 30)
    g = torch.Generator().manual_seed(2)
    for ids in ([0], [1, 2], [2, 0, 0, 3], [3], [4, 1, 4, 5]):
        audio = torch.rand(len(ids), 32, 16, 16, generator=g)
        out, _ = run(cache, net, frames, ids, audio)
        with torch.inference_mode():
            plain = net(frames[ids], audio)
        assert out.shape == plain.shape
        assert torch.allclose(out, plain, atol=1e-5), (ids, (out - plain).abs().max())
    assert cache.misses == 6 and cache.hits == 6 and len(cache) == 6


def test_only_missing_frames_are_encoded_each_once(net, frames):
    cache = SkipCache(1 << 30)
    audio = torch.zeros(4, 32, 16, 16)
    _, asked = run(cache, net, frames, [1, 2, 1, 2], audio)
    assert asked == [[1, 2]]  # repeats in one batch are encoded once
    _, asked = run(cache, net, frames, [2, 3, 1, 3], audio)
    assert asked == [[3]]
    _, asked = run(cache, net, frames, [3, 1, 2, 1], audio)
    assert asked == []  # all cached: the images are not even staged
    assert cache.stats()["misses"] == 3 and cache.stats()["hits"] == 9


def test_budget_evicts_least_recently_used(net, frames):
    size = entry_bytes(net, frames)
    cache = SkipCache(2 * size + size // 2)  # room for two frames
    audio = torch.zeros(1, 32, 16, 16)
    for fid in (0, 1):
        run(cache, net, frames, [fid], audio)
    run(cache, net, frames, [0], audio)  # 0 is now the most recent
    run(cache, net, frames, [2], audio)  # evicts 1, not 0
    assert 0 in cache and 2 in cache and 1 not in cache
    assert cache.bytes == 2 * size <= cache.budget_bytes
    _, asked = run(cache, net, frames, [1], audio)
    assert asked == [[1]]


def test_zero_budget_and_oversized_entries_keep_nothing(net, frames):
    audio = torch.zeros(2, 32, 16, 16)
    for budget in (0, entry_bytes(net, frames) - 1):
        cache = SkipCache(budget)
        out, asked = run(cache, net, frames, [0, 1], audio)
        _, again = run(cache, net, frames, [0, 1], audio)
        assert asked == again == [[0, 1]]
        assert len(cache) == 0 and cache.bytes == 0 and cache.hits == 0
        with torch.inference_mode():
            assert torch.allclose(out, net(frames[[0, 1]], audio), atol=1e-5)


def test_engine_pixels_do_not_depend_on_the_cache(tiny_package):
    """Same package, same requests: the cached engine renders the pixels of the uncached
    one, in whatever batches the frames come (first sight, repeats, mixed)."""
    plain = TorchBackend(tiny_package, device="cpu", skip_cache_mb=0)
    cached = TorchBackend(tiny_package, device="cpu")
    plain.load("tiny")
    cached.load("tiny")
    try:
        for ids in ([3], [3, 4], [5, 3, 3, 7], [7], [4, 5, 6, 7]):
            items = [InferItem(frame_id=i, mode="crop") for i in ids]
            want = plain.render(plain.forward("tiny", items))
            got = cached.render(cached.forward("tiny", items))
            for w, g in zip(want, got, strict=True):
                assert abs(w.astype(int) - g.astype(int)).max() <= 1, ids
        assert cached.skip_cache_stats("tiny")["entries"] == 5
        assert plain.skip_cache_stats("tiny")["entries"] == 0
    finally:
        plain.close()
        cached.close()
    with pytest.raises(ValueError):
        TorchBackend(tiny_package, device="cpu", skip_cache_mb=-1)
