"""AVE audio encoder: SyncTalk's exact parameter list, and an output that matches running the
13 blocks by hand with torch.nn.functional from the state dict."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from workers.audio_encoder import AudioEncoder


REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"

# (stride, padding, residual) per block, written out from model_facts.md, not from BLOCKS
SPECS = [
    (1, 1, False), (1, 1, True), (1, 1, True),
    ((3, 1), 1, False), (1, 1, True), (1, 1, True),
    (3, 1, False), (1, 1, True), (1, 1, True),
    ((3, 2), 1, False), (1, 1, True),
    (1, 0, False), (1, 0, False),
]  # fmt: skip


def read_reference(name: str) -> list[tuple[str, list[int]]]:
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"reference file {path} is absent (shared/ is not beside the checkout)")
    rows = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split("\t")
            rows.append((key, [int(d) for d in shape.strip("[]").split(",") if d.strip()]))
    return rows


def randomised_encoder(seed: int = 0) -> AudioEncoder:
    torch.manual_seed(seed)
    encoder = AudioEncoder().eval()
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return encoder


def test_state_dict_matches_synctalk_reference_in_order():
    reference = read_reference("audio_encoder_state_dict.txt")
    ours = [(k, list(v.shape)) for k, v in AudioEncoder().state_dict().items()]
    assert ours == reference


def test_parameter_count():
    assert sum(p.numel() for p in AudioEncoder().parameters()) == 2_812_672


def test_output_shape_and_sign():
    encoder = randomised_encoder()
    with torch.inference_mode():
        out = encoder(torch.randn(5, 1, 80, 16))
        out3 = encoder(torch.randn(2, 80, 16))  # channel axis added for the caller
    assert out.shape == (5, 512) and out3.shape == (2, 512)
    assert float(out.min()) >= 0.0  # ends in a ReLU
    assert float(out.max()) > 0.0


def test_output_matches_functional_recomputation():
    encoder = randomised_encoder(1)
    sd = encoder.state_dict()
    mel = torch.rand(3, 1, 80, 16) * 8 - 4
    x = mel
    for i, (stride, padding, residual) in enumerate(SPECS):
        p = f"audio_encoder.{i}.conv_block"
        y = F.conv2d(x, sd[f"{p}.0.weight"], sd[f"{p}.0.bias"], stride=stride, padding=padding)
        y = F.batch_norm(
            y, sd[f"{p}.1.running_mean"], sd[f"{p}.1.running_var"], sd[f"{p}.1.weight"],
            sd[f"{p}.1.bias"], training=False, eps=1e-5,
        )  # fmt: skip
        x = F.relu(y + x if residual else y)
    want = x.reshape(3, 512)
    with torch.inference_mode():
        got = encoder(mel)
    assert float(want.abs().max()) > 0.0
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
