"""The client's exceptions: one hierarchy, so that ``except LipsyncError`` catches them all.

``ServerError`` carries the wire code (``shared.errors.ErrorCode``) that the gateway puts in
front of every error text (``"frame_out_of_range: frame 523 out of range"``); programs
branch on ``err.code``, people read ``err.message``.
"""

from __future__ import annotations

from typing import Any

from shared.errors import ErrorCode


__all__ = ["ConnectionLost", "LipsyncError", "ServerError", "Timeout", "parse_error"]


class LipsyncError(Exception):
    """Base of every error this client raises."""


class ConnectionLost(LipsyncError):
    """The WebSocket closed (or could not be opened); requests waiting on it fail with this.
    The client does not reconnect by itself: open a new one."""


class Timeout(LipsyncError, TimeoutError):
    """No answer within the request's timeout. The gateway still answers it later; that
    answer is then discarded."""


class ServerError(LipsyncError):
    """The gateway (or a broker or worker behind it) answered with an error.

    ``code`` is an ``ErrorCode`` (``internal`` for a code this client does not know; the
    text is kept in ``message``). ``details`` holds the typed result where the answer had
    one beside the error (an admin operation that failed on some workers: ``AdminResult``).
    """

    def __init__(self, code: ErrorCode, message: str, details: Any = None) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.details = details

    def __repr__(self) -> str:
        return f"ServerError({self.code.value!r}, {self.message!r})"


def parse_error(text: str, details: Any = None) -> ServerError:
    """``"code: message"`` → ``ServerError``. Texts without a known code (the original
    protocol's ``Unknown message type: x``) become ``bad_request`` or ``internal`` with the
    whole text as message."""
    code, sep, message = text.partition(": ")
    if sep and code in ErrorCode._value2member_map_:
        return ServerError(ErrorCode(code), message, details)
    if text.startswith("Unknown message type"):
        return ServerError(ErrorCode.BAD_REQUEST, text, details)
    return ServerError(ErrorCode.INTERNAL, text, details)
