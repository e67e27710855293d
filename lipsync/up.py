"""``lipsync up``, ``lipsync status`` and ``lipsync scale``: the whole system under supervisord.

``up`` fills in every ``LIPSYNC_*`` variable that supervisord.conf expands, makes sure the
models dir holds a package (building the demo avatar when it is empty), runs supervisord in
the foreground in its own session, waits until the gateway's ``/health`` says it can serve,
prints the URL, and on Ctrl-C or SIGTERM asks supervisord to stop everything and waits for
it, so no process is left behind.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


__all__ = ["environment", "run", "scale", "status", "supervisorctl"]

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "supervisord.conf"
HEALTH_TIMEOUT_S = 300.0
"""First start on CPU may build the demo package and warm models up: be patient."""


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "")
    return value if value else default


def environment(args: argparse.Namespace) -> dict[str, str]:
    """Every variable supervisord.conf expands, from flags, then LIPSYNC_* variables,
    then defaults."""
    run_dir = Path(args.run_dir or _env("LIPSYNC_RUN_DIR", "run")).resolve()
    models_dir = Path(args.models_dir or _env("LIPSYNC_MODELS_DIR", "models")).resolve()
    workers = args.workers if args.workers is not None else int(_env("LIPSYNC_WORKERS", "1"))
    if workers < 0:
        raise SystemExit("lipsync up: --workers must be >= 0")
    env = dict(os.environ)
    env.update(
        {
            "LIPSYNC_RUN_DIR": str(run_dir),
            "LIPSYNC_PYTHON": sys.executable,
            "LIPSYNC_REPO": str(REPO),
            "LIPSYNC_HOST": args.host or _env("LIPSYNC_HOST", "127.0.0.1"),
            "LIPSYNC_PORT": str(args.port or _env("LIPSYNC_PORT", "8086")),
            "LIPSYNC_BROKER_FRONTEND": _env("LIPSYNC_BROKER_FRONTEND", "tcp://127.0.0.1:5555"),
            "LIPSYNC_BROKER_BACKEND": _env("LIPSYNC_BROKER_BACKEND", "tcp://127.0.0.1:5556"),
            "LIPSYNC_MODELS_DIR": str(models_dir),
            "LIPSYNC_WORKERS": str(workers),
            "LIPSYNC_SPARE_WORKERS": _env("LIPSYNC_SPARE_WORKERS", "4"),
            "LIPSYNC_BACKEND": getattr(args, "backend", None) or _env("LIPSYNC_BACKEND", "torch"),
        }
    )
    return env


def _has_package(models_dir: Path) -> bool:
    return models_dir.is_dir() and any(
        (p / "package_info.json").is_file() for p in models_dir.iterdir()
    )


def _ensure_package(models_dir: Path) -> None:
    if _has_package(models_dir):
        return
    models_dir.mkdir(parents=True, exist_ok=True)
    try:
        from workers.demo import build_demo_package
    except ImportError:  # demo trainer not installed: fall back to a random-weight package
        from workers.make_package import make_package

        print(
            f"lipsync up: {models_dir} holds no package and the demo trainer is not in this "
            "checkout: writing a synthetic package with random weights (the mouth will not "
            "follow the voice)",
            flush=True,
        )
        make_package(models_dir, name="demo", frames=50, size=(640, 360), width="quarter")
    else:
        print(f"lipsync up: {models_dir} holds no package; building the demo avatar", flush=True)
        build_demo_package(models_dir, name="demo", progress=True)


def _die_with_parent() -> None:
    """Run in the child before exec: if `lipsync up` is killed outright, supervisord gets
    SIGTERM from the kernel and takes its programs down instead of running orphaned."""
    os.setsid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _health(host: str, port: str, timeout: float = 2.0) -> tuple[int, dict[str, Any]]:
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    url = f"http://{host}:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {}
    except (OSError, ValueError):
        return 0, {}


def _summary(health: dict[str, Any]) -> str:
    workers = health.get("workers", "?")
    models = health.get("models") or []
    return f"{workers} worker(s), models: {', '.join(map(str, models)) or 'none'}"


def run(args: argparse.Namespace) -> int:
    env = environment(args)
    run_dir = Path(env["LIPSYNC_RUN_DIR"])
    run_dir.mkdir(parents=True, exist_ok=True)
    if getattr(args, "print_env", False):
        for key in sorted(k for k in env if k.startswith("LIPSYNC_")):
            print(f"export {key}={env[key]}")
        return 0
    if env["LIPSYNC_BACKEND"] == "torch":
        _ensure_package(Path(env["LIPSYNC_MODELS_DIR"]))
    _check_port_free(env["LIPSYNC_HOST"], int(env["LIPSYNC_PORT"]))

    # `lipsync status` and `scale` read this to find the gateway without the same flags
    (run_dir / "up.json").write_text(
        json.dumps({k: v for k, v in env.items() if k.startswith("LIPSYNC_")}, indent=1)
    )
    cmd = [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(CONF)]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, preexec_fn=_die_with_parent)
    stopping = False

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            print(
                f"\nlipsync up: {signal.Signals(signum).name}: stopping all processes", flush=True
            )
            proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    host, port = env["LIPSYNC_HOST"], env["LIPSYNC_PORT"]
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    healthy = False
    while proc.poll() is None and not stopping:
        code, health = _health(host, port)
        if code == 200 and not healthy:
            healthy = True
            print(f"lipsync up: serving on http://{shown_host}:{port}/  ({_summary(health)})")
            print(f"lipsync up: logs in {run_dir}; Ctrl-C stops everything", flush=True)
        if not healthy and time.monotonic() > deadline:
            print(
                f"lipsync up: not healthy after {HEALTH_TIMEOUT_S:.0f} s "
                f"(last /health: {code} {health}); see the logs in {run_dir}",
                flush=True,
            )
            deadline = float("inf")
        try:
            proc.wait(timeout=0.5 if not healthy else 5.0)
        except subprocess.TimeoutExpired:
            pass
    rc = proc.wait()
    print(f"lipsync up: stopped (supervisord exit code {rc})", flush=True)
    return 0 if stopping else rc or 1


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host if host not in ("", "::") else "0.0.0.0", port))
        except OSError as exc:
            raise SystemExit(
                f"lipsync up: cannot listen on {host}:{port} ({exc.strerror}); "
                "is another `lipsync up` running? use --port"
            ) from None


def _saved_env(run_dir: Path) -> dict[str, str]:
    """The variables the running `lipsync up` used (written at start)."""
    try:
        saved = json.loads((run_dir / "up.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: str(v) for k, v in saved.items()} if isinstance(saved, dict) else {}


def supervisorctl(run_dir: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run supervisorctl against the system whose run dir is ``run_dir``.

    supervisorctl reads a config file even with ``-s``, and would pick up ./supervisord.conf
    from the repo root, whose %(ENV_...)s expansions need the variables `lipsync up` set:
    give it both."""
    sock = run_dir / "supervisor.sock"
    if not sock.exists():
        raise SystemExit(f"lipsync: no running system in {run_dir} (no {sock.name})")
    env = {**os.environ, **_saved_env(run_dir), "LIPSYNC_RUN_DIR": str(run_dir)}
    return subprocess.run(
        [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(CONF),
         "-s", f"unix://{sock}", *argv],
        capture_output=True, text=True, check=False, env=env,
    )  # fmt: skip


def _run_dir(args: argparse.Namespace) -> Path:
    return Path(args.run_dir or _env("LIPSYNC_RUN_DIR", "run")).resolve()


def _processes(run_dir: Path) -> dict[str, str]:
    """supervisorctl status as {name: state}."""
    out = supervisorctl(run_dir, "status").stdout
    states = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            states[parts[0]] = parts[1]
    return states


def status(args: argparse.Namespace) -> int:
    run_dir = _run_dir(args)
    print(supervisorctl(run_dir, "status").stdout, end="")
    env = environment(
        argparse.Namespace(
            run_dir=str(run_dir), models_dir=None, workers=None, host=None, port=None
        )
    )
    code, health = _health(env["LIPSYNC_HOST"], env["LIPSYNC_PORT"])
    print(f"health: {code or 'unreachable'} {_summary(health) if health else ''}".rstrip())
    return 0 if code == 200 else 1


def scale(args: argparse.Namespace) -> int:
    """Start or stop worker processes until ``n`` are running: base workers first, then
    spares; stopping goes the other way. Running processes are never restarted."""
    run_dir = _run_dir(args)
    states = _processes(run_dir)
    slots = sorted(
        (name for name in states if name.startswith(("worker:", "spare:"))),
        key=lambda n: (not n.startswith("worker:"), n),
    )
    if args.n > len(slots):
        raise SystemExit(
            f"lipsync scale: {args.n} workers asked, {len(slots)} slots configured; "
            "restart with a larger LIPSYNC_SPARE_WORKERS, or start workers by hand "
            "(README: Scaling out)"
        )
    want = set(slots[: args.n])
    for name in slots:
        running = states[name] in ("RUNNING", "STARTING", "BACKOFF")
        if name in want and not running:
            print(supervisorctl(run_dir, "start", name).stdout, end="")
        elif name not in want and running:
            print(supervisorctl(run_dir, "stop", name).stdout, end="")
    return 0
