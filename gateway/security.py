"""Who may open a WebSocket: the Origin allowlist and the optional bearer token.

Why an Origin check on a loopback server: any web page the user visits can open a WebSocket
to ``ws://127.0.0.1:8086`` (browsers do not apply the same-origin policy to WebSockets), so
without it every site could drive the avatar and read its frames. Browsers always send
Origin; other clients (the CLI, tests, the original proxy's non-browser users) send none and
are let through, since Origin protects browsers, not servers. The token is what protects
the server: when one is configured, every connection must present it.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from websockets.datastructures import Headers


__all__ = ["Guard", "Refusal", "parse_origin"]

_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_DEFAULT_PORTS = {"http": 80, "https": 443}

Origin = tuple[str, str, int]  # scheme, host (lowercase, no brackets), port


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a handshake is refused: HTTP status, a metrics reason and a short body."""

    status: int
    reason: str
    message: str


def parse_origin(value: str) -> Origin | None:
    """``(scheme, host, port)`` of an ``http(s)://host[:port]`` origin, else None."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        return None
    return scheme, parts.hostname.lower(), port if port is not None else _DEFAULT_PORTS[scheme]


class Guard:
    """Checks a handshake's Origin and token.

    ``allowed_origins``: comma list of origins (``https://app.example.com:8443``), ``null``
    for pages opened from files or sandboxed frames, or ``*`` for any. Empty means the
    default: the gateway's own origin (the Origin names the host the request was sent to,
    or ``host:port`` the gateway is bound to) and http(s) on localhost, 127.0.0.1 and [::1]
    at any port.
    """

    def __init__(self, *, host: str, port: int, allowed_origins: str = "", token: str = "") -> None:
        self.host = host.strip("[]").lower()
        self.port = port
        self.token = token
        entries = [o.strip() for o in allowed_origins.split(",") if o.strip()]
        self.any_origin = "*" in entries
        self.allow_null = "null" in entries
        self.explicit: set[Origin] = set()
        for entry in entries:
            if entry in ("*", "null"):
                continue
            origin = parse_origin(entry)
            if origin is None:
                raise ValueError(f"allowed origin {entry!r} is not http(s)://host[:port]")
            self.explicit.add(origin)
        self.defaults = not entries

    def check(self, path: str, headers: Headers) -> Refusal | None:
        """None when the handshake may proceed."""
        refusal = self._check_origin(headers)
        if refusal is None:
            refusal = self._check_token(path, headers)
        return refusal

    def _check_origin(self, headers: Headers) -> Refusal | None:
        values = headers.get_all("Origin")
        if not values:
            return None
        if len(values) > 1:
            return Refusal(400, "origin", "more than one origin header\n")
        if self.any_origin:
            return None
        value = values[0].strip()
        if value == "null":
            return None if self.allow_null else Refusal(403, "origin", "origin not allowed\n")
        origin = parse_origin(value)
        if origin is None:
            return Refusal(403, "origin", "origin not allowed\n")
        if origin in self.explicit or (self.defaults and self._default_allows(origin, headers)):
            return None
        return Refusal(403, "origin", "origin not allowed\n")

    def _default_allows(self, origin: Origin, headers: Headers) -> bool:
        scheme, host, port = origin
        if host in _LOCAL_HOSTS or (host == self.host and port == self.port):
            return True
        hosts = headers.get_all("Host")  # same origin: the page came from where we are
        own = parse_origin(f"{scheme}://{hosts[0].strip()}") if len(hosts) == 1 else None
        return own is not None and own[1:] == (host, port)

    def _check_token(self, path: str, headers: Headers) -> Refusal | None:
        if not self.token:
            return None
        presented = []
        for value in headers.get_all("Authorization"):
            scheme, _, credentials = value.strip().partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                presented.append(credentials.strip())
        query = path.partition("?")[2]
        presented += [v for k, v in parse_qsl(query, keep_blank_values=True) if k == "token"]
        if not presented:
            return Refusal(401, "token", "token required\n")
        expected = self.token.encode()
        if any(hmac.compare_digest(p.encode(), expected) for p in presented):
            return None
        return Refusal(403, "token", "invalid token\n")
