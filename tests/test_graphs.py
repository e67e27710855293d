"""Bucketed static-buffer runs (workers/graphs.py): bucket choice, padding that changes no
result, the lifetime of a result, and CUDA graph capture (on a GPU)."""

from __future__ import annotations

import pytest
import torch

from workers.graphs import StaticRunner, bucket_for, buckets_up_to
from workers.unet import WIDTHS, UNet328, prepare_module


def test_buckets():
    assert buckets_up_to(1) == (1,)
    assert buckets_up_to(4) == (1, 2, 4)
    assert buckets_up_to(6) == (1, 2, 4, 6)
    assert buckets_up_to(32) == (1, 2, 4, 8, 16, 32)
    assert buckets_up_to(100) == (1, 2, 4, 8, 16, 32, 64, 100)
    assert [bucket_for(n, (1, 2, 4, 6)) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    with pytest.raises(ValueError, match="larger than the largest"):
        bucket_for(7, (1, 2, 4, 6))
    with pytest.raises(ValueError):
        buckets_up_to(0)


@pytest.fixture(scope="module")
def net() -> UNet328:
    torch.manual_seed(0)
    return prepare_module(UNet328(WIDTHS["quarter"]), "cpu")  # type: ignore[return-value]


def decode_runner(net: UNet328, buckets, graphs: bool, device="cpu") -> StaticRunner:
    with torch.inference_mode():
        probe = net.encode_image(torch.zeros(1, 6, 320, 320, device=device))
        examples = [
            torch.zeros((buckets[-1], *t.shape[1:]), dtype=t.dtype, device=device).contiguous(
                memory_format=torch.channels_last
            )
            for t in probe
        ]
        examples.append(torch.zeros(buckets[-1], 32, 16, 16, device=device))
        return StaticRunner(lambda *t: net.decode(t[:-1], t[-1]), examples, buckets, graphs=graphs)


def test_padded_batches_equal_unpadded_ones(net):
    """A batch of n runs at its bucket over whatever earlier batches left in the static
    buffers: the first n rows are exactly the unpadded result."""
    runner = decode_runner(net, (1, 2, 4, 8), graphs=False)
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for n in (8, 3, 1, 5, 2):  # a full batch first, so later ones pad over real data
            image = torch.rand(n, 6, 320, 320, generator=g)
            audio = torch.rand(n, 32, 16, 16, generator=g)
            skips = net.encode_image(image)
            want = net.decode(skips, audio)
            got = runner.run([*skips, audio])
            assert got.shape == want.shape
            assert torch.equal(got, want), n


def test_a_result_lives_until_the_next_run(net):
    """The contract the engine relies on: a result is a view of a static buffer."""
    runner = decode_runner(net, (1, 2), graphs=False)
    with torch.inference_mode():
        skips = net.encode_image(torch.rand(2, 6, 320, 320))
        first = runner.run([*skips, torch.zeros(2, 32, 16, 16)])
        kept = first.clone()
        runner.run([*skips, torch.ones(2, 32, 16, 16)])
    assert not torch.equal(first, kept)  # overwritten: consume or copy before the next run


def test_inputs_must_have_the_largest_bucket(net):
    with pytest.raises(ValueError, match="4 rows"):
        StaticRunner(lambda x: x, [torch.zeros(2, 3)], (1, 2, 4), graphs=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_equal_eager_runs():
    torch.manual_seed(0)
    gnet = prepare_module(UNet328(WIDTHS["quarter"]), "cuda", half=True)
    runner = decode_runner(gnet, (1, 2, 4), graphs=True, device="cuda")
    assert runner.graphed
    g = torch.Generator(device="cuda").manual_seed(2)
    with torch.inference_mode():
        for n in (4, 3, 1):
            image = torch.rand(n, 6, 320, 320, generator=g, device="cuda")
            audio = torch.rand(n, 32, 16, 16, generator=g, device="cuda")
            skips = gnet.encode_image(image)
            want = gnet.decode(skips, audio).float()
            got = runner.run([*skips, audio]).float()
            # cuDNN may pick other kernels for a bucket than for n: fp16 rounding only.
            assert (got - want).abs().max() < 2e-3, n
    runner.release()
