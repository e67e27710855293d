"""Which processes serve the system under test, and what they cost (CPU, memory).

Processes come from ``--pids`` or from a scan for ``lipsync broker|gateway|worker`` command
lines. On a machine where several systems run at once (tests, other people), a scan finds
them all, so it is narrowed by sockets when it can: the gateway is the process listening on
the URL's port, the broker the one listening where that gateway is connected, the workers
those connected to the broker's other port.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psutil


__all__ = ["ROLES", "Proc", "Sampler", "find_processes", "mapped", "memory", "role_of"]

ROLES = ("gateway", "broker", "worker")


@dataclass(slots=True)
class Proc:
    pid: int
    role: str  # gateway | broker | worker | bench | ?
    process: psutil.Process = field(repr=False)


def role_of(cmdline: list[str]) -> str | None:
    """``broker``, ``gateway`` or ``worker`` for a ``lipsync <role>`` (or ``python -m lipsync
    <role>``) command line, else None."""
    for i, arg in enumerate(cmdline[:-1]):
        if os.path.basename(arg) == "lipsync":  # the console script, or ``-m lipsync``
            nxt = cmdline[i + 1]
            return nxt if nxt in ROLES else None
    return None


def _scan() -> list[Proc]:
    found = []
    me = os.getpid()
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            role = role_of(p.info["cmdline"] or [])
        except (psutil.Error, TypeError):
            continue
        if role and p.info["pid"] != me:
            found.append(Proc(p.info["pid"], role, p))
    return found


def _listening(p: psutil.Process) -> set[int]:
    try:
        return {c.laddr.port for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    except psutil.Error:
        return set()


def _remote_ports(p: psutil.Process) -> set[int]:
    try:
        return {c.raddr.port for c in p.net_connections("tcp") if c.raddr}
    except psutil.Error:
        return set()


def find_processes(pids: Iterable[int] = (), port: int | None = None) -> list[Proc]:
    """The system's processes: ``pids`` (role read from their command lines), or a scan
    narrowed to the system whose gateway listens on ``port``."""
    pids = list(pids)
    if pids:
        procs = []
        for pid in pids:
            p = psutil.Process(pid)
            try:
                role = role_of(p.cmdline()) or "?"
            except psutil.Error:
                role = "?"
            procs.append(Proc(pid, role, p))
        return procs
    found = _scan()
    if port is None:
        return found
    gateways = [p for p in found if p.role == "gateway" and port in _listening(p.process)]
    if not gateways:
        return found  # ipc:// or no permission to see sockets: keep everything
    upstream = set().union(*(_remote_ports(g.process) for g in gateways))
    brokers = [p for p in found if p.role == "broker" and _listening(p.process) & upstream]
    backend = set().union(*(_listening(b.process) for b in brokers)) - upstream
    workers = [p for p in found if p.role == "worker" and _remote_ports(p.process) & backend]
    return gateways + brokers + workers


def memory(proc: Proc) -> dict[str, int]:
    """RSS, PSS and USS in bytes (PSS: shared pages divided among their users)."""
    try:
        m = proc.process.memory_full_info()
    except psutil.Error:
        return {}
    return {"rss": m.rss, "pss": getattr(m, "pss", 0), "uss": getattr(m, "uss", 0)}


class Sampler:
    """CPU seconds each process spent between ``start()`` and ``stop()``, as a percentage
    of one core (200 % = both cores of a 2-core machine)."""

    def __init__(self, procs: list[Proc]) -> None:
        self.procs = procs
        self._t0 = 0.0
        self._cpu0: dict[int, float] = {}

    @staticmethod
    def _cpu(p: Proc) -> float | None:
        try:
            t = p.process.cpu_times()
        except psutil.Error:
            return None
        return float(t.user + t.system)

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._cpu0 = {p.pid: c for p in self.procs if (c := self._cpu(p)) is not None}

    def stop(self) -> list[dict[str, Any]]:
        wall = time.monotonic() - self._t0
        rows = []
        for p in self.procs:
            c1 = self._cpu(p)
            c0 = self._cpu0.get(p.pid)
            cpu = None if c1 is None or c0 is None or wall <= 0 else 100 * (c1 - c0) / wall
            rows.append(
                {
                    "pid": p.pid,
                    "role": p.role,
                    "cpu_percent": None if cpu is None else round(cpu, 1),
                    **memory(p),
                }
            )
        return rows


def mapped(proc: Proc, suffix: str) -> dict[str, int]:
    """RSS and PSS of the process's mappings of files ending with ``suffix`` (the shared
    frame caches: ``.framecache``), in bytes."""
    rss = pss = 0
    try:
        for m in proc.process.memory_maps(grouped=True):
            if m.path.endswith(suffix):
                rss += m.rss
                pss += getattr(m, "pss", 0)
    except psutil.Error:
        return {}
    return {"rss": rss, "pss": pss}
