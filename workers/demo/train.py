"""Train the demo's quarter-width UNet-328 and AVE audio encoder on CPU, in minutes, seeded.

A full-resolution UNet-328 step costs about 0.4 s per sample on two CPU cores, which buys
only a few hundred samples in the time we have: not enough for a randomly initialised UNet
even to learn to copy its reference frame, let alone draw a mouth. So:

1. **encoder** (``encoder_steps``): the audio encoder plus a small linear head learn to
   predict the mouth openings and widths of the 5 frames its 0.2 s window covers. Cheap
   (mel windows only), and it leaves the encoder with features in which "how open" is
   linear.
2. **unet** (``unet_steps``): the UNet starts as a copy machine (``_identity_init``: its
   full-resolution path passes the reference frame straight to the output, the deep path
   starts with zero say), so every step goes into drawing the mouth the audio asks for.
   The encoder is fixed here (every clip's features are computed once), and the UNet sees
   160×192 crops of the 320×320 face region (a third of the cost per sample). Crops are
   aligned to the UNet's 32-pixel bottleneck grid and the audio branch's 10×10 map is cut
   to the same cells, so each cell learns exactly the job it has at full size.
3. **joint** (``joint_steps``): both networks end to end at full resolution, the
   encoder's 16 windows per sample included, at a lower learning rate (the encoder's
   batch-norm statistics stay frozen). Then every UNet batch norm's running statistics
   are recomputed as the plain average of the statistics of stage-2 batches (crops, 8 per
   batch): the ones the network learned with. Computed on whole frames instead (as the
   first version did) they differ (a whole face region varies more than a crop), the copy
   path standardises every pixel a little off, and the served face region came out
   tinted, a square patch on the face: mean error on idle frames 6.9 grey levels against
   3.1 with crop statistics, same lip-sync.

Loss: L1 on BGR in [0, 1], weighted ``1 + mouth_extra`` where the target differs from the
reference frame (the mouth being drawn). Reproducible: one seed drives numpy and torch,
deterministic algorithms, a fixed intra-op thread count (identical run to run on one
machine and thread count; other CPUs may round differently).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workers.audio import audio_window
from workers.audio_encoder import AudioEncoder
from workers.demo.avatar import Pose
from workers.demo.dataset import Clip, target_roi
from workers.demo.progress import Progress
from workers.unet import WIDTHS, UNet328


__all__ = ["TrainConfig", "TrainResult", "train"]

_HEAD_FRAMES = 5  # frames a mel window covers (0.2 s at 25 fps)
_CROP = (160, 192)  # height, width of stage-2 crops (multiples of 32)
_GATE = 0.1  # initial scale of the deep path's weights into the copied output
_SECONDS_PER_SAMPLE = {"encoder": 0.009, "unet": 0.075, "joint": 0.6}
"""Rough cost of one training sample per stage on a 2-core laptop: the progress bar's units."""


@dataclass(slots=True)
class TrainConfig:
    seed: int = 0
    width: str = "quarter"
    speech_seconds: float = 240.0  # synthetic speech to train on, cut into clips
    clip_seconds: float = 12.0
    encoder_steps: int = 150
    encoder_batch: int = 64
    encoder_lr: float = 2e-3
    unet_steps: int = 360
    unet_batch: int = 8
    unet_lr: float = 3e-3
    joint_steps: int = 40
    joint_batch: int = 2
    joint_lr: float = 3e-4
    mouth_extra: float = 4.0
    layout_b_prob: float = 0.3
    calibration_batches: int = 8
    aux_weight: float = 0.5
    random_reference: float = 0.5
    threads: int = 2

    def units(self) -> int:
        """Work units for the progress bar (≈ seconds on a 2-core laptop)."""
        return int(
            self.encoder_steps * self.encoder_batch * _SECONDS_PER_SAMPLE["encoder"]
            + self.unet_steps * self.unet_batch * _SECONDS_PER_SAMPLE["unet"]
            + self.joint_steps * self.joint_batch * _SECONDS_PER_SAMPLE["joint"]
        )


@dataclass(slots=True)
class TrainResult:
    unet: UNet328
    encoder: AudioEncoder
    log: dict[str, Any] = field(default_factory=dict)


def _seed_everything(seed: int, threads: int) -> None:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def _cosine(step: int, total: int, lr: float, warmup: int = 10) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


class _Sampler:
    """Draws (clip, frame) pairs and builds their targets; all randomness from one rng."""

    def __init__(self, clips: list[Clip], poses: list[Pose], rng: np.random.Generator) -> None:
        self.clips = clips
        self.poses = poses
        self.rng = rng
        sizes = np.array([c.n_frames for c in clips], dtype=np.float64)
        self.p = sizes / sizes.sum()

    def frame(self) -> tuple[int, int]:
        c = int(self.rng.choice(len(self.clips), p=self.p))
        return c, int(self.rng.integers(0, self.clips[c].n_frames))

    def head_targets(self, c: int, i: int) -> np.ndarray:
        s = self.clips[c].speech
        idx = np.minimum(np.arange(i, i + _HEAD_FRAMES), s.n_frames - 1)
        return np.concatenate([s.opening[idx], s.width[idx] - 1.0]).astype(np.float32)

    def target(self, c: int, i: int, j: int) -> np.ndarray:
        s = self.clips[c].speech
        return target_roi(self.poses[j], float(s.opening[i]), float(s.width[i]))

    def reference(self, j: int, rois: np.ndarray, prob: float) -> np.ndarray:
        """The image input's face region for pose ``j``: the package's own (closed-mouth,
        video-decoded) frame, or with probability ``prob`` the pose drawn with a random
        mouth and JPEG-compressed like a video frame.

        Why random mouths: with the reference always closed, the cheapest way down the
        loss is a local colour rule on the full-resolution path ("lips become a half-open
        mouth") that never looks at the audio. A reference whose mouth has nothing to do
        with the target leaves the audio as the only source of the mouth (SyncTalk_2D
        trains the same way: its reference is another frame of the video).
        """
        if self.rng.uniform() >= prob:
            return rois[j]
        opening = float(self.rng.choice([0.0, self.rng.uniform(0.0, 1.0)]))
        roi = target_roi(self.poses[j], opening, float(self.rng.uniform(0.7, 1.25)))
        ok, jpeg = cv2.imencode(".jpg", roi, [cv2.IMWRITE_JPEG_QUALITY, 90])
        decoded = cv2.imdecode(jpeg, cv2.IMREAD_COLOR) if ok else None
        return decoded if decoded is not None else roi


def _to_chw(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` → float ``[B, 3, H, W]`` in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


def _layout_b(window: np.ndarray, feats: np.ndarray, i: int) -> np.ndarray:
    """What a layout-B request sees: the clip ends 7 frames after ``i``, so the last four
    rows' mel windows are clamped to the clip's end (≈ row 11's window)."""
    rows = window.reshape(16, 512).copy()
    src = min(i + 3, feats.shape[0] - 1)
    rows[12:] = feats[src]
    return rows.reshape(window.shape)


def _forward_crops(
    unet: UNet328, image: torch.Tensor, audio: torch.Tensor, cells: list[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """UNet forward on crops; ``cells[b]`` is the (row, col) of crop b's first 32-px cell.
    Also returns the audio branch's whole 10×10 map (for the auxiliary loss)."""
    skips = unet.encode_image(image)
    h, w = skips[5].shape[2], skips[5].shape[3]
    a_full = unet.audio_model(audio)
    a = torch.stack([a_full[b, :, r : r + h, q : q + w] for b, (r, q) in enumerate(cells)])
    return unet.decode_features(skips, a), a_full


def _pass_through(block: nn.Module, src: list[int], dst: list[int]) -> None:
    """Make an inverted residual copy input channel ``src[k]`` to output ``dst[k]``.

    Hidden channel k reads only ``src[k]``; its batch norms get a large shift so the ReLUs
    after them never clip (the face region is mostly one skin tone, so the lips and the
    mouth lie many standard deviations away from the mean); the depthwise 3×3 keeps only
    its centre tap, so image borders add nothing. Each batch norm normalises, so output
    ``dst[k]`` is input ``src[k]`` standardised.
    """
    conv: Any = block.conv  # nn.Module attributes are untyped chains
    with torch.no_grad():
        for k, (s, d) in enumerate(zip(src, dst, strict=True)):
            conv[0].weight[k].zero_()
            conv[0].weight[k, s, 0, 0] = 1.0
            conv[3].weight[k].zero_()
            conv[3].weight[k, 0, 1, 1] = 1.0
            for bn in (conv[1], conv[4]):
                bn.weight[k] = 1.0
                bn.bias[k] = 40.0
            conv[6].weight[d].mul_(_GATE)
            conv[6].weight[d, k, 0, 0] = 1.0
            conv[7].weight[d] = 1.0
            conv[7].bias[d] = 0.0


def _identity_init(unet: UNet328, rois: np.ndarray) -> None:
    """Start the UNet as a copy machine: output = its reference frame (channels 0-2).

    The full-resolution path ``inc`` → ``up5`` → ``outc`` carries the three colour
    channels straight through (``_pass_through``); the second block of ``up5`` starts
    close to identity and the deep path with a tenth of its usual weight into the output
    (small enough not to spoil the copy, large enough that gradients reach it from the
    first step, as in zero-init residual networks); ``outc`` maps each standardised channel
    back to its colour (a least-squares fit in logit space, since the output is a sigmoid).
    Training then spends its steps on the mouth: learning to copy a face region through a
    randomly initialised UNet takes more steps than the whole CPU budget.
    """
    net: Any = unet  # nn.Module attribute chains are untyped
    skip = net.inc.inconv[0].conv[6].out_channels
    width_in = net.up5.conv.double_conv[0].conv[0].in_channels
    _pass_through(net.inc.inconv[0], [0, 1, 2], [0, 1, 2])
    up = width_in - skip  # up5 sees cat([upsampled deep path, inc output])
    _pass_through(net.up5.conv.double_conv[0], [up, up + 1, up + 2], [0, 1, 2])
    x = torch.from_numpy(rois[::4]).permute(0, 3, 1, 2).double() / 255.0
    with torch.no_grad():
        net.up5.conv.double_conv[1].conv[7].weight.mul_(_GATE)
        net.outc.conv.weight.mul_(_GATE)
        for c in range(3):
            v = x[:, c].flatten()
            n = (v - v.mean()) / v.std()
            t = torch.logit(v.clamp(0.02, 0.98))
            slope = float(((n - n.mean()) * (t - t.mean())).mean() / n.var())
            net.outc.conv.weight[c, :3, 0, 0] = 0.0
            net.outc.conv.weight[c, c, 0, 0] = slope
            net.outc.conv.bias[c] = float(t.mean()) - slope * float(n.mean())


def _change_weight(target: np.ndarray, reference: np.ndarray, extra: float) -> np.ndarray:
    """Loss weight: 1, plus ``extra`` where the target differs from the reference frame
    (the mouth that must be drawn), widened a little so its edges count too."""
    diff = np.abs(target.astype(np.int16) - reference.astype(np.int16)).sum(axis=2) > 24
    grown = cv2.dilate(diff.astype(np.uint8), np.ones((9, 9), np.uint8))
    return (1.0 + extra * grown).astype(np.float32)


class _Stage:
    """One stage's optimiser steps: the update, a smoothed loss, and the progress bar."""

    def __init__(self, opt: torch.optim.Optimizer, prog: Progress, unit: float) -> None:
        self.opt = opt
        self.prog = prog
        self.unit = unit  # progress units per step
        self.steps = 0
        self.loss = float("nan")

    def step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        value = loss.item()
        self.loss = 0.9 * self.loss + 0.1 * value if self.steps else value
        done = round(self.unit * (self.steps + 1)) - round(self.unit * self.steps)
        self.prog.step(done, f"loss {self.loss:.4f}")
        self.steps += 1


def _pick_crop(sampler: _Sampler) -> tuple[int, int, int, int, int]:
    """A stage-2 sample: speech frame ``(c, i)``, pose ``j``, and the top-left corner
    ``(y0, x0)`` of a ``_CROP`` crop on the UNet's 32-pixel bottleneck grid."""
    ch, cw = _CROP
    c, i = sampler.frame()
    j = int(sampler.rng.integers(0, len(sampler.poses)))
    y0 = 32 * int(sampler.rng.integers(0, (320 - ch) // 32 + 1))
    x0 = 32 * int(sampler.rng.integers(0, (320 - cw) // 32 + 1))
    return c, i, j, y0, x0


def _crop_batch(
    sampler: _Sampler, images: np.ndarray, feats: list[np.ndarray], size: int
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """A stage-2-like input batch: ``size`` aligned crops of random poses (their own
    frames as the reference), each with a random speech frame's audio window."""
    ch, cw = _CROP
    inputs, audios, cells = [], [], []
    for _ in range(size):
        c, i, j, y0, x0 = _pick_crop(sampler)
        inputs.append(images[j, y0 : y0 + ch, x0 : x0 + cw])
        audios.append(audio_window(feats[c], i))
        cells.append((y0 // 32, x0 // 32))
    return _to_chw(np.stack(inputs)), torch.from_numpy(np.stack(audios)), cells


def _recalibrate_bn(
    unet: UNet328, batches: list[tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]]
) -> None:
    """Recompute every batch norm's running statistics as the plain average of the
    statistics of ``batches`` (crop batches, as in stage 2); leaves the UNet in eval mode."""
    norms = [m for m in unet.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    unet.train()
    with torch.no_grad():
        for x, a, cells in batches:
            _forward_crops(unet, x, a, cells)
    for bn in norms:
        bn.momentum = 0.1
    unet.eval()


def _encode_all(encoder: AudioEncoder, clips: list[Clip]) -> list[np.ndarray]:
    encoder.eval()
    out = []
    with torch.no_grad():
        for clip in clips:
            windows = torch.from_numpy(clip.windows).unsqueeze(1)
            out.append(np.concatenate([encoder(w).numpy() for w in windows.split(256)]))
    return out


def train(
    rois: np.ndarray,
    masked: np.ndarray,
    poses: list[Pose],
    clips: list[Clip],
    config: TrainConfig | None = None,
    *,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train from scratch. ``rois``/``masked``: the idle loop's decoded ``rois_320`` and
    ``model_inputs`` frames (uint8 ``[N, 320, 320, 3]``), ``poses`` the loop's poses."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return _train(rois, masked, poses, clips, config, progress=progress, log=log)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(
    rois: np.ndarray,
    masked: np.ndarray,
    poses: list[Pose],
    clips: list[Clip],
    config: TrainConfig | None = None,
    *,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    cfg = config or TrainConfig()
    _seed_everything(cfg.seed, cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    prog = progress or Progress(cfg.units(), enabled=False)
    say = log or (lambda _msg: None)
    sampler = _Sampler(clips, poses, rng)
    images = np.concatenate([rois, masked], axis=3)  # [N, 320, 320, 6]
    t0 = time.monotonic()
    history: dict[str, Any] = {"config": asdict(cfg)}

    unet = UNet328(WIDTHS[cfg.width])
    encoder = AudioEncoder()

    # Stage 1: encoder + linear head predict the mouth of the frames the window covers.
    prog.set_stage("1/3 audio encoder")
    head = nn.Linear(512, 2 * _HEAD_FRAMES)
    encoder.train()
    opt = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=cfg.encoder_lr)
    stage = _Stage(opt, prog, cfg.encoder_batch * _SECONDS_PER_SAMPLE["encoder"])
    for step in range(cfg.encoder_steps):
        _set_lr(opt, _cosine(step, cfg.encoder_steps, cfg.encoder_lr))
        picks = [sampler.frame() for _ in range(cfg.encoder_batch)]
        mel = torch.from_numpy(np.stack([clips[c].windows[i] for c, i in picks])).unsqueeze(1)
        want = torch.from_numpy(np.stack([sampler.head_targets(c, i) for c, i in picks]))
        loss = F.mse_loss(head(encoder(mel)), want)
        stage.step(loss)
    history["encoder_loss"] = stage.loss
    say(f"stage 1 (audio encoder): loss {stage.loss:.4f} after {time.monotonic() - t0:.0f}s")

    # Stage 2: UNet on aligned crops, encoder fixed.
    prog.set_stage("2/3 unet")
    feats = _encode_all(encoder, clips)
    _identity_init(unet, rois)
    unet.train()
    # Auxiliary head: the audio branch's pooled map must predict the frame's mouth, so it
    # carries the audio from the first steps instead of after the decoder has settled on
    # an average mouth that ignores it.
    aux = nn.Linear(unet.channels[4], 2)
    opt = torch.optim.Adam([*unet.parameters(), *aux.parameters()], lr=cfg.unet_lr)
    ch, cw = _CROP
    stage = _Stage(opt, prog, cfg.unet_batch * _SECONDS_PER_SAMPLE["unet"])
    for step in range(cfg.unet_steps):
        _set_lr(opt, _cosine(step, cfg.unet_steps, cfg.unet_lr))
        inputs, targets, audios, weights, cells, mouths = [], [], [], [], [], []
        for _ in range(cfg.unet_batch):
            c, i, j, y0, x0 = _pick_crop(sampler)
            window = audio_window(feats[c], i)
            if rng.uniform() < cfg.layout_b_prob:
                window = _layout_b(window, feats[c], i)
            target = sampler.target(c, i, j)
            ref = sampler.reference(j, rois, cfg.random_reference)
            inputs.append(np.concatenate([ref, masked[j]], axis=2)[y0 : y0 + ch, x0 : x0 + cw])
            targets.append(target[y0 : y0 + ch, x0 : x0 + cw])
            wmap = _change_weight(target, ref, cfg.mouth_extra)
            weights.append(torch.from_numpy(wmap[y0 : y0 + ch, x0 : x0 + cw]))
            audios.append(window)
            cells.append((y0 // 32, x0 // 32))
            speech = clips[c].speech
            mouths.append((speech.opening[i], speech.width[i] - 1.0))
        x = _to_chw(np.stack(inputs))
        y = _to_chw(np.stack(targets))
        wgt = torch.stack(weights).unsqueeze(1)
        out, a_map = _forward_crops(unet, x, torch.from_numpy(np.stack(audios)), cells)
        want = torch.tensor(mouths, dtype=torch.float32)
        loss = (wgt * (out - y).abs()).mean() / wgt.mean()
        loss = loss + cfg.aux_weight * F.mse_loss(aux(a_map.mean(dim=(2, 3))), want)
        stage.step(loss)
    history["unet_loss"] = stage.loss
    say(f"stage 2 (unet on crops): loss {stage.loss:.4f} after {time.monotonic() - t0:.0f}s")

    # Stage 3: both, end to end, full resolution.
    prog.set_stage("3/3 joint")
    unet.train()
    encoder.eval()  # its weights learn, its batch-norm statistics stay those of stage 1
    params = [*unet.parameters(), *encoder.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.joint_lr)
    stage = _Stage(opt, prog, cfg.joint_batch * _SECONDS_PER_SAMPLE["joint"])
    for step in range(cfg.joint_steps):
        _set_lr(opt, _cosine(step, cfg.joint_steps, cfg.joint_lr, warmup=3))
        samples: list[tuple[int, int, int]] = []
        for _ in range(cfg.joint_batch):
            c, i = sampler.frame()
            samples.append((c, i, int(rng.integers(0, len(poses)))))
        # The 16 rows of each sample: clip windows i-8..i+7, zero rows outside the clip.
        mel_rows, present = [], []
        for c, i, _j in samples:
            n = clips[c].n_frames
            for r in range(i - 8, i + 8):
                ok = 0 <= r < n
                present.append(ok)
                mel_rows.append(clips[c].windows[min(max(r, 0), n - 1)])
        mel = torch.from_numpy(np.stack(mel_rows)).unsqueeze(1)
        rows = encoder(mel) * torch.tensor(present, dtype=torch.float32).unsqueeze(1)
        audio = rows.reshape(cfg.joint_batch, 32, 16, 16)
        refs = [sampler.reference(j, rois, cfg.random_reference) for _c, _i, j in samples]
        x = _to_chw(
            np.stack(
                [
                    np.concatenate([r, masked[j]], 2)
                    for r, (_c, _i, j) in zip(refs, samples, strict=True)
                ]
            )
        )
        targets = [sampler.target(c, i, j) for c, i, j in samples]
        y = _to_chw(np.stack(targets))
        wgt = torch.from_numpy(
            np.stack(
                [_change_weight(t, r, cfg.mouth_extra) for t, r in zip(targets, refs, strict=True)]
            )
        ).unsqueeze(1)
        out = unet(x, audio)
        loss = (wgt * (out - y).abs()).mean() / wgt.mean()
        stage.step(loss)
    history["joint_loss"] = stage.loss
    feats = _encode_all(encoder, clips)
    _recalibrate_bn(
        unet,
        [
            _crop_batch(sampler, images, feats, cfg.unet_batch)
            for _ in range(cfg.calibration_batches)
        ],
    )
    history["seconds"] = round(time.monotonic() - t0, 1)
    say(f"stage 3 (joint, full size): loss {stage.loss:.4f} after {time.monotonic() - t0:.0f}s")
    return TrainResult(unet.eval(), encoder.eval(), history)
