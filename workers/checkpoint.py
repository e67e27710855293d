"""Loading SyncTalk_2D checkpoints into our modules, strictly, with errors a person can act on.

Checkpoints come in the shapes people actually save: a raw state dict, or a training dict
holding it under ``model_state_dict`` / ``state_dict``; keys may carry DataParallel's
``module.`` prefix; the published audio encoder lacks the ``audio_encoder.`` prefix that
SyncTalk adds when it loads. All of that is normalised, then the load is strict: a
checkpoint that does not fit is refused with a ``CheckpointError`` naming the file and the
keys, never half-loaded (a half-loaded UNet produces plausible-looking garbage).

Files are read with ``torch.load(weights_only=True)``: a package is data, and unpickling
arbitrary objects from it would let a package run code in the worker.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.audio_encoder import AudioEncoder
from workers.unet import WIDTHS, UNet328, width_name


__all__ = [
    "CheckpointError",
    "check_width",
    "infer_channels",
    "infer_width",
    "load_audio_encoder",
    "load_state_dict",
    "load_strict",
    "load_unet",
    "read_state_dict",
]

_WRAPPER_KEYS = ("model_state_dict", "state_dict")
_ENCODER_PREFIX = "audio_encoder."
_SHOW = 5  # keys listed per category in an error message


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the module."""


StateDict = dict[str, torch.Tensor]


def read_state_dict(path: str | os.PathLike[str]) -> StateDict:
    """Read a checkpoint file into a plain state dict on CPU.

    Unwraps ``{"model_state_dict": ...}`` / ``{"state_dict": ...}`` and strips a
    ``module.`` prefix. Raises ``CheckpointError`` for a missing or unreadable file or one
    that holds no tensors.
    """
    p = Path(path)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{p}: no such file") from None
    except Exception as exc:  # pickle, zip and weights_only errors all land here
        raise CheckpointError(f"{p}: not a readable weights file ({exc})") from exc
    return _normalise(obj, p)


def _normalise(obj: Any, path: Path) -> StateDict:
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: no state dict in file (found {type(obj).__name__})")
    state: StateDict = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: not a state dict (entry {key!r} is {type(value).__name__})"
            )
        state[key.removeprefix("module.")] = value
    return state


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Load ``state`` into ``module`` with ``strict=True``, or raise ``CheckpointError``.

    The message lists missing keys, unexpected keys and shape mismatches (the first few of
    each, with counts). Missing ``num_batches_tracked`` buffers are tolerated, as torch
    itself does for checkpoints from before they existed.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {list(state[k].shape)} (want {list(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = [
            _listing("missing", missing),
            _listing("unexpected", unexpected),
            _listing("wrong shape", wrong),
        ]
        what = type(module).__name__
        raise CheckpointError(f"{path}: does not fit {what}: " + "; ".join(p for p in parts if p))
    try:
        module.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:  # pragma: no cover - the checks above should catch it all
        raise CheckpointError(f"{path}: {exc}") from exc


def _listing(label: str, items: Sequence[str]) -> str:
    if not items:
        return ""
    more = f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return f"{len(items)} {label}: " + ", ".join(items[:_SHOW]) + more


def infer_channels(state: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """The UNet channel list a state dict was trained with, read from its shapes.

    ``ch[0]`` is the output width of ``inc``; ``ch[k]`` the output width of ``down{k+1}``.
    Raises ``CheckpointError`` if the keys are not a UNet-328's.
    """
    names = ["inc.inconv.0.conv.7.weight"] + [
        f"down{k}.maxpool_conv.0.double_conv.1.conv.7.weight" for k in range(2, 6)
    ]
    try:
        return tuple(int(state[n].shape[0]) for n in names)
    except KeyError as exc:
        raise CheckpointError(f"not a unet-328 state dict (no {exc.args[0]})") from None


def infer_width(state: Mapping[str, torch.Tensor]) -> str | None:
    """``full`` / ``half`` / ``quarter`` from the shapes, or None for other channel lists."""
    return width_name(infer_channels(state))


def check_width(
    state: Mapping[str, torch.Tensor], declared: str | Sequence[int], path: str | Path = "?"
) -> tuple[int, ...]:
    """Check a UNet state dict against the width a package declares; return its channels.

    ``declared`` is a width name or a channel list (a package's ``model.channels``).
    """
    if isinstance(declared, str):
        if declared not in WIDTHS:
            raise CheckpointError(f"{path}: unknown width {declared!r} (known: {list(WIDTHS)})")
        want: tuple[int, ...] = WIDTHS[declared]
    else:
        want = tuple(int(c) for c in declared)
    try:
        got = infer_channels(state)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if got != want:
        raise CheckpointError(
            f"{path}: weights are {width_name(got) or 'custom'} width {list(got)}, "
            f"but the package declares {width_name(want) or 'custom'} {list(want)}"
        )
    return got


def load_unet(path: str | os.PathLike[str], width: str | Sequence[int] | None = None) -> UNet328:
    """A ``UNet328`` in eval mode on CPU with the weights of ``path``.

    ``width`` is what the package declares (name or channel list); None means: whatever
    the weights say. Move it with ``workers.unet.prepare_module``.
    """
    p = Path(path)
    state = read_state_dict(p)
    channels = check_width(state, width, p) if width is not None else _channels_or_raise(state, p)
    model = UNet328(channels)
    load_strict(model, state, p)
    return model.eval()


def _channels_or_raise(state: StateDict, path: Path) -> tuple[int, ...]:
    try:
        return infer_channels(state)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def load_audio_encoder(path: str | os.PathLike[str]) -> AudioEncoder:
    """An ``AudioEncoder`` in eval mode on CPU, from a file with or without key prefix."""
    p = Path(path)
    encoder = AudioEncoder()
    load_strict(encoder, _with_encoder_prefix(read_state_dict(p)), p)
    return encoder.eval()


def _with_encoder_prefix(state: StateDict) -> StateDict:
    """SyncTalk's published file says ``0.conv_block.0.weight``; the module wants the prefix."""
    if not all(k.split(".", 1)[0].isdigit() for k in state):
        return state  # prefixed already, or something else: report its real keys
    return {_ENCODER_PREFIX + k: v for k, v in state.items()}


def load_state_dict(module: nn.Module, path: str | os.PathLike[str]) -> None:
    """Read ``path`` and load it strictly into an existing module (UNet or encoder)."""
    p = Path(path)
    state = read_state_dict(p)
    if isinstance(module, AudioEncoder):
        state = _with_encoder_prefix(state)
    load_strict(module, state, p)
