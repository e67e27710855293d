"""Checkpoint loading: the three file forms, the DataParallel prefix, the encoder's optional
prefix, strictness with messages that name the keys, and width inference."""

from __future__ import annotations

import pytest
import torch

from workers.audio_encoder import AudioEncoder
from workers.checkpoint import (
    CheckpointError,
    check_width,
    infer_channels,
    infer_width,
    load_audio_encoder,
    load_state_dict,
    load_unet,
    read_state_dict,
)
from workers.unet import WIDTHS, UNet328


@pytest.fixture(scope="module")
def quarter_state():
    torch.manual_seed(0)
    return UNet328(WIDTHS["quarter"]).state_dict()


def same_weights(a: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    ours = a.state_dict()
    return all(torch.equal(ours[k], v) for k, v in state.items())


@pytest.mark.parametrize("form", ["raw", "model_state_dict", "state_dict", "dataparallel"])
def test_unet_forms_load_strictly(tmp_path, quarter_state, form):
    if form == "raw":
        obj = quarter_state
    elif form == "dataparallel":
        obj = {"state_dict": {f"module.{k}": v for k, v in quarter_state.items()}}
    else:
        obj = {form: quarter_state, "epoch": 7, "optimizer": {"lr": torch.tensor(1e-3)}}
    path = tmp_path / "best_trainloss.pth"
    torch.save(obj, path)
    model = load_unet(path, "quarter")
    assert not model.training
    assert model.channels == WIDTHS["quarter"]
    assert same_weights(model, quarter_state)
    assert same_weights(load_unet(path), quarter_state)  # width from the shapes


def test_missing_key_is_named(tmp_path, quarter_state):
    state = dict(quarter_state)
    del state["outc.conv.bias"]
    path = tmp_path / "ckpt.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_unet(path, "quarter")
    message = str(info.value)
    assert str(path) in message
    assert "1 missing: outc.conv.bias" in message


def test_renamed_key_is_missing_and_unexpected(tmp_path, quarter_state):
    state = {
        ("up1.cnv" + k.removeprefix("up1.conv") if k.startswith("up1.conv.") else k): v
        for k, v in quarter_state.items()
    }
    path = tmp_path / "ckpt.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_unet(path)
    message = str(info.value)
    # 36 entries, of which 6 are num_batches_tracked (not required, so not counted missing)
    assert "30 missing: up1.conv.double_conv.0.conv.0.weight" in message
    assert "(25 more)" in message
    assert "36 unexpected: up1.cnv.double_conv.0.conv.0.weight" in message
    assert "(31 more)" in message


def test_wrong_shape_is_named(tmp_path, quarter_state):
    state = dict(quarter_state)
    state["outc.conv.weight"] = torch.zeros(3, 9, 1, 1)
    path = tmp_path / "ckpt.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"wrong shape: outc\.conv\.weight \[3, 9, 1, 1\]"):
        load_unet(path, "quarter")


def test_old_checkpoint_without_num_batches_tracked_loads(tmp_path, quarter_state):
    state = {k: v for k, v in quarter_state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(state, path)
    assert same_weights(load_unet(path, "quarter"), state)


def test_declared_width_mismatch_is_clear(tmp_path, quarter_state):
    path = tmp_path / "ckpt.pth"
    torch.save(quarter_state, path)
    with pytest.raises(CheckpointError, match="weights are quarter width .* declares full"):
        load_unet(path, "full")
    with pytest.raises(CheckpointError, match="unknown width 'huge'"):
        load_unet(path, "huge")


@pytest.mark.parametrize("width", list(WIDTHS))
def test_infer_width(width):
    state = UNet328(WIDTHS[width]).state_dict()
    assert infer_channels(state) == WIDTHS[width]
    assert infer_width(state) == width
    assert check_width(state, list(WIDTHS[width])) == WIDTHS[width]


def test_infer_width_of_something_else():
    with pytest.raises(CheckpointError, match="not a unet-328 state dict"):
        infer_channels(AudioEncoder().state_dict())


@pytest.mark.parametrize("prefixed", [True, False], ids=["prefixed", "bare"])
def test_encoder_with_and_without_prefix(tmp_path, prefixed):
    torch.manual_seed(3)
    state = AudioEncoder().state_dict()
    if not prefixed:  # the published audio_visual_encoder.pth
        state = {k.removeprefix("audio_encoder."): v for k, v in state.items()}
        assert "0.conv_block.0.weight" in state
    path = tmp_path / "audio_visual_encoder.pth"
    torch.save(state, path)
    encoder = load_audio_encoder(path)
    assert not encoder.training
    got = encoder.state_dict()
    for key, value in state.items():
        full = key if prefixed else f"audio_encoder.{key}"
        assert torch.equal(got[full], value)
    other = AudioEncoder()
    load_state_dict(other, path)
    assert torch.equal(other.state_dict()["audio_encoder.12.conv_block.0.weight"],
                       got["audio_encoder.12.conv_block.0.weight"])  # fmt: skip


def test_encoder_wrong_shape(tmp_path):
    state = AudioEncoder().state_dict()
    state["audio_encoder.3.conv_block.0.weight"] = torch.zeros(64, 32, 1, 1)
    path = tmp_path / "enc.pth"
    torch.save({"model_state_dict": state}, path)
    with pytest.raises(CheckpointError, match=r"audio_encoder\.3\.conv_block\.0\.weight"):
        load_audio_encoder(path)


def test_unet_file_as_encoder_is_refused(tmp_path, quarter_state):
    path = tmp_path / "wrong.pth"
    torch.save(quarter_state, path)
    with pytest.raises(
        CheckpointError,
        match="does not fit AudioEncoder: 78 missing: .* 556 unexpected: audio_model",
    ):
        load_audio_encoder(path)


def test_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_state_dict(tmp_path / "absent.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth: not a readable weights file"):
        read_state_dict(junk)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(CheckpointError, match="no state dict"):
        read_state_dict(listed)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(UNet328(WIDTHS["quarter"]), path)  # a whole module: needs full unpickling
    with pytest.raises(CheckpointError, match="not a readable weights file"):
        read_state_dict(path)
