"""The README's screenshot: the page of a running system, mid-speech, on the demo avatar.

    python -m workers.demo.screenshot [--url http://127.0.0.1:8086/] [--out docs/demo-talking.png]

Headless Chromium (Debian's, driven by playwright, as the browser tests do) with a fake
microphone that plays espeak-ng speech. The tool presses "Talk into the microphone",
screenshots the page every few frames while the player shows model frames, and keeps the
shot whose mouth is the most open (the most dark pixels inside the face rectangle the
frame was drawn in): a mid-speech frame, picked by measurement, not by hand.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np


__all__ = ["main", "take"]

SPEECH = (
    "Hello! This avatar moves its mouth with my voice. "
    "It was drawn, voiced and trained by the project's own code, on a laptop processor."
)

_PAGE_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
]

# The face rectangle of the frame on screen, in CSS pixels of the page, or null while the
# player shows the avatar's own (idle) frame.
_FACE_BOX_JS = """
() => {
  const p = window.lipsync.player, d = p.lastDrawn;
  if (!d || d.idle) return null;
  let [x1, y1, x2, y2] = d.bounds;
  if (!(x2 > x1 && y2 > y1)) [x1, y1, x2, y2] = window.lipsync.metadata.bounds;
  const c = document.getElementById('avatar'), r = c.getBoundingClientRect();
  const sx = r.width / c.width, sy = r.height / c.height;
  return [r.left + x1 * sx, r.top + y1 * sy, r.left + x2 * sx, r.top + y2 * sy];
}
"""


def _speech_wav(path: Path, text: str) -> Path:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise SystemExit("screenshot: needs espeak-ng for the microphone's speech")
    subprocess.run([espeak, "-s", "150", "-w", str(path), text], check=True, capture_output=True)
    return path


def _mouth_score(png: bytes, box: list[float]) -> int:
    """Dark pixels in the lower middle of the face rectangle: the open mouth."""
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ValueError("the screenshot is not a PNG")
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    w, h = x2 - x1, y2 - y1
    region = image[y1 + h // 4 : y1 + 3 * h // 4, x1 + w // 5 : x2 - w // 5]
    return int(np.count_nonzero(region < 72))


def take(url: str, out: Path, chromium: Path, seconds: float = 12.0) -> int:
    """Screenshot ``url`` mid-speech into ``out``; returns the chosen shot's mouth score."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        wav = _speech_wav(Path(tmp) / "speech.wav", SPEECH)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=str(chromium),
                headless=True,
                args=[*_PAGE_ARGS, f"--use-file-for-fake-audio-capture={wav}"],
            )
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.goto(url)
                page.wait_for_function(
                    "document.getElementById('load-text').textContent === '100 %'"
                    " && !document.getElementById('mic').disabled",
                    timeout=120_000,
                )
                page.click("#mic")
                page.wait_for_function(
                    "window.lipsync.player.lastDrawn && !window.lipsync.player.lastDrawn.idle",
                    timeout=60_000,
                )
                best, best_png = -1, b""
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    box = page.evaluate(_FACE_BOX_JS)
                    png = page.screenshot()
                    if box is not None and (score := _mouth_score(png, box)) > best:
                        best, best_png = score, png
                    page.wait_for_timeout(120)
            finally:
                browser.close()
    if best < 0:
        raise SystemExit("screenshot: the player never showed a model frame")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(best_png)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8086/")
    ap.add_argument("--out", type=Path, default=Path("docs/demo-talking.png"))
    ap.add_argument("--chromium", type=Path, default=Path("/usr/bin/chromium"))
    ap.add_argument("--seconds", type=float, default=12.0, help="how long to watch")
    args = ap.parse_args(argv)
    score = take(args.url, args.out, args.chromium, args.seconds)
    print(f"{args.out}: mouth score {score} (dark pixels in the mouth area)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
