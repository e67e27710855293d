"""``lipsync bench``: load generator and benchmark suite (DESIGN.md section 8).

Modules: ``clients`` (the load modes, one WebSocket connection each), ``load`` (one run
against a running gateway), ``stats`` (counts and percentiles), ``procs`` (the system's
processes and their CPU and memory), ``system`` (a throwaway system on free ports),
``references`` (the bare model and the null-backend ceiling), ``suite`` (everything, with
ratios), ``report`` (tables and JSON).
"""

from __future__ import annotations

import argparse


__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    if getattr(args, "suite", False):
        from lipsync.bench.suite import run_suite

        return run_suite(args)
    from lipsync.bench.load import run_load

    return run_load(args)
