"""A package loaded for the torch engine: its weights on the device, views of its shared
frames, what of them is resident on the device, and the graphs its decode replays.

``ModelLoader`` turns a package on disk into a ``LoadedModel`` (and releases one); the
engine (``workers.engine``) decides when. A broken package is refused with a message that
names the file, and nothing half-loaded is kept.
"""

from __future__ import annotations

import functools
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from shared.errors import ErrorCode, ServiceError
from workers.audio import AudioFeaturizer
from workers.backend import VIDEO_TYPES, InferItem, ModelInfo
from workers.batch_audio import feature_table
from workers.checkpoint import load_audio_encoder, load_unet
from workers.framecache import CachedFrames, open_frames
from workers.graphs import StaticRunner, buckets_up_to
from workers.package import ROI_SIZE, Package, PackageError, load_package
from workers.paste import feather_alpha
from workers.resident import DeviceFrames
from workers.skipcache import SkipCache
from workers.unet import UNet328, prepare_module, width_name


__all__ = [
    "AUDIO_SHAPE",
    "MODES",
    "LoadedModel",
    "ModelLoader",
    "check_frame",
    "check_item",
    "pixels",
]

log = logging.getLogger("workers.engine")

AUDIO_SHAPE = (32, 16, 16)
MODES = ("crop", "composite")


@dataclass(eq=False)
class LoadedModel:
    """One loaded package: its weights on the device and views of its shared frames."""

    package: Package
    net: nn.Module
    featurizer: AudioFeaturizer | None
    caches: dict[str, CachedFrames]
    info: ModelInfo
    skips: SkipCache
    features: torch.Tensor  # the package's audio features on the device (workers.batch_audio)
    resident: DeviceFrames
    runner: StaticRunner | None = None  # decode at bucket sizes (CUDA graphs); None: eager
    paste_alpha: Callable[[int], torch.Tensor] | None = None
    """Feathered paste-back on the device: the alpha ``[side, side]`` (on the device) for
    a face rectangle of ``side`` pixels; None pastes hard. Set from the package's paste
    options; the device paste-back needs the full frames resident to blend over."""

    def frames(self, kind: str) -> np.ndarray:
        return self.caches[kind].frames


class ModelLoader:
    """Loads packages onto one device with the engine's choices (half precision, frames
    resident within a budget, decode graphs or padded buckets)."""

    def __init__(
        self,
        device: torch.device,
        *,
        fp16: bool,
        max_batch: int,
        skip_cache_bytes: int,
        resident: bool,
        gpu_frames_bytes: int,
        graphs: bool,
        pad: bool | None,
    ) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.fp16 = fp16
        self.max_batch = max_batch
        self.skip_cache_bytes = skip_cache_bytes
        self.resident = resident
        self.gpu_frames_bytes = gpu_frames_bytes
        self.graphs = graphs
        self.pad = pad
        self._graph_pool: Any = None

    def load(self, models_dir: Path, name: str) -> LoadedModel:
        """Raises PackageError, FrameCacheError or CheckpointError naming what is wrong."""
        package = load_package(models_dir, name)
        caches: dict[str, CachedFrames] = {}
        dev = self.device
        try:
            for kind in VIDEO_TYPES:
                spec = package.videos[kind]
                cache = open_frames(spec.path, package.cache_dir)
                caches[kind] = cache
                if cache.count != package.frame_count:
                    raise PackageError(
                        name,
                        f"{spec.file} has {cache.count} frames, expected {package.frame_count}",
                    )
                if cache.frame_size != (spec.width, spec.height):
                    w, h = cache.frame_size
                    raise PackageError(
                        name,
                        f"{spec.file}: decoded frames are {w}x{h}, header says "
                        f"{spec.width}x{spec.height}",
                    )
            net = prepare_module(
                load_unet(package.checkpoint, list(package.channels)), dev, half=self.fp16
            )
            featurizer = None
            if package.encoder_checkpoint is not None:
                encoder = load_audio_encoder(package.encoder_checkpoint)
                featurizer = AudioFeaturizer(encoder, dev, half=self.fp16)
            resident = DeviceFrames(dev)
            if self.resident:
                videos = {kind: caches[kind].frames for kind in VIDEO_TYPES}
                resident = DeviceFrames.upload(videos, dev, self.gpu_frames_bytes)
            features = feature_table(package.audio_features, dev)
            runner = self._runner(cast(UNet328, net))
        except BaseException:
            for cache in caches.values():
                cache.close()
            raise
        rect0 = package.rects[0]
        info = ModelInfo(
            name=name,
            frame_count=package.frame_count,
            fps=package.fps,
            size=package.frame_size,
            bounds=(float(rect0[0]), float(rect0[1]), float(rect0[2]), float(rect0[3])),
            width=width_name(package.channels) or "custom",
            audio=featurizer is not None,
        )
        skips = SkipCache(self.skip_cache_bytes)
        model = LoadedModel(
            package, net, featurizer, caches, info, skips, features, resident, runner=runner
        )
        if package.feather_px:  # the device paste blends with the same weights as the host's
            model.paste_alpha = _feather_weights(package.feather_px, dev)
        return model

    def log_loaded(self, m: LoadedModel, seconds: float) -> None:
        """The operator's account of a load: what the model is, where its frames came
        from, what stayed on the host, how its decode runs, the package's warnings."""
        info, name = m.info, m.info.name
        decoded = sum(c.decoded for c in m.caches.values())
        log.info(
            "loaded %s on %s in %.1f s: %d frames %dx%d at %g fps, %s width, audio encoder %s, "
            "videos %s, image-half cache %s",
            name,
            self.device,
            seconds,
            info.frame_count,
            *info.size,
            info.fps,
            info.width,
            "yes" if info.audio else "no",
            f"decoded {decoded}/4" if decoded else "mapped from cache",
            f"up to {self.skip_cache_bytes / 2**20:g} MiB" if self.skip_cache_bytes else "off",
        )
        if self.resident:
            videos = {kind: m.frames(kind) for kind in VIDEO_TYPES}
            log.info("%s: %s", name, m.resident.describe(videos, self.gpu_frames_bytes))
        runner = m.runner
        if runner is not None or self.graphs:
            how = "CUDA graphs" if runner is not None and runner.graphed else "eager"
            sizes = ",".join(map(str, runner.buckets)) if runner is not None else "as they come"
            log.info("%s: decode %s, batch sizes %s", name, how, sizes)
        for warning in m.package.warnings:
            log.warning("%s: %s", name, warning)

    def release(self, m: LoadedModel) -> None:
        """Give back what ``m`` holds (frames unmapped, device memory returned)."""
        for cache in m.caches.values():
            cache.close()
        m.caches = {}
        m.skips.clear()
        if m.runner is not None:
            m.runner.release()
            m.runner = None
        m.resident.release()
        m.features = torch.zeros((0,))
        m.net = nn.Identity()
        m.featurizer = None
        m.paste_alpha = None
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def _runner(self, net: UNet328) -> StaticRunner | None:
        """``decode`` (and the conversion to pixels) at bucket sizes, from CUDA graphs
        where they can be captured; None when batches run eagerly at their own size."""
        if not self.graphs and not self.pad:
            return None
        buckets = buckets_up_to(self.max_batch)
        dev = self.device
        with torch.inference_mode():
            probe = net.encode_image(torch.zeros((1, 6, ROI_SIZE, ROI_SIZE), device=dev))
            examples = [
                torch.zeros((buckets[-1], *t.shape[1:]), dtype=t.dtype, device=dev).contiguous(
                    memory_format=_layout(t)
                )
                for t in probe
            ]
            examples.append(torch.zeros((buckets[-1], *AUDIO_SHAPE), device=dev))

            def decode_pixels(*inputs: torch.Tensor) -> torch.Tensor:
                return pixels(net.decode(inputs[:-1], inputs[-1]))

            if self.graphs and self.cuda and self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            runner = StaticRunner(
                decode_pixels, examples, buckets, graphs=self.graphs, pool=self._graph_pool
            )
        if not runner.graphed and not self.pad:
            runner.release()
            return None  # capture failed (logged): eager at the batch's own size
        return runner


def check_item(
    m: LoadedModel, item: InferItem, quality: Callable[[Any], int]
) -> ServiceError | None:
    """What is wrong with ``item`` for model ``m`` (``quality`` raises ValueError for a
    bad JPEG quality), or None."""
    try:
        check_frame(m, item.frame_id)
    except ServiceError as exc:
        return exc
    if item.mode not in MODES:
        return ServiceError(ErrorCode.BAD_REQUEST, f"unknown mode {item.mode!r}")
    try:
        quality(item.quality)
    except ValueError as exc:
        return ServiceError(ErrorCode.BAD_REQUEST, str(exc))
    if item.audio is not None and m.featurizer is None:
        return ServiceError(
            ErrorCode.AUDIO_UNSUPPORTED,
            f"model {m.info.name!r} has no audio encoder: it serves only its own audio",
        )
    return None


def check_frame(m: LoadedModel, frame_id: Any) -> None:
    n = m.info.frame_count
    integer = isinstance(frame_id, int | np.integer) and not isinstance(frame_id, bool)
    if not integer or not 0 <= frame_id < n:
        raise ServiceError(
            ErrorCode.FRAME_OUT_OF_RANGE,
            f"frame {frame_id!r} out of range for {m.info.name!r} (0..{n - 1})",
        )


def pixels(out: torch.Tensor) -> torch.Tensor:
    """The network's output ``[B, 3, 320, 320]`` in [0, 1] → uint8 ``[B, 320, 320, 3]``
    (``round(clip(out, 0, 1) * 255)``, section 5 step 3)."""
    return (out.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def _layout(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _feather_weights(feather_px: int, device: torch.device) -> Callable[[int], torch.Tensor]:
    """``feather_alpha`` for each face size, on the device, made once per size."""

    @functools.lru_cache(maxsize=256)
    def weights(side: int) -> torch.Tensor:
        return torch.from_numpy(feather_alpha(side, feather_px)).to(device)

    return weights
