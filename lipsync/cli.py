"""The ``lipsync`` console script: one subcommand per process or tool (DESIGN.md section 2).

Subcommand modules are imported only when chosen, so ``lipsync broker`` and
``lipsync gateway`` never import torch or OpenCV.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


__all__ = ["main"]


def _broker(args: argparse.Namespace) -> int:
    from broker.server import run
    from shared.config import BrokerConfig, from_env

    return run(
        from_env(
            BrokerConfig,
            frontend=args.frontend,
            backend=args.backend,
            queue_limit=args.queue_limit,
            warmup_s=args.warmup_s,
            curve_secret_file=args.curve_secret_file,
            log_level=args.log_level,
        )
    )


def _worker(args: argparse.Namespace) -> int:
    from shared.config import WorkerConfig, from_env
    from workers.main import run

    return run(
        from_env(
            WorkerConfig,
            broker=args.broker,
            models_dir=args.models_dir,
            models=args.models,
            device=args.device,
            backend=args.backend,
            max_batch=args.max_batch,
            max_delay_ms=args.max_delay_ms,
            batch_sizing=args.batch_sizing,
            capacity=args.capacity,
            fp16=args.fp16,
            null_delay_ms=args.null_delay_ms,
            threads=args.threads,
            skip_cache_mb=args.skip_cache_mb,
            gpu_frames_mb=args.gpu_frames_mb,
            cuda_graphs=args.cuda_graphs,
            worker_id=args.worker_id,
            curve_server_key=args.curve_server_key,
            log_level=args.log_level,
        )
    )


def _gateway(args: argparse.Namespace) -> int:
    from gateway.server import run
    from shared.config import GatewayConfig, from_env

    return run(
        from_env(
            GatewayConfig,
            broker=args.broker,
            host=args.host,
            port=args.port,
            web_dir=args.web_dir,
            allowed_origins=args.allowed_origins,
            max_in_flight=args.max_in_flight,
            log_level=args.log_level,
        )
    )


def _make_package(args: argparse.Namespace) -> int:
    from workers.make_package import make_package

    width, _, height = args.size.partition("x")
    path = make_package(
        args.dir,
        name=args.name,
        frames=args.frames,
        size=(int(width), int(height)),
        width=args.width,
        seed=args.seed,
    )
    print(path)
    return 0


def _import_synctalk(args: argparse.Namespace) -> int:
    from workers.synctalk_import import run

    return run(args)


def _train_demo(args: argparse.Namespace) -> int:
    try:
        from workers.demo.cli import train_demo
    except ModuleNotFoundError as exc:
        print(f"lipsync train-demo: not available in this checkout ({exc.name} missing)")
        return 2

    return train_demo(args)


def _up(args: argparse.Namespace) -> int:
    from lipsync.up import run

    return run(args)


def _status(args: argparse.Namespace) -> int:
    from lipsync.up import status

    return status(args)


def _scale(args: argparse.Namespace) -> int:
    from lipsync.up import scale

    return scale(args)


def _models(args: argparse.Namespace) -> int:
    from lipsync.models import run

    return run(args)


def _bench(args: argparse.Namespace) -> int:
    if args.soak is not None:
        from lipsync.bench.soak import run_soak

        return run_soak(args)
    from lipsync.bench import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipsync", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (LIPSYNC_LOG_LEVEL)")

    p = sub.add_parser("broker", help="run the ZeroMQ broker")
    p.add_argument("--frontend", help="bind address for gateways (default tcp://127.0.0.1:5555)")
    p.add_argument("--backend", help="bind address for workers (default tcp://127.0.0.1:5556)")
    p.add_argument("--queue-limit", type=int, help="pending requests per model (default 256)")
    p.add_argument(
        "--warmup-s",
        type=float,
        help="after start, how long requests for a model no worker holds yet wait for "
        "workers to register (default: two liveness periods, 6 s)",
    )
    p.add_argument("--curve-secret-file", help="CURVE server secret key file for the backend")
    common(p)
    p.set_defaults(func=_broker)

    p = sub.add_parser("worker", help="run a worker that joins a broker")
    p.add_argument("--broker", help="broker backend address (default tcp://127.0.0.1:5556)")
    p.add_argument("--models-dir", help="directory of model packages (default models)")
    p.add_argument("--models", help="comma list of packages to load (default all)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--backend", choices=["torch", "null"], help="compute backend (default torch)")
    p.add_argument("--max-batch", type=int, help="largest batch (default 4)")
    p.add_argument("--max-delay-ms", type=float, help="wait for a batch to fill (default 5)")
    p.add_argument(
        "--batch-sizing",
        choices=("deadline", "fixed"),
        help="deadline (default): batches sized to their jobs' deadlines; fixed: max batch",
    )
    p.add_argument("--capacity", type=int, help="requests held at once (default 2 x max batch)")
    p.add_argument("--fp16", action="store_true", default=None, help="half precision on CUDA")
    p.add_argument("--null-delay-ms", type=float, help="service time of the null backend")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default torch's)")
    p.add_argument(
        "--skip-cache-mb",
        type=float,
        help="per model: memory for each frame's image features, kept so a frame's image "
        "half runs once (default 512; 0 turns it off)",
    )
    p.add_argument(
        "--gpu-frames-mb",
        type=float,
        help="per model, on CUDA: memory for the avatar's frames on the GPU (model inputs, "
        "then crops, then full frames; what does not fit is staged from the host; "
        "default 2048)",
    )
    p.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        default=None,
        help="run the decoder eagerly on CUDA instead of replaying CUDA graphs",
    )
    p.add_argument("--worker-id", help="name shown in stats (default host:pid)")
    p.add_argument("--curve-server-key", help="broker's public CURVE key (z85)")
    common(p)
    p.set_defaults(func=_worker)

    p = sub.add_parser("gateway", help="run the WebSocket gateway")
    p.add_argument("--broker", help="broker frontend address (default tcp://127.0.0.1:5555)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8086)")
    p.add_argument("--web-dir", help="static files for / (default the repo's web/)")
    p.add_argument("--allowed-origins", help="comma list of allowed Origins")
    p.add_argument("--max-in-flight", type=int, help="requests in flight per connection")
    common(p)
    p.set_defaults(func=_gateway)

    p = sub.add_parser("make-package", help="write a synthetic model package")
    p.add_argument("dir", help="models directory to write into")
    p.add_argument("--name", default="synthetic")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", default="320x240", help="full frame WxH")
    p.add_argument("--width", choices=["full", "half", "quarter"], default="quarter")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_package)

    p = sub.add_parser(
        "import-synctalk",
        help="turn a SyncTalk_2D training run into a package",
        description="Write the package of a SyncTalk_2D training run: its dataset/<name>/ "
        "folder, the newest checkpoint/<name>/<epoch>.pth and the AVE audio encoder.",
    )
    p.add_argument("dataset", help="the run's dataset/<name>/ folder")
    p.add_argument(
        "--checkpoint",
        help="UNet weights file, or a folder to pick from (default: best.pth, else the newest "
        "<epoch>.pth in DATASET/../../checkpoint/<name>/)",
    )
    p.add_argument(
        "--encoder",
        help="AVE encoder weights (default: model/checkpoints/audio_visual_encoder.pth or "
        "data_utils/ave/checkpoints/audio_encoder.pth of the SyncTalk_2D checkout)",
    )
    p.add_argument("--name", help="package name (default: the dataset folder's name)")
    p.add_argument("--models-dir", help="write the package here (default models)")
    p.add_argument("--force", action="store_true", help="replace a package of the same name")
    p.add_argument(
        "--feather-px",
        type=int,
        default=0,
        help="blend the pasted face square into the frame over this many pixels (default 0: "
        "SyncTalk's hard edge, frames exactly inference_328's)",
    )
    p.set_defaults(func=_import_synctalk)

    p = sub.add_parser("train-demo", help="train the demo avatar on this CPU (seeded)")
    p.add_argument("--models-dir", default="models", help="write the package here")
    p.add_argument("--name", default="demo", help="package name (default demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--save-weights",
        nargs="?",
        const="",
        default=None,
        metavar="FILE",
        help="also save the weights (no FILE: refresh the committed demo weights)",
    )
    p.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.set_defaults(func=_train_demo)

    p = sub.add_parser("up", help="run broker + gateway + workers under supervisord")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default 1)")
    p.add_argument("--models-dir", default=None, help="packages (default ./models)")
    p.add_argument("--host", default=None, help="gateway bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="gateway port (default 8086)")
    p.add_argument("--run-dir", default=None, help="logs and sockets (default ./run)")
    p.add_argument("--backend", choices=["torch", "null"], default=None)
    p.add_argument("--print-env", action="store_true", help="print the variables and exit")
    p.set_defaults(func=_up)

    p = sub.add_parser("status", help="status of a running `lipsync up`")
    p.add_argument("--run-dir", default=None)
    p.set_defaults(func=_status)

    p = sub.add_parser("scale", help="set the number of workers of a running `lipsync up`")
    p.add_argument("n", type=int)
    p.add_argument("--run-dir", default=None)
    p.set_defaults(func=_scale)

    p = sub.add_parser("models", help="list, load, unload or reload packages at run time")
    p.add_argument("action", choices=["list", "load", "unload", "reload"])
    p.add_argument("name", nargs="?", help="package name (load, unload, reload)")
    p.add_argument("--workers", default="all", help="all (default), a count N, or a worker id")
    p.add_argument("--url", default="ws://127.0.0.1:8086/ws", help="gateway WebSocket URL")
    p.add_argument("--token", default=None, help="gateway token (default $LIPSYNC_TOKEN)")
    p.add_argument("--timeout", type=float, default=75.0, help="seconds to wait for workers")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.set_defaults(func=_models)

    p = sub.add_parser("bench", help="load generator against a running gateway")
    p.add_argument("--url", default="ws://127.0.0.1:8086/ws")
    p.add_argument("--mode", choices=["closed", "sequential", "stream"], default="closed")
    p.add_argument("--clients", type=int, default=1, help="WebSocket connections")
    p.add_argument("--in-flight", type=int, default=4, help="closed loop: requests per client")
    p.add_argument("--layout", choices=["A", "B"], default="B", help="A composite, B crop")
    p.add_argument("--no-audio", action="store_true", help="layout B without its 640 ms audio")
    p.add_argument("--rate", type=float, default=0.0, help="max requests/s per client")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    p.add_argument("--model", help="model name (default the first listed)")
    p.add_argument("--token", default=None, help="bearer token (LIPSYNC_TOKEN)")
    p.add_argument("--deflate", action="store_true", help="offer permessage-deflate")
    p.add_argument(
        "--frames-per-request", type=int, default=0, help="streams: frames per worker request"
    )
    p.add_argument("--pids", help="comma list of pids to sample (default: scan)")
    p.add_argument("--json", help="write the report here too")
    p.add_argument("--suite", action="store_true", help="start a system and run the suite")
    p.add_argument("--quick", action="store_true", help="suite: short steps (smoke run)")
    p.add_argument("--out", help="suite: directory for JSON reports and profiles")
    p.add_argument(
        "--soak", type=float, metavar="MINUTES", help="start a system, load it, inject faults"
    )
    p.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
