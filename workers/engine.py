"""The UNet-328 engine: the torch ``Backend`` a worker serves frames with.

For frame i of a package (DESIGN.md section 5): input = concat(rois_320[i],
model_inputs[i]) on channels, /255, BGR; audio = rows i-8..i+7 of ``aud_ave.npy`` folded to
``[32,16,16]`` (or the window computed from the request's own PCM); one forward pass per
batch; ``round(clip(out, 0, 1) * 255)``; paste into a copy of crops_328[i] at
``[4:324, 4:324]``; resize (cubic) to the face rect; then either the whole frame with the
face written in (``composite``) or only the rect's pixels (``crop``) as JPEG.

The work is split the way the runtime runs it: ``forward`` (compute thread) does the tensor
work and hands uint8 predictions to ``encode`` (helper thread), which pastes and encodes,
so the JPEG work of batch k overlaps the forward pass of batch k+1. ``render`` is
``encode`` without the JPEG, for tests and tools that need the exact pixels.

Frames come from ``workers.framecache`` (decoded once per host, memory-mapped, shared by
all workers); the audio table is a read-only ``np.load(mmap_mode="r")``. A model holds
only its weights privately. A broken package is refused with a message that names the
file; the others still load.

The network runs in two halves: ``encode_image`` (the image half, which never sees the
audio) once per avatar frame, kept in the model's ``SkipCache``; ``decode`` (audio branch,
fusion, decoder) for every request. Avatars are short loops that streams walk again and
again, so in steady state only ``decode`` runs (``workers.skipcache`` says what it costs).

Devices: ``auto`` picks CUDA when present. On CUDA, ``fp16=True`` runs the model in half
precision, the model is channels_last, and the input batch is staged in pinned host memory
so the upload is a plain DMA. On CPU everything is fp32.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import cv2
import numpy as np
import torch
from torch import nn

from shared.config import WorkerConfig
from shared.errors import ErrorCode, ServiceError
from workers.audio import AudioFeaturizer, audio_window
from workers.backend import VIDEO_TYPES, ForwardBatch, InferItem, InferResult, ModelInfo
from workers.checkpoint import CheckpointError, load_audio_encoder, load_unet
from workers.framecache import CachedFrames, FrameCacheError, open_frames
from workers.package import (
    ROI_SIZE,
    Package,
    PackageError,
    check_model_name,
    list_packages,
    load_package,
)
from workers.paste import paste_face
from workers.skipcache import SkipCache
from workers.stream_audio import stream_windows
from workers.unet import UNet328, prepare_module, resolve_device, width_name


__all__ = ["TorchBackend"]

log = logging.getLogger(__name__)

_AUDIO_SHAPE = (32, 16, 16)
DEFAULT_SKIP_CACHE_MB = WorkerConfig.skip_cache_mb
"""Per model: every frame of a 100-frame quarter-width avatar in float32 (4.9 MB each), or
about 50 frames of a full-width one in fp16. See ``workers.skipcache``."""
_MODES = ("crop", "composite")


@dataclass(eq=False)
class _Model:
    """One loaded package: its weights on the device and views of its shared frames."""

    package: Package
    net: nn.Module
    featurizer: AudioFeaturizer | None
    caches: dict[str, CachedFrames]
    info: ModelInfo
    skips: SkipCache

    def frames(self, kind: str) -> np.ndarray:
        return self.caches[kind].frames


@dataclass(eq=False)
class _State:
    """What ``forward`` leaves for ``encode``: predictions and the arrays to paste them into.

    It holds the arrays themselves, not the model, so an ``unload`` between the two threads
    cannot pull the frames from under a batch in flight.
    """

    full_body: np.ndarray
    crops: np.ndarray
    rects: np.ndarray
    rows: list[int]  # item k's row in ``pred``, or -1 when it failed
    pred: np.ndarray  # uint8 [B, 320, 320, 3] BGR
    item_timings: list[dict[str, float]] = field(default_factory=list)
    feather_px: int = 0  # the package's paste option (workers.paste)


class TorchBackend:
    """UNet-328 on CPU or CUDA for every package it loads from ``models_dir``.

    The constructor loads nothing: call ``load(name)`` / ``load_all()`` or use
    ``from_config``. ``forward`` must be called from one thread; ``encode`` and ``render``
    may run concurrently with it; ``load`` and ``unload`` run between batches on the
    forward thread (the runtime's rule).
    """

    name = "torch"

    def __init__(
        self,
        models_dir: str | Path,
        *,
        device: str = "auto",
        device_index: int = 0,
        fp16: bool = False,
        max_batch: int = 4,
        jpeg_quality: int = 85,
        threads: int = 0,
        skip_cache_mb: float = DEFAULT_SKIP_CACHE_MB,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.models_dir = Path(models_dir)
        self.torch_device = resolve_device(device, device_index)
        self.device = str(self.torch_device)
        self.cuda = self.torch_device.type == "cuda"
        if fp16 and not self.cuda:
            log.info("fp16 asked for on %s: ignored, running fp32", self.device)
        self.fp16 = fp16 and self.cuda
        self.max_batch = max_batch
        self.jpeg_quality = _check_quality(jpeg_quality)
        if not skip_cache_mb >= 0:
            raise ValueError(f"skip_cache_mb must be >= 0, not {skip_cache_mb}")
        self.skip_cache_bytes = int(skip_cache_mb * 2**20)
        if threads > 0:
            torch.set_num_threads(threads)
        if self.cuda:
            torch.backends.cudnn.benchmark = True
        self._models: dict[str, _Model] = {}
        # Staging buffers for one batch, reused: pinned on CUDA so uploads are async DMA.
        self._images = torch.empty(
            (max_batch, ROI_SIZE, ROI_SIZE, 6), dtype=torch.uint8, pin_memory=self.cuda
        )
        self._audio = torch.empty((max_batch, *_AUDIO_SHAPE), pin_memory=self.cuda)

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: WorkerConfig) -> TorchBackend:
        """A backend with every package of ``config.models_dir`` (or ``config.models``)
        loaded; a broken package is logged with its reason and skipped."""
        backend = cls(
            config.models_dir,
            device=config.device,
            device_index=config.worker_index,
            fp16=config.fp16,
            max_batch=config.max_batch,
            jpeg_quality=config.jpeg_quality,
            threads=config.threads,
            skip_cache_mb=config.skip_cache_mb,
        )
        names = [n.strip() for n in config.models.split(",") if n.strip()] or None
        backend.load_all(names)
        return backend

    def load_all(self, names: Iterable[str] | None = None) -> dict[str, str]:
        """Load ``names`` (default: every package in the models dir). Returns the failures
        as ``{name: reason}``; each is also logged. Never raises for a bad package."""
        wanted = list(names) if names is not None else list_packages(self.models_dir)
        if not wanted:
            log.warning("no model package in %s", self.models_dir.resolve())
        failed: dict[str, str] = {}
        for name in wanted:
            try:
                self.load(name)
            except ServiceError as exc:
                failed[name] = exc.message
                log.error("package %s skipped: %s", name, exc.message)
            except Exception as exc:  # a bug, or the device: still keep the others
                failed[name] = f"{type(exc).__name__}: {exc}"
                log.exception("package %s skipped: unexpected error", name)
        return failed

    # -- Backend protocol ---------------------------------------------------------------

    def models(self) -> dict[str, ModelInfo]:
        return {name: m.info for name, m in self._models.items()}

    def load(self, model: str) -> ModelInfo:
        """Load (or reload) package ``model``. A reload replaces the old one only once the
        new one has loaded, so a failed reload leaves the old model serving."""
        start = time.monotonic()
        try:
            check_model_name(model)
        except ValueError as exc:
            raise ServiceError(ErrorCode.BAD_REQUEST, str(exc)) from None
        try:
            loaded = self._load(model)
        except (PackageError, FrameCacheError, CheckpointError) as exc:
            code = ErrorCode.BAD_REQUEST
            if not (self.models_dir / model).is_dir():
                code = ErrorCode.UNKNOWN_MODEL
            message = str(exc)
            if not isinstance(exc, PackageError):
                message = f"{model}: {message}".replace(f"{self.models_dir / model}/", "")
            raise ServiceError(code, message) from exc
        old = self._models.get(model)
        self._models[model] = loaded
        if old is not None:
            self._release(old)
        info = loaded.info
        decoded = sum(c.decoded for c in loaded.caches.values())
        log.info(
            "loaded %s on %s in %.1f s: %d frames %dx%d at %g fps, %s width, audio encoder %s, "
            "videos %s, image-half cache %s",
            model,
            self.device,
            time.monotonic() - start,
            info.frame_count,
            *info.size,
            info.fps,
            info.width,
            "yes" if info.audio else "no",
            f"decoded {decoded}/4" if decoded else "mapped from cache",
            f"up to {self.skip_cache_bytes / 2**20:g} MiB" if self.skip_cache_bytes else "off",
        )
        for warning in loaded.package.warnings:
            log.warning("%s: %s", model, warning)
        return info

    def unload(self, model: str) -> None:
        loaded = self._models.pop(model, None)
        if loaded is None:
            raise ServiceError(ErrorCode.UNKNOWN_MODEL, f"model {model!r} is not loaded")
        stats = loaded.skips.stats()
        self._release(loaded)
        log.info(
            "unloaded %s (image-half cache: %d frames, %.0f MiB, %d hits, %d misses)",
            model,
            stats["entries"],
            stats["bytes"] / 2**20,
            stats["hits"],
            stats["misses"],
        )

    def forward(self, model: str, items: Sequence[InferItem]) -> ForwardBatch:
        """Check each item, build the batch, run the model. Bad items get an error in
        their slot and take no part in the forward pass."""
        batch = ForwardBatch(model=model, items=items, errors=[None] * len(items))
        m = self._models.get(model)
        if m is None:
            err = ServiceError(ErrorCode.UNKNOWN_MODEL, f"model {model!r} is not loaded")
            batch.errors = [err] * len(items)
            return batch
        t0 = time.perf_counter()
        for k, item in enumerate(items):
            batch.errors[k] = self._check_item(m, item)
        good = [k for k in range(len(items)) if batch.errors[k] is None]
        windows = self._audio_windows(m, items, good, batch.errors)
        good = [k for k in good if batch.errors[k] is None]
        rows = [-1] * len(items)
        preds: list[np.ndarray] = []
        inference = 0.0
        for start in range(0, len(good), self.max_batch):
            chunk = good[start : start + self.max_batch]
            pred, seconds = self._run(m, [items[k].frame_id for k in chunk], windows, chunk)
            inference += seconds
            for j, k in enumerate(chunk):
                rows[k] = start + j
            preds.append(pred)
        prepare = time.perf_counter() - t0 - inference  # checks, audio, staging
        pred_all = (
            np.concatenate(preds) if preds else np.zeros((0, ROI_SIZE, ROI_SIZE, 3), np.uint8)
        )
        timing = {"prepare": _ms(prepare), "inference": _ms(inference)}
        batch.timings = dict(timing)
        batch.state = _State(
            full_body=m.frames("full_body"),
            crops=m.frames("crops_328"),
            rects=m.package.rects,
            rows=rows,
            pred=pred_all,
            item_timings=[dict(timing) for _ in items],
            feather_px=m.package.feather_px,
        )
        return batch

    def render(self, batch: ForwardBatch) -> list[np.ndarray | BaseException]:
        """The uint8 BGR image ``encode`` would JPEG, per item: the whole frame
        (``composite``) or the rect's pixels (``crop``). Errors are passed through."""
        return [out for out, _ in self._render(batch)]

    def encode(self, batch: ForwardBatch) -> list[InferResult | BaseException]:
        results: list[InferResult | BaseException] = []
        state: _State | None = batch.state
        for k, (image, bounds) in enumerate(self._render(batch)):
            if isinstance(image, BaseException):
                results.append(image)
                continue
            assert state is not None and bounds is not None
            t0 = time.perf_counter()
            try:
                jpeg = _jpeg(image, self._quality(batch.items[k].quality))
            except Exception as exc:
                results.append(ServiceError(ErrorCode.INTERNAL, f"jpeg encoding failed: {exc}"))
                continue
            timings = state.item_timings[k]
            timings["encode"] = _ms(time.perf_counter() - t0)
            results.append(InferResult(jpeg=jpeg, bounds=bounds, timings=timings))
        return results

    def video_frame(self, model: str, frame_id: int, video_type: str, quality: int) -> bytes:
        m = self._get(model)
        if video_type not in VIDEO_TYPES:
            raise ServiceError(
                ErrorCode.UNKNOWN_VIDEO,
                f"unknown video type {video_type!r} (one of {', '.join(VIDEO_TYPES)})",
            )
        _check_frame(m, frame_id)
        try:
            q = self._quality(quality)
        except ValueError as exc:
            raise ServiceError(ErrorCode.BAD_REQUEST, str(exc)) from None
        return _jpeg(m.frames(video_type)[frame_id], q)

    # -- extras --------------------------------------------------------------------------

    def warmup(self) -> None:
        """One full batch per model (and one live-audio item where there is an encoder),
        so that kernels are chosen and memory is allocated before the worker says READY.
        A model whose warm-up fails is unloaded and logged; the others stay."""
        for name, m in list(self._models.items()):
            n = m.info.frame_count
            items = [InferItem(frame_id=i % n) for i in range(self.max_batch)]
            if m.featurizer is not None:
                items[-1].audio = bytes(2 * 16000 * 640 // 1000)  # 640 ms of silence
                items[-1].audio_sr = 16000
            start = time.monotonic()
            try:
                results = self.encode(self.forward(name, items))
                errors = [r for r in results if isinstance(r, BaseException)]
                if errors:
                    raise errors[0]
            except Exception as exc:
                log.error("warm-up of %s failed, unloading it: %s", name, exc)
                self.unload(name)
                continue
            log.info(
                "warmed up %s: batch of %d in %.2f s", name, len(items), time.monotonic() - start
            )

    def decoded_videos(self, model: str) -> dict[str, bool]:
        """Per video of a loaded model: whether its load decoded it (True) or mapped a
        cache another process (or an earlier load) had built (False)."""
        return {kind: c.decoded for kind, c in self._get(model).caches.items()}

    def skip_cache_stats(self, model: str) -> dict[str, int]:
        """Entries, bytes, budget, hits and misses of a loaded model's image-half cache."""
        return self._get(model).skips.stats()

    def close(self) -> None:
        for name in list(self._models):
            self.unload(name)

    # -- internals -------------------------------------------------------------------------

    def _get(self, model: str) -> _Model:
        m = self._models.get(model)
        if m is None:
            raise ServiceError(ErrorCode.UNKNOWN_MODEL, f"model {model!r} is not loaded")
        return m

    def _quality(self, quality: int | None) -> int:
        if quality is None or quality == 0:
            return self.jpeg_quality
        return _check_quality(quality)

    def _load(self, name: str) -> _Model:
        package = load_package(self.models_dir, name)
        caches: dict[str, CachedFrames] = {}
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
                load_unet(package.checkpoint, list(package.channels)),
                self.torch_device,
                half=self.fp16,
            )
            featurizer = None
            if package.encoder_checkpoint is not None:
                encoder = load_audio_encoder(package.encoder_checkpoint)
                featurizer = AudioFeaturizer(encoder, self.torch_device, half=self.fp16)
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
        return _Model(package, net, featurizer, caches, info, SkipCache(self.skip_cache_bytes))

    def _release(self, m: _Model) -> None:
        for cache in m.caches.values():
            cache.close()
        m.caches = {}
        m.skips.clear()
        m.net = nn.Identity()
        m.featurizer = None
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def _check_item(self, m: _Model, item: InferItem) -> ServiceError | None:
        try:
            _check_frame(m, item.frame_id)
        except ServiceError as exc:
            return exc
        if item.mode not in _MODES:
            return ServiceError(ErrorCode.BAD_REQUEST, f"unknown mode {item.mode!r}")
        try:
            self._quality(item.quality)
        except ValueError as exc:
            return ServiceError(ErrorCode.BAD_REQUEST, str(exc))
        if item.audio is not None and m.featurizer is None:
            return ServiceError(
                ErrorCode.AUDIO_UNSUPPORTED,
                f"model {m.info.name!r} has no audio encoder: it serves only its own audio",
            )
        return None

    def _audio_windows(
        self,
        m: _Model,
        items: Sequence[InferItem],
        good: list[int],
        errors: list[BaseException | None],
    ) -> dict[int, np.ndarray]:
        """Audio input per good item: from the request's PCM (one encoder batch for all
        such items) or from the package's feature table."""
        windows: dict[int, np.ndarray] = {}
        streamed = [k for k in good if items[k].audio_t0_ms is not None]  # docs/streams.md
        if streamed and m.featurizer is not None:
            out = stream_windows(m.featurizer, m.info.fps, [items[k] for k in streamed])
            for k, window in zip(streamed, out, strict=True):
                if isinstance(window, BaseException):
                    errors[k] = window
                else:
                    windows[k] = window
        live = [k for k in good if items[k].audio is not None and k not in streamed]
        if live and m.featurizer is not None:
            featurizer = m.featurizer
            try:
                out = featurizer.windows_from_pcm(
                    [items[k].audio for k in live],  # type: ignore[misc]
                    [items[k].audio_sr for k in live],
                    fps=m.info.fps,
                )
                windows.update(zip(live, out, strict=True))
            except Exception:
                # One bad clip must not fail the others: redo them one by one.
                for k in live:
                    try:
                        windows[k] = featurizer.window_from_pcm(
                            items[k].audio,  # type: ignore[arg-type]
                            items[k].audio_sr,
                            fps=m.info.fps,
                        )
                    except Exception as exc:
                        errors[k] = ServiceError(ErrorCode.BAD_REQUEST, f"bad audio: {exc}")
        for k in good:
            if items[k].audio is None:
                windows[k] = audio_window(m.package.audio_features, items[k].frame_id)
        return windows

    def _run(
        self, m: _Model, frame_ids: list[int], windows: dict[int, np.ndarray], keys: list[int]
    ) -> tuple[np.ndarray, float]:
        """One forward pass. Returns uint8 predictions [B,320,320,3] and the seconds of
        inference (upload, model, download; staging the inputs is not counted)."""
        b = len(frame_ids)
        images = self._images[:b].numpy()
        audio = self._audio[:b].numpy()
        rois, masked = m.frames("rois_320"), m.frames("model_inputs")
        for j, (i, k) in enumerate(zip(frame_ids, keys, strict=True)):
            images[j, :, :, :3] = rois[i]
            images[j, :, :, 3:] = masked[i]
            audio[j] = windows[k]
        t1 = time.perf_counter()
        dev = self.torch_device
        try:
            with torch.inference_mode():
                # NHWC staging permuted to NCHW is channels_last-strided: the model's layout.
                x = self._images[:b].to(dev, non_blocking=True).permute(0, 3, 1, 2)
                a = self._audio[:b].to(dev, non_blocking=True)
                net = cast(UNet328, m.net)
                skips = m.skips.skips(
                    net.encode_image, frame_ids, lambda rows: _rows(x, rows).float() / 255
                )
                out = net.decode(skips, a).float()
                pred = (out.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
                result = pred.contiguous().cpu().numpy()  # waits for the device
        except BaseException:
            if self.cuda:  # the next batch must not refill buffers a copy still reads
                torch.cuda.synchronize(dev)
            raise
        return result, time.perf_counter() - t1

    def _render(
        self, batch: ForwardBatch
    ) -> list[tuple[np.ndarray | BaseException, tuple[float, float, float, float] | None]]:
        state: _State | None = batch.state
        out: list[tuple[np.ndarray | BaseException, tuple[float, float, float, float] | None]]
        out = []
        for k, item in enumerate(batch.items):
            err = batch.errors[k] if k < len(batch.errors) else None
            if err is not None or state is None or state.rows[k] < 0:
                out.append((err or ServiceError(ErrorCode.INTERNAL, "item was not computed"), None))
                continue
            t0 = time.perf_counter()
            try:
                image, bounds = _paste(state, item, state.rows[k])
            except Exception as exc:
                out.append((ServiceError(ErrorCode.INTERNAL, f"compositing failed: {exc}"), None))
                continue
            state.item_timings[k]["composite"] = _ms(time.perf_counter() - t0)
            out.append((image, bounds))
        return out


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``x[rows]``, as a view when the rows are the whole batch (the usual miss)."""
    if rows == list(range(x.shape[0])):
        return x
    return x[rows]


def _paste(
    state: _State, item: InferItem, row: int
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    i = item.frame_id
    x1, y1, x2, y2 = (int(v) for v in state.rects[i])
    region = state.full_body[i][y1:y2, x1:x2]
    face = paste_face(state.crops[i], state.pred[row], region, state.feather_px)
    bounds = (float(x1), float(y1), float(x2), float(y2))
    if item.mode == "crop":
        return face, bounds
    frame = state.full_body[i].copy()
    frame[y1:y2, x1:x2] = face
    return frame, bounds


def _check_frame(m: _Model, frame_id: Any) -> None:
    n = m.info.frame_count
    integer = isinstance(frame_id, int | np.integer) and not isinstance(frame_id, bool)
    if not integer or not 0 <= frame_id < n:
        raise ServiceError(
            ErrorCode.FRAME_OUT_OF_RANGE,
            f"frame {frame_id!r} out of range for {m.info.name!r} (0..{n - 1})",
        )


def _check_quality(quality: Any) -> int:
    if type(quality) is not int or not 1 <= quality <= 100:
        raise ValueError(f"jpeg quality must be 1..100, not {quality!r}")
    return quality


def _jpeg(image: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("cv2.imencode failed")
    return buf.tobytes()


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
