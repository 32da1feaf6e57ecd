"""Errors of the service layer; the servicer maps them to gRPC status codes once.

Messages quote what the caller sent only through :func:`shown`, cut short:
an error must never echo a 100 000-character value back (gRPC metadata over
16 KB fails the call as RESOURCE_EXHAUSTED, and an HTTP header over 8 KB is
refused by proxies).
"""

from __future__ import annotations

SHOWN_MAX = 48  # characters of a caller's value quoted in an error
MESSAGE_MAX = 1024  # characters of any status message (grpc-message)


def clip(text: str, limit: int = MESSAGE_MAX) -> str:
    """``text`` cut to at most ``limit`` characters, saying how long it was."""
    if len(text) <= limit:
        return text
    note = f"... ({len(text)} characters)"
    return text[: max(0, limit - len(note))] + note


def shown(value: object, limit: int = SHOWN_MAX) -> str:
    """``repr(value)`` for an error message, its first ``limit`` characters only.

    ``shown("x" * 100000)`` is ``'xxx…'... (100000 characters)``.
    """
    if isinstance(value, str | bytes) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit + 8 else text[: limit + 8] + "..."


class ServiceError(Exception):
    code = "INTERNAL"


class InvalidArgument(ServiceError):
    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{clip(field, 128)}: {clip(message)}")
        self.field = field


class NotFound(ServiceError):
    code = "NOT_FOUND"


class FailedPrecondition(ServiceError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(ServiceError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(ServiceError):
    code = "UNAVAILABLE"
