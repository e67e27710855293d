"""Importer benchmark: how long ``lipsync import-synctalk`` takes, against references timed
in the same run on the same machine.

    python -m workers.bench_import [--frames 100] [--size 1280x720] [--width full]
                                   [--repeats 3] [--json out.json]

A drawn SyncTalk_2D run (``workers.synctalk_sample``) of ``--frames`` JPEGs is written once
(not timed). Then, ``--repeats`` times and alternating so that a neighbour's load spreads
over all of them:

* ``decode``: ``cv2.imread`` of every JPEG: the floor any importer pays (reference);
* ``make-package``: ``workers.make_package`` of the same frame count and size (what the
  project's synthetic packages cost: drawing, mp4v, random weights; second reference);
* ``plan``: the importer's checks and weight loading alone (no frame but the first read);
* ``import``: the whole import into a fresh models dir.

Times are medians; ratios are import / reference, of the medians and within each repeat.
The machine's load average at the start and the end is part of the report.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import cv2

from workers.make_package import make_package
from workers.synctalk_import import import_synctalk, plan
from workers.synctalk_sample import write_sample_run


__all__ = ["main"]


def _decode_all(jpegs: list[Path]) -> None:
    for path in jpegs:
        cv2.imread(str(path))


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.bench_import", description=__doc__)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--size", default="1280x720", help="frame WxH")
    parser.add_argument("--width", choices=["full", "half", "quarter"], default="full")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    w, _, h = args.size.partition("x")
    size = (int(w), int(h))

    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-import-") as tmp:
        base = Path(tmp)
        t0 = time.perf_counter()
        run = write_sample_run(base / "run", frames=args.frames, size=size, width=args.width)
        print(f"sample run written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        jpegs = [run.dataset / "full_body_img" / f"{i}.jpg" for i in range(args.frames)]
        times: dict[str, list[float]] = {"decode": [], "make-package": [], "plan": [], "import": []}
        for k in range(args.repeats):
            steps: dict[str, Callable[[], object]] = {
                "decode": partial(_decode_all, jpegs),
                "make-package": partial(
                    make_package,
                    base / f"synthetic{k}",
                    frames=args.frames,
                    size=size,
                    width=args.width,
                ),
                "plan": partial(plan, run.dataset, models_dir=base / f"planned{k}"),
                "import": partial(
                    import_synctalk, run.dataset, models_dir=base / f"models{k}", progress=False
                ),
            }
            for step, fn in steps.items():
                times[step].append(_timed(fn))
            print(
                f"repeat {k + 1}: " + ", ".join(f"{n} {v[-1]:.2f} s" for n, v in times.items()),
                file=sys.stderr,
            )

    median = {name: statistics.median(values) for name, values in times.items()}
    report = {
        "command": "python -m workers.bench_import " + shlex.join(argv or sys.argv[1:]),
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "frames": args.frames,
        "size": list(size),
        "width": args.width,
        "seconds": {k: [round(v, 3) for v in vs] for k, vs in times.items()},
        "median_s": {k: round(v, 3) for k, v in median.items()},
        "import_over_decode": round(median["import"] / median["decode"], 2),
        "import_over_make_package": round(median["import"] / median["make-package"], 2),
        # the same ratios taken within each repeat (neighbours' load changes between them)
        "per_repeat_over_decode": [
            round(a / b, 2) for a, b in zip(times["import"], times["decode"], strict=True)
        ],
        "per_repeat_over_make_package": [
            round(a / b, 2) for a, b in zip(times["import"], times["make-package"], strict=True)
        ],
        "import_ms_per_frame": round(1000 * median["import"] / args.frames, 1),
    }
    print("| step | median s | ms per frame | import / step |")
    print("|---|---:|---:|---:|")
    for name, value in median.items():
        ratio = median["import"] / value
        print(f"| {name} | {value:.2f} | {1000 * value / args.frames:.1f} | {ratio:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
