"""UNet-328: SyncTalk_2D's exact parameter list, parameter counts, and a forward pass that
matches an independent functional re-computation from the state dict."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workers.unet import WIDTHS, UNet328, fold_batchnorm, prepare_module, resolve_device


REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def read_reference(name: str) -> list[tuple[str, list[int]]]:
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"reference file {path} is absent (shared/ is not beside the checkout)")
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape = line.split("\t")
        rows.append((key, [int(d) for d in shape.strip("[]").split(",") if d.strip()]))
    return rows


def test_state_dict_matches_synctalk_reference_in_order():
    reference = read_reference("unet328_ave_state_dict.txt")
    ours = [(k, list(v.shape)) for k, v in UNet328().state_dict().items()]
    assert len(ours) == len(reference) == 556
    assert ours == reference


@pytest.mark.parametrize(
    ("width", "count"), [("full", 12_186_935), ("half", 3_095_471), ("quarter", 799_403)]
)
def test_parameter_count(width, count):
    model = UNet328(WIDTHS[width])
    assert sum(p.numel() for p in model.parameters()) == count
    assert model.width == width


@pytest.mark.parametrize("width", ["half", "quarter"])
def test_narrow_audio_branch_still_takes_32_channels(width):
    model = UNet328(WIDTHS[width])
    assert model.audio_model.conv1.conv[0].weight.shape[1] == 32
    assert model.inc.inconv[0].conv[6].weight.shape[0] == WIDTHS[width][0]


@pytest.mark.parametrize("width", list(WIDTHS))
def test_forward_shape_and_range(width):
    torch.manual_seed(0)
    model = UNet328(WIDTHS[width]).eval()
    image = torch.rand(2, 6, 320, 320)
    audio = torch.rand(2, 32, 16, 16)
    with torch.inference_mode():
        out = model(image, audio)
    assert out.shape == (2, 3, 320, 320)
    assert out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # the two items differ, and so must their outputs (no batch mixing, no constant output)
    assert not torch.allclose(out[0], out[1])


def test_rejects_bad_channels():
    with pytest.raises(ValueError, match="channels"):
        UNet328((32, 64, 128))


def test_resolve_and_prepare_on_cpu():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    model = prepare_module(UNet328(WIDTHS["quarter"]).train(), "cpu")
    assert not model.training
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16"):
            prepare_module(UNet328(WIDTHS["quarter"]), "cpu", half=True)


def test_channels_last_gives_the_same_output():
    torch.manual_seed(1)
    model = UNet328(WIDTHS["quarter"]).eval()
    image, audio = torch.rand(1, 6, 320, 320), torch.rand(1, 32, 16, 16)
    with torch.inference_mode():
        want = model(image, audio)
        prepare_module(model, "cpu", channels_last=True)
        got = model(image.to(memory_format=torch.channels_last), audio)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_folding_batch_norms_keeps_the_output() -> None:
    """Every batch norm after a conv is folded (the audio branch's bn3/bn5, used by name in
    its forward, stay) and the output moves by float rounding only, with running
    statistics far from the identity (a freshly built model's would hide a wrong fold)."""
    torch.manual_seed(2)
    model = UNet328(WIDTHS["quarter"]).eval()
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.3, 3)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.5, 0.5)
    image, audio = torch.rand(2, 6, 320, 320), torch.rand(2, 32, 16, 16)
    total = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.inference_mode():
        want = model(image, audio)
        prepare_module(model, "cpu")
        got = model(image, audio)
    left = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert left == ["audio_model.bn3", "audio_model.bn5"]
    assert total > 50
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(UNet328(WIDTHS["quarter"]).train())


# --- independent re-computation ------------------------------------------------------------


def _bn(sd, name, x):
    return F.batch_norm(
        x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
        sd[f"{name}.bias"], training=False, eps=1e-5,
    )  # fmt: skip


def _ir(sd, name, x, stride, residual):
    y = F.relu(_bn(sd, f"{name}.conv.1", F.conv2d(x, sd[f"{name}.conv.0.weight"])))
    w = sd[f"{name}.conv.3.weight"]
    y = F.conv2d(y, w, stride=stride, padding=1, groups=w.shape[0])
    y = F.relu(_bn(sd, f"{name}.conv.4", y))
    y = _bn(sd, f"{name}.conv.7", F.conv2d(y, sd[f"{name}.conv.6.weight"]))
    return x + y if residual else y


def _dcdw(sd, name, x, stride):
    x = _ir(sd, f"{name}.double_conv.0", x, stride, False)
    return _ir(sd, f"{name}.double_conv.1", x, 1, True)


def _reference_forward(sd, image, audio):
    x1 = _ir(sd, "inc.inconv.0", image, 1, False)
    skips = [x1]
    for k in range(1, 6):
        skips.append(_dcdw(sd, f"down{k}.maxpool_conv.0", skips[-1], 2))
    a = _ir(sd, "audio_model.conv1", audio, 1, False)
    a = _ir(sd, "audio_model.conv2", a, 1, False)
    a = F.conv2d(a, sd["audio_model.conv3.weight"], sd["audio_model.conv3.bias"], padding=1)
    a = F.relu(_bn(sd, "audio_model.bn3", a))
    a = _ir(sd, "audio_model.conv4", a, 1, True)
    a = F.conv2d(
        a, sd["audio_model.conv5.weight"], sd["audio_model.conv5.bias"], stride=2, padding=3
    )
    a = F.relu(_bn(sd, "audio_model.bn5", a))
    a = _ir(sd, "audio_model.conv7", _ir(sd, "audio_model.conv6", a, 1, True), 1, True)
    x = torch.cat([skips[5], a], dim=1)
    x = _dcdw(sd, "fuse_conv.1", _dcdw(sd, "fuse_conv.0", x, 1), 1)
    for k in range(1, 6):
        skip = skips[5 - k]
        x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=True)
        x = _dcdw(sd, f"up{k}.conv", torch.cat([x, skip], dim=1), 1)
    return torch.sigmoid(F.conv2d(x, sd["outc.conv.weight"], sd["outc.conv.bias"]))


def test_forward_matches_functional_recomputation():
    torch.manual_seed(2)
    model = UNet328(WIDTHS["quarter"]).eval()
    # non-trivial BN statistics, so that a mis-wired BN or a missing skip would show
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    image, audio = torch.rand(1, 6, 320, 320), torch.rand(1, 32, 16, 16)
    with torch.inference_mode():
        got = model(image, audio)
        want = _reference_forward(model.state_dict(), image, audio)
    assert float((want - 0.5).abs().max()) > 1e-3  # the comparison is not between constants
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
