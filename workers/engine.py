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

Devices: ``auto`` picks CUDA when present. On CPU everything is fp32 and runs as described
above, on the host. On CUDA (DESIGN.md section 5, "On a GPU, steps 1-5 stay on the device"):

- the avatar's frames are uploaded once at load, within ``--gpu-frames-mb`` per model
  (``workers.resident``); a batch is an index-select on the device, and what does not fit
  is staged from the host through pinned memory;
- the audio windows are put together on the device (``workers.batch_audio``): one AVE
  encoder call for every live window of the batch;
- ``fp16=True`` runs the model in half precision, channels_last; ``decode`` is replayed
  from a CUDA graph per batch-size bucket (``workers.graphs``), eager where capture fails;
- paste-back is tensor ops (``workers.devicepaste``), and the JPEG is nvJPEG where the
  ``gpu`` extra is installed (``workers.jpeg``), else OpenCV on a host copy;
- ``forward`` never waits for the device: it enqueues the batch on the worker's own CUDA
  stream and records an event (``workers.transfer``); ``encode``, on the runtime's encode
  thread, waits for that event only, so batch k+1 is staged and computed while batch k is
  encoded.

The CUDA choices can be forced on CPU too (``resident``, ``paste``, ``graphs``/``pad``),
where the same tensor code runs: that is how the tests check them against the host path.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from shared.config import WorkerConfig
from shared.errors import ErrorCode, ServiceError
from workers import devicepaste
from workers.audio import AudioFeaturizer
from workers.backend import VIDEO_TYPES, ForwardBatch, InferItem, InferResult, ModelInfo
from workers.batch_audio import batch_windows, feature_table
from workers.checkpoint import CheckpointError, load_audio_encoder, load_unet
from workers.framecache import CachedFrames, FrameCacheError, open_frames
from workers.graphs import StaticRunner, buckets_up_to
from workers.jpeg import DeviceJpeg, choose_device_jpeg, encode_host
from workers.package import (
    ROI_SIZE,
    Package,
    PackageError,
    check_model_name,
    list_packages,
    load_package,
)
from workers.paste import feather_alpha, paste_face
from workers.resident import DeviceFrames
from workers.skipcache import SkipCache
from workers.transfer import Ready, StageClock, download, to_device
from workers.unet import UNet328, prepare_module, resolve_device, width_name


__all__ = ["TorchBackend"]

log = logging.getLogger(__name__)

_AUDIO_SHAPE = (32, 16, 16)
DEFAULT_SKIP_CACHE_MB = WorkerConfig.skip_cache_mb
"""Per model: every frame of a 100-frame quarter-width avatar in float32 (4.9 MB each), or
about 50 frames of a full-width one in fp16. See ``workers.skipcache``."""
DEFAULT_GPU_FRAMES_MB = WorkerConfig.gpu_frames_mb
"""Per model: all four videos of an avatar of up to about 580 frames at 1280x720 (3.7 MB a
frame). See ``workers.resident``."""
_MODES = ("crop", "composite")
_PASTES = ("auto", "host", "device")


@dataclass(eq=False)
class _Model:
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


@dataclass(eq=False, slots=True)
class _Slot:
    """Where an item's picture is once its batch is ready: row ``row`` of
    ``_State.tensors[tensor]``; a crop-mode face is its top-left ``side`` square; with
    ``host_paste`` the row is the prediction, which ``encode`` pastes with OpenCV."""

    tensor: int
    row: int
    side: int = 0
    host_paste: bool = False


@dataclass(eq=False)
class _State:
    """What ``forward`` leaves for ``encode``: where each item's picture will be, and the
    host arrays that OpenCV paste-back reads.

    It holds the arrays and tensors themselves, not the model, so an ``unload`` between
    the two threads cannot pull the frames from under a batch in flight.
    """

    full_body: np.ndarray
    crops: np.ndarray
    rects: np.ndarray
    ready: Ready
    clock: StageClock
    slots: list[_Slot | None]
    tensors: list[torch.Tensor] = field(default_factory=list)
    host: list[torch.Tensor | None] = field(default_factory=list)  # host copies in flight
    item_timings: list[dict[str, float]] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)  # the batch's ms per stage
    feather_px: int = 0  # the package's paste option (workers.paste)

    def add(self, t: torch.Tensor, host: torch.Tensor | None = None) -> int:
        self.tensors.append(t)
        self.host.append(host)
        return len(self.tensors) - 1


class TorchBackend:
    """UNet-328 on CPU or CUDA for every package it loads from ``models_dir``.

    The constructor loads nothing: call ``load(name)`` / ``load_all()`` or use
    ``from_config``. ``forward`` must be called from one thread; ``encode`` and ``render``
    may run concurrently with it; ``load`` and ``unload`` run between batches on the
    forward thread (the runtime's rule).

    Device choices (each ``None`` / ``"auto"`` means: as on CUDA when the device is CUDA,
    as on CPU otherwise): ``resident`` holds the frames on the device within
    ``gpu_frames_mb`` per model; ``paste`` is ``host`` (OpenCV) or ``device`` (tensor ops,
    where the frames it needs are resident); ``graphs`` captures CUDA graphs of ``decode``
    per batch-size bucket; ``pad`` runs batches at bucket sizes even without graphs;
    ``jpeg`` is ``host`` (OpenCV) or ``auto`` (nvJPEG where available); ``overlap=False``
    makes ``forward`` wait for the device, as a reference for measurements.
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
        gpu_frames_mb: float = DEFAULT_GPU_FRAMES_MB,
        resident: bool | None = None,
        paste: str = "auto",
        graphs: bool | None = None,
        pad: bool | None = None,
        jpeg: str = "auto",
        overlap: bool = True,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        if paste not in _PASTES:
            raise ValueError(f"paste must be one of {', '.join(_PASTES)}, not {paste!r}")
        if jpeg not in ("auto", "host"):
            raise ValueError(f"jpeg must be auto or host, not {jpeg!r}")
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
        if not gpu_frames_mb >= 0:
            raise ValueError(f"gpu_frames_mb must be >= 0, not {gpu_frames_mb}")
        self.skip_cache_bytes = int(skip_cache_mb * 2**20)
        self.gpu_frames_bytes = int(gpu_frames_mb * 2**20)
        self.resident = self.cuda if resident is None else resident
        self.paste = paste
        self.graphs = self.cuda if graphs is None else graphs
        self.pad = pad
        self.overlap = overlap
        if threads > 0:
            torch.set_num_threads(threads)
        self._stream: torch.cuda.Stream | None = None
        self._graph_pool: Any = None
        if self.cuda:
            torch.backends.cudnn.benchmark = True
            # The worker's own stream: its work never waits on (or for) the default
            # stream, which torchvision's JPEG encoder uses (workers.jpeg).
            self._stream = torch.cuda.Stream(self.torch_device)
        self._device_jpeg: DeviceJpeg | None = None
        if jpeg == "auto":
            self._device_jpeg, line = choose_device_jpeg(self.torch_device)
        else:
            line = "JPEG: OpenCV on the host"
        log.info("%s", line)
        self.jpeg_encoder = "nvjpeg" if self._device_jpeg is not None else "opencv"
        self._models: dict[str, _Model] = {}

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
            gpu_frames_mb=config.gpu_frames_mb,
            graphs=None if config.cuda_graphs else False,
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
            with self._on_stream():
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
        if self.resident:
            videos = {kind: loaded.frames(kind) for kind in VIDEO_TYPES}
            log.info("%s: %s", model, loaded.resident.describe(videos, self.gpu_frames_bytes))
        runner = loaded.runner
        if runner is not None or self.graphs:
            how = "CUDA graphs" if runner is not None and runner.graphed else "eager"
            sizes = ",".join(map(str, runner.buckets)) if runner is not None else "as they come"
            log.info("%s: decode %s, batch sizes %s", model, how, sizes)
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
        """Check each item, build the batch, run the model, and (where the frames are on
        the device) paste back. Bad items get an error in their slot and take no part in
        the forward pass. On CUDA nothing here waits for the device: the batch's
        ``Ready`` event, which ``encode`` waits on, marks its end."""
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
        dev = self.torch_device
        state = _State(
            full_body=m.frames("full_body"),
            crops=m.frames("crops_328"),
            rects=m.package.rects,
            ready=Ready(dev),
            clock=StageClock(dev),
            slots=[None] * len(items),
            feather_px=m.package.feather_px,
        )
        try:
            with self._on_stream(), torch.inference_mode():
                state.clock.mark("start")
                audio, good = batch_windows(
                    m.featurizer, m.info.fps, m.features, items, good, batch.errors
                )
                state.clock.mark("audio")
                for start in range(0, len(good), self.max_batch):
                    chunk = good[start : start + self.max_batch]
                    if start:
                        state.clock.mark("start")
                    self._run(m, items, chunk, audio[start : start + len(chunk)], state)
                state.ready.mark()
        except BaseException:
            if self.cuda:  # nothing of this batch may still run when its buffers go
                torch.cuda.synchronize(dev)
            raise
        if not self.overlap:
            state.ready.wait()
        # Host time to check, stage and enqueue (on CPU: to compute) the batch; each item's
        # own stage times replace it in encode, once the device has done the work.
        timing = {"prepare": _ms(time.perf_counter() - t0)}
        batch.timings = dict(timing)
        state.item_timings = [dict(timing) for _ in items]
        batch.state = state
        return batch

    def render(self, batch: ForwardBatch) -> list[np.ndarray | BaseException]:
        """The uint8 BGR image ``encode`` would JPEG, per item: the whole frame
        (``composite``) or the rect's pixels (``crop``). Errors are passed through."""
        return [out for out, _ in self._render(batch)]

    def encode(self, batch: ForwardBatch) -> list[InferResult | BaseException]:
        """Paste back (where ``forward`` left it to the host) and JPEG each item, once the
        batch's device work is done; nvJPEG for pictures on the device where it is
        available, OpenCV otherwise."""
        state: _State | None = batch.state
        results: list[InferResult | BaseException | None] = [None] * len(batch.items)
        on_device: list[int] = []
        pictures: dict[int, tuple[np.ndarray | BaseException, _Bounds | None]] = {}
        if state is not None:
            state.ready.wait()
            self._stage_timings(state)
        for k in range(len(batch.items)):
            slot = state.slots[k] if state is not None else None
            use_device = (
                self._device_jpeg is not None
                and state is not None
                and slot is not None
                and not slot.host_paste
                and state.host[slot.tensor] is None
                and state.tensors[slot.tensor].device.type == "cuda"
            )
            if use_device:
                on_device.append(k)
            else:
                pictures[k] = self._picture(batch, k)
        for k, (image, bounds) in pictures.items():
            if isinstance(image, BaseException):
                results[k] = image
                continue
            assert state is not None and bounds is not None
            t0 = time.perf_counter()
            try:
                jpeg = encode_host(image, self._quality(batch.items[k].quality))
            except Exception as exc:
                results[k] = ServiceError(ErrorCode.INTERNAL, f"jpeg encoding failed: {exc}")
                continue
            timings = state.item_timings[k]
            timings["encode"] = _ms(time.perf_counter() - t0)
            results[k] = InferResult(jpeg=jpeg, bounds=bounds, timings=timings)
        if on_device:
            assert state is not None
            self._encode_on_device(batch, state, on_device, results)
        if state is not None:
            state.stages = _batch_stages(state, results)
        return [r if r is not None else _not_computed() for r in results]

    def stages(self, batch: ForwardBatch) -> dict[str, float]:
        """Milliseconds an encoded batch spent per stage (``prepare``, ``inference``,
        ``composite``, ``encode``), whole-batch stages counted once and per-item ones
        summed; for benchmarks. Empty before ``encode``."""
        state: _State | None = batch.state
        return dict(state.stages) if state is not None else {}

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
        return encode_host(m.frames(video_type)[frame_id], q)

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

    def resident_videos(self, model: str) -> list[str]:
        """The videos of a loaded model held on its device (``workers.resident``)."""
        return list(self._get(model).resident.frames)

    def graphed(self, model: str) -> bool:
        """Whether a loaded model's decode replays CUDA graphs."""
        runner = self._get(model).runner
        return runner is not None and runner.graphed

    def close(self) -> None:
        for name in list(self._models):
            self.unload(name)

    # -- internals -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _on_stream(self) -> Iterator[None]:
        """The worker's CUDA stream as the current one (nothing on CPU)."""
        if self._stream is None:
            yield
            return
        with torch.cuda.stream(self._stream):
            yield

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
        dev = self.torch_device
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
        model = _Model(
            package, net, featurizer, caches, info, skips, features, resident, runner=runner
        )
        if package.feather_px:  # the device paste blends with the same weights as the host's
            model.paste_alpha = _feather_weights(package.feather_px, self.torch_device)
        return model

    def _runner(self, net: UNet328) -> StaticRunner | None:
        """``decode`` (and the conversion to pixels) at bucket sizes, from CUDA graphs
        where they can be captured; None when batches run eagerly at their own size."""
        if not self.graphs and not self.pad:
            return None
        buckets = buckets_up_to(self.max_batch)
        dev = self.torch_device
        with torch.inference_mode():
            probe = net.encode_image(torch.zeros((1, 6, ROI_SIZE, ROI_SIZE), device=dev))
            examples = [
                torch.zeros((buckets[-1], *t.shape[1:]), dtype=t.dtype, device=dev).contiguous(
                    memory_format=_layout(t)
                )
                for t in probe
            ]
            examples.append(torch.zeros((buckets[-1], *_AUDIO_SHAPE), device=dev))

            def decode_pixels(*inputs: torch.Tensor) -> torch.Tensor:
                return _pixels(net.decode(inputs[:-1], inputs[-1]))

            if self.graphs and self.cuda and self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            runner = StaticRunner(
                decode_pixels, examples, buckets, graphs=self.graphs, pool=self._graph_pool
            )
        if not runner.graphed and not self.pad:
            runner.release()
            return None  # capture failed (logged): eager at the batch's own size
        return runner

    def _release(self, m: _Model) -> None:
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
            torch.cuda.synchronize(self.torch_device)
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

    def _device_paste(self, m: _Model, item: InferItem) -> bool:
        """Whether ``item`` is pasted back with tensor ops (the frames it needs are on the
        device and ``paste`` allows it) rather than with OpenCV in ``encode``."""
        if self.paste == "host" or (self.paste == "auto" and not self.resident):
            return False
        if "crops_328" not in m.resident:
            return False
        needs_frame = item.mode == "composite" or m.paste_alpha is not None
        return not needs_frame or "full_body" in m.resident

    def _stage(self, m: _Model, frame_ids: list[int]) -> torch.Tensor:
        """The batch's model input ``[b, 320, 320, 6]`` uint8 on the device: an
        index-select of the resident frames, or staged from the host (pinned on CUDA)."""
        dev = self.torch_device
        if m.resident.has_inputs():
            index = to_device(frame_ids, dev)
            rois = m.resident.frames["rois_320"].index_select(0, index)
            masked = m.resident.frames["model_inputs"].index_select(0, index)
            return torch.cat([rois, masked], dim=3)
        b = len(frame_ids)
        staged = torch.empty((b, ROI_SIZE, ROI_SIZE, 6), dtype=torch.uint8, pin_memory=self.cuda)
        images = staged.numpy()
        rois, masked = m.frames("rois_320"), m.frames("model_inputs")
        for j, i in enumerate(frame_ids):
            images[j, :, :, :3] = rois[i]
            images[j, :, :, 3:] = masked[i]
        return staged.to(dev, non_blocking=True)

    def _run(
        self,
        m: _Model,
        items: Sequence[InferItem],
        keys: list[int],
        audio: torch.Tensor,
        state: _State,
    ) -> None:
        """One forward pass over ``items[k]`` for ``k`` in ``keys`` (at most
        ``max_batch``), then its paste-back on the device or a host copy of the
        prediction; fills ``state.slots[k]``."""
        frame_ids = [items[k].frame_id for k in keys]
        # NHWC staging permuted to NCHW is channels_last-strided: the model's layout.
        x = self._stage(m, frame_ids).permute(0, 3, 1, 2)
        state.clock.mark("stage")
        net = cast(UNet328, m.net)
        skips = m.skips.skips(
            net.encode_image, frame_ids, lambda rows: _rows(x, rows).float() / 255
        )
        if m.runner is not None:
            pred = m.runner.run([*skips, audio], len(keys))  # the runner's buffer
        else:
            pred = _pixels(net.decode(skips, audio))
        state.clock.mark("model")
        device_rows = [j for j, k in enumerate(keys) if self._device_paste(m, items[k])]
        host_rows = [j for j in range(len(keys)) if j not in set(device_rows)]
        if host_rows:
            # The runner's buffer is overwritten by the next batch: a copy for encode.
            if self.cuda:
                copy = download(pred)
            else:
                copy = pred.clone() if m.runner is not None else pred
            t = state.add(copy)
            for j in host_rows:
                state.slots[keys[j]] = _Slot(t, j, host_paste=True)
        if device_rows:
            rows = pred
            if len(device_rows) < len(keys):
                rows = pred[to_device(device_rows, pred.device)]
            self._paste_on_device(m, items, [keys[j] for j in device_rows], rows, state)
            state.clock.mark("paste")

    def _paste_on_device(
        self,
        m: _Model,
        items: Sequence[InferItem],
        keys: list[int],
        pred: torch.Tensor,
        state: _State,
    ) -> None:
        """Paste-back of ``items[k]`` (``pred`` row j for ``keys[j]``) with tensor ops;
        a host copy of the pictures is started when the JPEG is made on the host."""
        dev = self.torch_device
        frame_ids = [items[k].frame_id for k in keys]
        rects = [[int(v) for v in m.package.rects[i]] for i in frame_ids]
        sides = [r[2] - r[0] for r in rects]
        index = to_device(frame_ids, dev)
        crops = m.resident.frames["crops_328"].index_select(0, index)
        faces = devicepaste.paste_faces(pred, crops, sides)
        alphas = [m.paste_alpha(s) for s in sides] if m.paste_alpha is not None else None
        crop_rows = [j for j, k in enumerate(keys) if items[k].mode == "crop"]
        frame_rows = [j for j, k in enumerate(keys) if items[k].mode == "composite"]
        if crop_rows and alphas is not None:
            full = m.resident.frames["full_body"]
            for j in crop_rows:
                x1, y1, x2, y2 = rects[j]
                face = faces[j, : sides[j], : sides[j]]
                devicepaste.feather(face, full[frame_ids[j], y1:y2, x1:x2], alphas[j])
        host_jpeg = self._device_jpeg is None
        if crop_rows:
            t = state.add(faces, download(faces) if host_jpeg and self.cuda else None)
            for j in crop_rows:
                state.slots[keys[j]] = _Slot(t, j, side=sides[j])
        if frame_rows:
            which = to_device([frame_ids[j] for j in frame_rows], dev)
            frames = m.resident.frames["full_body"].index_select(0, which)
            devicepaste.composite(
                frames,
                [faces[j] for j in frame_rows],
                [rects[j] for j in frame_rows],
                [alphas[j] for j in frame_rows] if alphas is not None else None,
            )
            t = state.add(frames, download(frames) if host_jpeg and self.cuda else None)
            for n, j in enumerate(frame_rows):
                state.slots[keys[j]] = _Slot(t, n)

    def _stage_timings(self, state: _State) -> None:
        """Per item, the batch's stage durations (device time on CUDA): ``prepare``
        (audio windows and staging), ``inference`` (the model), ``composite`` (the device
        paste-back, when there was one; the host one is timed per item)."""
        d = state.clock.durations()
        prepare = d.get("audio", 0.0) + d.get("stage", 0.0)
        for k, timings in enumerate(state.item_timings):
            timings["prepare"] = round(prepare, 3)
            timings["inference"] = round(d.get("model", 0.0), 3)
            slot = state.slots[k]
            if slot is not None and not slot.host_paste:
                timings["composite"] = round(d.get("paste", 0.0), 3)

    def _picture(
        self, batch: ForwardBatch, k: int
    ) -> tuple[np.ndarray | BaseException, _Bounds | None]:
        """Item ``k``'s picture on the host (pasted with OpenCV where ``forward`` left it
        to the host), and its bounds; or its error."""
        state: _State | None = batch.state
        err = batch.errors[k] if k < len(batch.errors) else None
        slot = state.slots[k] if state is not None else None
        if err is not None or state is None or slot is None:
            return err or _not_computed(), None
        item = batch.items[k]
        t0 = time.perf_counter()
        try:
            if slot.host_paste:
                pred = _host_rows(state, slot.tensor)[slot.row]
                image, bounds = _paste(state, item, pred)
            else:
                image = _host_rows(state, slot.tensor)[slot.row]
                if slot.side:
                    image = np.ascontiguousarray(image[: slot.side, : slot.side])
                bounds = _bounds(state.rects[item.frame_id])
        except Exception as exc:
            return ServiceError(ErrorCode.INTERNAL, f"compositing failed: {exc}"), None
        if slot.host_paste:
            state.item_timings[k]["composite"] = _ms(time.perf_counter() - t0)
        return image, bounds

    def _render(
        self, batch: ForwardBatch
    ) -> list[tuple[np.ndarray | BaseException, _Bounds | None]]:
        state: _State | None = batch.state
        if state is not None:
            state.ready.wait()
        return [self._picture(batch, k) for k in range(len(batch.items))]

    def _encode_on_device(
        self,
        batch: ForwardBatch,
        state: _State,
        keys: list[int],
        results: list[InferResult | BaseException | None],
    ) -> None:
        """nvJPEG for the items whose pictures are on the device; OpenCV on a host copy
        for any the GPU encoder fails on (logged once)."""
        assert self._device_jpeg is not None
        views = []
        for k in keys:
            slot = state.slots[k]
            assert slot is not None
            view = state.tensors[slot.tensor][slot.row]
            views.append(view[: slot.side, : slot.side] if slot.side else view)
        qualities = [self._quality(batch.items[k].quality) for k in keys]
        t0 = time.perf_counter()
        try:
            jpegs = self._device_jpeg.encode(views, qualities)
        except Exception as exc:
            _log_once("nvJPEG failed, encoding on the host: %s", exc)
            for k in keys:
                image, bounds = self._picture(batch, k)
                if isinstance(image, BaseException) or bounds is None:
                    results[k] = image if isinstance(image, BaseException) else _not_computed()
                    continue
                results[k] = InferResult(
                    jpeg=encode_host(image, qualities[keys.index(k)]),
                    bounds=bounds,
                    timings=state.item_timings[k],
                )
            return
        share = _ms((time.perf_counter() - t0) / len(keys))
        for k, jpeg in zip(keys, jpegs, strict=True):
            timings = state.item_timings[k]
            timings["encode"] = share
            bounds = _bounds(state.rects[batch.items[k].frame_id])
            results[k] = InferResult(jpeg=jpeg, bounds=bounds, timings=timings)


_Bounds = tuple[float, float, float, float]
_logged: set[str] = set()


def _log_once(fmt: str, *args: Any) -> None:
    if fmt not in _logged:
        _logged.add(fmt)
        log.warning(fmt, *args)


def _batch_stages(
    state: _State, results: Sequence[InferResult | BaseException | None]
) -> dict[str, float]:
    """``stages``: the device stages once per batch (every item carries the batch's
    figure), host paste-back and JPEG summed over the items."""
    d = state.clock.durations()
    out = {
        "prepare": d.get("audio", 0.0) + d.get("stage", 0.0),
        "inference": d.get("model", 0.0),
        "composite": d.get("paste", 0.0),
        "encode": 0.0,
    }
    for k, result in enumerate(results):
        slot = state.slots[k]
        if not isinstance(result, InferResult):
            continue
        out["encode"] += result.timings.get("encode", 0.0)
        if slot is not None and slot.host_paste:
            out["composite"] += result.timings.get("composite", 0.0)
    return {k: round(v, 3) for k, v in out.items()}


def _not_computed() -> ServiceError:
    return ServiceError(ErrorCode.INTERNAL, "item was not computed")


def _pixels(out: torch.Tensor) -> torch.Tensor:
    """The network's output ``[B, 3, 320, 320]`` in [0, 1] → uint8 ``[B, 320, 320, 3]``
    (``round(clip(out, 0, 1) * 255)``, section 5 step 3)."""
    return (out.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def _layout(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _host_rows(state: _State, t: int) -> np.ndarray:
    """``state.tensors[t]`` as a host array: its host copy (complete once the batch is
    ready), the tensor itself on CPU, or a download now."""
    host = state.host[t]
    tensor = host if host is not None else state.tensors[t]
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    return tensor.numpy()


def _bounds(rect: Sequence[int]) -> _Bounds:
    x1, y1, x2, y2 = (int(v) for v in rect)
    return float(x1), float(y1), float(x2), float(y2)


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``x[rows]``, as a view when the rows are the whole batch (the usual miss). The index
    goes up through ``to_device``: indexing a CUDA tensor with a Python list uploads it
    with a copy that waits for the stream."""
    if rows == list(range(x.shape[0])):
        return x
    return x.index_select(0, to_device(rows, x.device))


def _paste(
    state: _State, item: InferItem, pred: np.ndarray
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Section 5 step 4 with OpenCV, on the host: ``pred`` (uint8 ``[320, 320, 3]``) into
    a copy of the crop, resized to the rect, written into a copy of the frame."""
    i = item.frame_id
    x1, y1, x2, y2 = (int(v) for v in state.rects[i])
    region = state.full_body[i][y1:y2, x1:x2]
    face = paste_face(state.crops[i], pred, region, state.feather_px)
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


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _feather_weights(feather_px: int, device: torch.device) -> Callable[[int], torch.Tensor]:
    """``feather_alpha`` for each face size, on the device, made once per size."""

    @functools.lru_cache(maxsize=256)
    def weights(side: int) -> torch.Tensor:
        return torch.from_numpy(feather_alpha(side, feather_px)).to(device)

    return weights
