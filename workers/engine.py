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
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.config import WorkerConfig
from shared.errors import ErrorCode, ServiceError
from workers.backend import VIDEO_TYPES, ForwardBatch, InferItem, InferResult, ModelInfo
from workers.batch_audio import batch_windows
from workers.batchstate import BatchState, ms
from workers.checkpoint import CheckpointError
from workers.encodepass import EncodePass
from workers.forwardpass import ForwardPass
from workers.framecache import FrameCacheError
from workers.jpeg import DeviceJpeg, choose_device_jpeg, encode_host
from workers.loaded import LoadedModel, ModelLoader, check_frame, check_item
from workers.package import PackageError, check_model_name, list_packages
from workers.transfer import Ready, StageClock
from workers.unet import resolve_device


__all__ = ["TorchBackend"]

log = logging.getLogger(__name__)

DEFAULT_SKIP_CACHE_MB = WorkerConfig.skip_cache_mb
"""Per model: every frame of a 100-frame quarter-width avatar in float32 (4.9 MB each), or
about 50 frames of a full-width one in fp16. See ``workers.skipcache``."""
DEFAULT_GPU_FRAMES_MB = WorkerConfig.gpu_frames_mb
"""Per model: all four videos of an avatar of up to about 580 frames at 1280x720 (3.7 MB a
frame). See ``workers.resident``."""
_PASTES = ("auto", "host", "device")


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
        self._loader = ModelLoader(
            self.torch_device,
            fp16=self.fp16,
            max_batch=max_batch,
            skip_cache_bytes=self.skip_cache_bytes,
            resident=self.resident,
            gpu_frames_bytes=self.gpu_frames_bytes,
            graphs=self.graphs,
            pad=pad,
        )
        self._forward = ForwardPass(
            self.torch_device,
            paste=paste,
            resident=self.resident,
            host_jpeg=self._device_jpeg is None,
        )
        self._encode = EncodePass(self._device_jpeg, self._quality)
        self._models: dict[str, LoadedModel] = {}

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
                loaded = self._loader.load(self.models_dir, model)
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
            self._loader.release(old)
        self._loader.log_loaded(loaded, time.monotonic() - start)
        info = loaded.info
        return info

    def unload(self, model: str) -> None:
        loaded = self._models.pop(model, None)
        if loaded is None:
            raise ServiceError(ErrorCode.UNKNOWN_MODEL, f"model {model!r} is not loaded")
        stats = loaded.skips.stats()
        self._loader.release(loaded)
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
            batch.errors[k] = check_item(m, item, self._quality)
        good = [k for k in range(len(items)) if batch.errors[k] is None]
        dev = self.torch_device
        state = BatchState(
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
                    self._forward.run(m, items, chunk, audio[start : start + len(chunk)], state)
                state.ready.mark()
        except BaseException:
            if self.cuda:  # nothing of this batch may still run when its buffers go
                torch.cuda.synchronize(dev)
            raise
        if not self.overlap:
            state.ready.wait()
        # Host time to check, stage and enqueue (on CPU: to compute) the batch; each item's
        # own stage times replace it in encode, once the device has done the work.
        timing = {"prepare": ms(time.perf_counter() - t0)}
        batch.timings = dict(timing)
        state.item_timings = [dict(timing) for _ in items]
        batch.state = state
        return batch

    def render(self, batch: ForwardBatch) -> list[np.ndarray | BaseException]:
        """The uint8 BGR image ``encode`` would JPEG, per item: the whole frame
        (``composite``) or the rect's pixels (``crop``). Errors are passed through."""
        return [out for out, _ in self._encode.render(batch)]

    def encode(self, batch: ForwardBatch) -> list[InferResult | BaseException]:
        """Paste back (where ``forward`` left it to the host) and JPEG each item, once the
        batch's device work is done; nvJPEG for pictures on the device where it is
        available, OpenCV otherwise (``workers.encodepass``)."""
        return self._encode.encode(batch)

    def stages(self, batch: ForwardBatch) -> dict[str, float]:
        """Milliseconds an encoded batch spent per stage (``prepare``, ``inference``,
        ``composite``, ``encode``), whole-batch stages counted once and per-item ones
        summed; for benchmarks. Empty before ``encode``."""
        state: BatchState | None = batch.state
        return dict(state.stages) if state is not None else {}

    def video_frame(self, model: str, frame_id: int, video_type: str, quality: int) -> bytes:
        m = self._get(model)
        if video_type not in VIDEO_TYPES:
            raise ServiceError(
                ErrorCode.UNKNOWN_VIDEO,
                f"unknown video type {video_type!r} (one of {', '.join(VIDEO_TYPES)})",
            )
        check_frame(m, frame_id)
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

    def _get(self, model: str) -> LoadedModel:
        m = self._models.get(model)
        if m is None:
            raise ServiceError(ErrorCode.UNKNOWN_MODEL, f"model {model!r} is not loaded")
        return m

    def _quality(self, quality: int | None) -> int:
        if quality is None or quality == 0:
            return self.jpeg_quality
        return _check_quality(quality)


def _check_quality(quality: Any) -> int:
    if type(quality) is not int or not 1 <= quality <= 100:
        raise ValueError(f"jpeg quality must be 1..100, not {quality!r}")
    return quality
