"""Static files of the web client (``web/``), served on the gateway's port.

The request path arrives raw (websockets does not decode or normalise it), so everything a
path could use to leave the directory is refused before the filesystem is touched: ``..``
and ``.`` segments, encoded dots, slashes and backslashes (``%2e``, ``%2f``, ``%5c``), NUL,
absolute forms. What is left is resolved with symlinks followed and must still lie inside
the directory, so a symlink pointing out is not served either. Hidden files (``.git``...)
are never served.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote


__all__ = ["CONTENT_TYPES", "StaticFile", "StaticFiles", "default_web_dir"]

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".htm": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".ico": "image/x-icon",
    ".wav": "audio/wav",
    ".mp3": "audio/mpeg",
    ".ogg": "audio/ogg",
    ".wasm": "application/wasm",
    ".woff2": "font/woff2",
}
MAX_FILE_BYTES = 32 * 1024 * 1024
_BAD_ENCODED = re.compile(r"%(2e|2f|5c|00)", re.IGNORECASE)


def default_web_dir() -> Path:
    """The repo's ``web/``, next to the gateway package."""
    return Path(__file__).resolve().parent.parent / "web"


@dataclass(frozen=True, slots=True)
class StaticFile:
    status: int  # 200, 400 or 404
    body: bytes
    content_type: str


class StaticFiles:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def get(self, raw_path: str) -> StaticFile:
        """The file for a raw request path (query and fragment ignored)."""
        path = raw_path.split("?", 1)[0].split("#", 1)[0]
        if not path.startswith("/") or path.startswith("//") or _BAD_ENCODED.search(path):
            return _bad()
        try:
            decoded = unquote(path, errors="strict")
        except UnicodeDecodeError:
            return _bad()
        if any(c in decoded for c in "\\%\x00") or any(ord(c) < 0x20 for c in decoded):
            return _bad()
        parts = decoded.split("/")[1:]
        if any(p in (".", "..") for p in parts):
            return _bad()
        if any(p.startswith(".") for p in parts):
            return _not_found()
        candidate = self.root.joinpath(*[p for p in parts if p])
        try:
            real = candidate.resolve(strict=True)
            if real.is_dir():
                real = (real / "index.html").resolve(strict=True)
        except (OSError, RuntimeError):  # missing, loop, permission
            return _not_found()
        if not real.is_relative_to(self.root) or not real.is_file():
            return _not_found()
        try:
            if real.stat().st_size > MAX_FILE_BYTES:
                return _not_found()
            body = real.read_bytes()
        except OSError:
            return _not_found()
        content_type = CONTENT_TYPES.get(real.suffix.lower(), "application/octet-stream")
        return StaticFile(200, body, content_type)


def _bad() -> StaticFile:
    return StaticFile(400, b"bad path\n", "text/plain; charset=utf-8")


def _not_found() -> StaticFile:
    return StaticFile(404, b"not found\n", "text/plain; charset=utf-8")
