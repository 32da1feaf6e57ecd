"""What the WebSocket ingest endpoints share."""

from __future__ import annotations

import time


class TokenBucket:
    """``rate`` messages a second on average, in bursts of up to ``rate``.

    ``rate`` may be raised while in use (a meeting that grows).
    """

    def __init__(self, rate: float) -> None:
        self.rate = float(rate)
        self.tokens = float(rate)
        self.last = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class CloseConnection(Exception):
    """Ends one connection with a WebSocket close code, counted under ``outcome``."""

    def __init__(self, code: int, reason: str, outcome: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.outcome = outcome
