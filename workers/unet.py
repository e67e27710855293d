"""SyncTalk_2D's UNet-328 (``Model(n_channels=6, mode="ave")``), re-implemented.

Why a re-implementation and not a copy: we need the exact parameter names, shapes and order
of SyncTalk_2D's module (so that its ``torch.save(net.state_dict())`` checkpoints load with
``strict=True``; ``reference/unet328_ave_state_dict.txt`` lists them), plus narrow variants
for CPU demos and tests, and nothing else (no hubert/wenet branches, no thop or ONNX code).
Module names below are therefore dictated by the checkpoint, not by taste: ``conv`` holds an
inverted residual's 8 layers, ``double_conv``, ``inconv``, ``maxpool_conv`` (which holds no
max-pool: the stride-2 depthwise conv does the downsampling) and so on.

Attribute order in ``UNet328.__init__`` is the state-dict order: ``audio_model``,
``fuse_conv``, ``inc``, ``down1..5``, ``up1..5``, ``outc``.

Devices: the module runs on CPU (tests, demos; full width ≈ 0.25-0.4 s per frame on 2 cores)
and is meant for CUDA. ``prepare_module`` moves a module to a device in eval mode, optionally
to fp16 (CUDA only: CPU fp16 convolutions are slow or missing), and by default to
channels_last (NHWC). NHWC pays on both devices: on CUDA it lets cuDNN use tensor-core
kernels for the 1×1 and depthwise convs; on CPU (oneDNN, torch 2.13) it measured ~1.4× faster
than NCHW at every width. Inputs may come in either layout (the first conv converts; passing
NHWC saves nothing measurable); the output is then NHWC-strided, so ``out.permute(0, 2, 3, 1)``
is already contiguous HWC. ``forward`` casts its inputs to the module's dtype, so callers can
always hand in float32.

``prepare_module`` also folds every batch norm that follows a convolution into that
convolution's weights and bias (``fold_batchnorm``): in eval mode a batch norm is a fixed
per-channel affine map, and on CPU it measured ~20% of a quarter-width forward (one more
pass over every activation). Folded, the quarter-width forward went from ~45 to ~35 ms per
frame on 2 cores; outputs change by float rounding only (~1e-7).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


__all__ = [
    "AUDIO_CHANNELS",
    "IMAGE_SIZE",
    "WIDTHS",
    "AudioConvAve",
    "DoubleConvDW",
    "InvertedResidual",
    "UNet328",
    "fold_batchnorm",
    "prepare_module",
    "resolve_device",
    "width_name",
]

WIDTHS: dict[str, tuple[int, int, int, int, int]] = {
    "full": (32, 64, 128, 256, 512),
    "half": (16, 32, 64, 128, 256),
    "quarter": (8, 16, 32, 64, 128),
}
"""Channel lists by width name. ``full`` is SyncTalk_2D's; the others are for CPU."""

IMAGE_SIZE = 320
"""The only input size that works: the audio branch is 10×10 and must meet 320 / 2**5."""

AUDIO_CHANNELS = 32
"""16 feature rows × 512 floats fold into 32×16×16 at every width."""


def width_name(channels: Sequence[int]) -> str | None:
    """The name of a channel list in ``WIDTHS``, or None for a non-standard one."""
    for name, chs in WIDTHS.items():
        if tuple(channels) == chs:
            return name
    return None


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand → BN → ReLU → 3×3 depthwise → BN → ReLU → 1×1 → BN.

    The identity skip is a constructor flag (as in SyncTalk_2D), not derived from the shapes.
    """

    def __init__(
        self, inp: int, oup: int, stride: int, use_res_connect: bool, expand_ratio: int = 2
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, not {stride}")
        if use_res_connect and (inp != oup or stride != 1):
            raise ValueError("a residual block needs inp == oup and stride 1")
        hidden = inp * expand_ratio
        self.use_res_connect = use_res_connect
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class DoubleConvDW(nn.Module):
    """Two inverted residuals: ``in → out`` (stride ``stride``), then ``out → out`` with skip."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        self.double_conv = nn.Sequential(
            InvertedResidual(in_channels, out_channels, stride, use_res_connect=False),
            InvertedResidual(out_channels, out_channels, 1, use_res_connect=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class _InConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.inconv = nn.Sequential(
            InvertedResidual(in_channels, out_channels, 1, use_res_connect=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inconv(x)


class _Down(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(DoubleConvDW(in_channels, out_channels, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class _Up(nn.Module):
    """Bilinear ×2 (align_corners=True), pad to the skip's size, concat [up, skip], convolve."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = DoubleConvDW(in_channels, out_channels, stride=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        dy = skip.shape[2] - x.shape[2]
        dx = skip.shape[3] - x.shape[3]
        if dy or dx:
            x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([x, skip], dim=1))


class _OutConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class AudioConvAve(nn.Module):
    """The ``ave`` audio branch: ``[B, 32, 16, 16]`` → ``[B, ch4, 10, 10]``.

    ``conv1`` takes 32 channels at every width: the input is 16 rows of 512 features folded
    to 32×16×16, whatever the image width (at full width ch0 is 32 anyway).
    """

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        ch = list(channels)
        self.conv1 = InvertedResidual(AUDIO_CHANNELS, ch[1], 1, use_res_connect=False)
        self.conv2 = InvertedResidual(ch[1], ch[2], 1, use_res_connect=False)
        self.conv3 = nn.Conv2d(ch[2], ch[3], kernel_size=3, stride=1, padding=1)
        self.bn3 = nn.BatchNorm2d(ch[3])
        self.conv4 = InvertedResidual(ch[3], ch[3], 1, use_res_connect=True)
        self.conv5 = nn.Conv2d(ch[3], ch[4], kernel_size=3, stride=2, padding=3)
        self.bn5 = nn.BatchNorm2d(ch[4])
        self.conv6 = InvertedResidual(ch[4], ch[4], 1, use_res_connect=True)
        self.conv7 = InvertedResidual(ch[4], ch[4], 1, use_res_connect=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.conv1(x))
        x = F.relu(self.bn3(self.conv3(x)))
        x = self.conv4(x)
        x = F.relu(self.bn5(self.conv5(x)))
        return self.conv7(self.conv6(x))


class UNet328(nn.Module):
    """UNet-328, mode ``ave``: ``(image [B,6,320,320], audio [B,32,16,16])`` → ``[B,3,320,320]``.

    ``image`` is BGR in [0, 1]: channels 0-2 the face region, 3-5 the same with the mouth
    masked. The output is a sigmoid, so it lies in [0, 1]. ``channels`` is one of ``WIDTHS``
    (any 5 even numbers work, but only the listed ones have a name packages can declare).
    """

    def __init__(self, channels: Sequence[int] = WIDTHS["full"]) -> None:
        super().__init__()
        ch = tuple(int(c) for c in channels)
        if len(ch) != 5 or any(c <= 0 or c % 2 for c in ch):
            raise ValueError(f"channels must be 5 positive even numbers, not {channels!r}")
        self.channels = ch
        # Declaration order is the state-dict order of SyncTalk_2D's Model: keep it.
        self.audio_model = AudioConvAve(ch)
        self.fuse_conv = nn.Sequential(
            DoubleConvDW(ch[4] * 2, ch[4], stride=1),
            DoubleConvDW(ch[4], ch[3], stride=1),
        )
        self.inc = _InConv(6, ch[0])
        self.down1 = _Down(ch[0], ch[0])
        self.down2 = _Down(ch[0], ch[1])
        self.down3 = _Down(ch[1], ch[2])
        self.down4 = _Down(ch[2], ch[3])
        self.down5 = _Down(ch[3], ch[4])
        self.up1 = _Up(ch[4], ch[3] // 2)
        self.up2 = _Up(ch[3], ch[2] // 2)
        self.up3 = _Up(ch[2], ch[1] // 2)
        self.up4 = _Up(ch[1], ch[0])
        self.up5 = _Up(ch[1], ch[0] // 2)
        self.outc = _OutConv(ch[0] // 2, 3)

    @property
    def width(self) -> str | None:
        """``full``, ``half``, ``quarter``, or None for a non-standard channel list."""
        return width_name(self.channels)

    def forward(self, image: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode_image(image), audio)

    def encode_image(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The image half: ``(x1, ..., x6)``, the five skips and the bottleneck.

        Split out because it does not depend on the audio: for a package's frame ``i`` it is
        always the same, so a worker can keep it per frame (``workers.skipcache``) and run
        only ``decode`` for every later request of that frame.
        """
        x1 = self.inc(image.to(self.outc.conv.weight.dtype))
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x6 = self.down5(x5)
        return x1, x2, x3, x4, x5, x6

    def decode(self, skips: Sequence[torch.Tensor], audio: torch.Tensor) -> torch.Tensor:
        """The audio branch, the fusion and the decoder, from ``encode_image``'s output."""
        return self.decode_features(skips, self.audio_model(audio.to(skips[5].dtype)))

    def decode_features(self, skips: Sequence[torch.Tensor], audio: torch.Tensor) -> torch.Tensor:
        """Fusion and decoder from the skips and the audio branch's output ``[B, ch4, h, w]``
        (``h, w`` those of the bottleneck), for callers that shape that map themselves
        (the demo trainer crops it to match image crops)."""
        x1, x2, x3, x4, x5, x6 = skips
        x = self.fuse_conv(torch.cat([x6, audio], dim=1))
        x = self.up1(x, x5)
        x = self.up2(x, x4)
        x = self.up3(x, x3)
        x = self.up4(x, x2)
        x = self.up5(x, x1)
        return torch.sigmoid(self.outc(x))


def resolve_device(spec: str | torch.device = "auto", index: int = 0) -> torch.device:
    """``auto`` → CUDA device ``index mod count`` when there is one, else CPU; anything else
    as given. ``index`` is the worker's slot on its host (supervisord's process number), so
    N workers started with ``--device auto`` spread over the host's GPUs."""
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device(f"cuda:{index % torch.cuda.device_count()}")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} asked for but cuda is not available")
    return device


def fold_batchnorm(module: nn.Module) -> int:
    """Fold each ``BatchNorm2d`` that directly follows a ``Conv2d`` in an ``nn.Sequential``
    into the convolution (which gains a bias), leaving ``nn.Identity`` in its place; returns
    how many were folded. Eval mode only: the fold bakes in the running statistics, so a
    folded module can no longer train or load a checkpoint (its state dict has lost the
    batch norms). In place."""
    if module.training:
        raise ValueError("fold_batchnorm needs a module in eval mode")
    folded = 0
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                seq[i] = fuse_conv_bn_eval(conv, bn)
                seq[i + 1] = nn.Identity()
                folded += 1
    return folded


def prepare_module(
    module: nn.Module,
    device: str | torch.device = "cpu",
    *,
    half: bool = False,
    channels_last: bool = True,
    fold: bool = True,
) -> nn.Module:
    """Put ``module`` in eval mode on ``device``, optionally fp16, and channels_last, with
    its batch norms folded into the convolutions before them (``fold``).

    ``half`` is refused on CPU. ``channels_last`` is on by default because it is faster on
    both CPU and CUDA for this network (see the module docstring); inputs need no matching
    layout, and ``UNet328.forward`` casts the dtype. Folding happens in float32, before the
    cast to fp16, so fp16 rounds the folded weights once.
    """
    dev = resolve_device(device)
    if half and dev.type != "cuda":
        raise ValueError("fp16 needs a cuda device")
    module = module.eval()
    if fold:
        fold_batchnorm(module)
    module = module.to(dev)
    if half:
        module = module.half()
    if channels_last:
        module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return module
