"""``lipsync worker``: build the backend, warm it up, then serve it to the broker.

The order matters: READY (sent by the runtime when it starts) must mean "can serve now", so
the backend loads its packages and runs its warm-up before the runtime exists.
"""

from __future__ import annotations

import logging
import os
import signal

from shared.config import WorkerConfig
from shared.logs import setup_logging
from workers.backend import Backend
from workers.runtime import WorkerRuntime, warm_up


__all__ = ["make_backend", "run"]

logger = logging.getLogger("worker")


def make_backend(config: WorkerConfig) -> Backend:
    """The backend named by ``config.backend``: ``null`` (no model, fixed JPEG) or ``torch``
    (the UNet-328 engine, imported only when chosen)."""
    if config.backend == "null":
        from workers.null import NullBackend

        return NullBackend.from_config(config)
    if config.backend == "torch":
        # Before torch starts its OpenMP runtime: idle OpenMP threads sleep rather than
        # spin. A worker shares its cores with its own I/O and JPEG threads (and, on a small
        # host, with the gateway and broker); spinning threads took the CPU those needed.
        # Live streams on 2 cores, 1 worker: 17.5 / 14.3 against 15.7 / 12.0 frames/s in two
        # alternated pairs (BENCHMARKS.md, "Demo avatar"). An explicit setting wins.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        # Likewise before numpy loads OpenBLAS: the mel filterbank product is small, and
        # OpenBLAS's helper threads spin after each call (a 2-core host: 3.3 ms of CPU per
        # stream frame's mel instead of 0.6) on the cores torch's threads are waiting for.
        # Live streams, 1 worker on 2 cores: 23.6 / 21.4 against 13.8 / 16.7 frames/s.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        from workers.engine import TorchBackend

        backend: Backend = TorchBackend.from_config(config)
        return backend
    raise ValueError(f"unknown backend {config.backend!r} (torch or null)")


def run(config: WorkerConfig) -> int:
    """Serve until SIGTERM or SIGINT (drain, then exit 0); 1 if the backend cannot start."""
    setup_logging("worker", config.log_level)
    try:
        backend = make_backend(config)
        warm_up(backend)
    except Exception:
        logger.exception("worker cannot start: %s backend failed to load", config.backend)
        return 1
    runtime = WorkerRuntime(config, backend)

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("%s received", signal.Signals(signum).name)
        runtime.stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return runtime.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
