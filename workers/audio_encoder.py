"""SyncTalk_2D's "AVE" audio encoder: one 80×16 mel window → 512 features.

It is Wav2Lip's SyncNet audio tower. Parameter names and shapes are SyncTalk's
(``reference/audio_encoder_state_dict.txt``: ``audio_encoder.N.conv_block.{0,1}``), so its
``audio_visual_encoder.pth`` loads strictly (``workers.checkpoint`` adds the
``audio_encoder.`` prefix the published file lacks).

About 93 M MACs per window: cheap next to the UNet (≈ 4.9 G), but a live stream encodes 16
windows per frame when every request carries its own 640 ms (layout B), so batch them.
Runs on CPU or CUDA; ``workers.unet.prepare_module`` moves it (fp16 on CUDA works too: the
output is post-ReLU and well inside fp16 range).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


__all__ = ["BLOCKS", "FEATURE_DIM", "MEL_BANDS", "MEL_STEPS", "AudioEncoder", "ConvBlock"]

MEL_BANDS = 80
MEL_STEPS = 16
FEATURE_DIM = 512

BLOCKS: tuple[tuple[int, int, int, int | tuple[int, int], int, bool], ...] = (
    # cin, cout, kernel, stride, padding, residual
    (1, 32, 3, 1, 1, False),
    (32, 32, 3, 1, 1, True),
    (32, 32, 3, 1, 1, True),
    (32, 64, 3, (3, 1), 1, False),
    (64, 64, 3, 1, 1, True),
    (64, 64, 3, 1, 1, True),
    (64, 128, 3, 3, 1, False),
    (128, 128, 3, 1, 1, True),
    (128, 128, 3, 1, 1, True),
    (128, 256, 3, (3, 2), 1, False),
    (256, 256, 3, 1, 1, True),
    (256, 512, 3, 1, 0, False),
    (512, 512, 1, 1, 0, False),
)
"""The 13 blocks; spatial size 80×16 → 80×16 → 27×16 → 9×6 → 3×3 → 1×1."""


class ConvBlock(nn.Module):
    """Conv2d (with bias) + BN in ``conv_block``, optional identity skip, then ReLU."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int,
        stride: int | tuple[int, int],
        padding: int,
        residual: bool = False,
    ) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.Conv2d(cin, cout, kernel_size, stride, padding), nn.BatchNorm2d(cout)
        )
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return F.relu(out)


class AudioEncoder(nn.Module):
    """``[B, 1, 80, 16]`` normalised log-mel windows → ``[B, 512]`` (non-negative)."""

    def __init__(self) -> None:
        super().__init__()
        self.audio_encoder = nn.Sequential(*(ConvBlock(*spec) for spec in BLOCKS))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.dim() == 3:  # [B, 80, 16]: add the channel axis
            mel = mel.unsqueeze(1)
        out = self.audio_encoder(mel.to(next(self.parameters()).dtype))
        return out.reshape(out.shape[0], FEATURE_DIM)
