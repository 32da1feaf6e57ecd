"""Expiring signed links to one transcript: no account needed, revocable by rotating the key.

A link is ``<public_url>/t/<transcript id>?exp=<unix seconds>&sig=<mac>``
where ``mac`` is the unpadded URL-safe base64 of
``HMAC-SHA256(key, "captions-link/v1\\n<id>\\n<exp>")``. Anyone holding the
link may read that one transcript (page, live updates, downloads) until
``exp``; changing ``[links] key`` invalidates every link made before.
Verification compares in constant time and checks the signature before the
expiry, so only a genuine link is ever called "expired".
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable
from enum import Enum
from urllib.parse import quote

from sidecar.store.base import validate_transcript_id

__all__ = ["LinkCheck", "LinkSigner"]

_CONTEXT = b"captions-link/v1\n"


class LinkCheck(Enum):
    OK = "ok"
    EXPIRED = "expired"
    INVALID = "invalid"


class LinkSigner:
    """Makes and checks links for transcript ids."""

    def __init__(
        self,
        key: bytes,
        *,
        ttl_s: float = 14 * 86_400,
        public_url: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(key) < 32:
            raise ValueError("the link key must be at least 32 bytes")
        self._key = key
        self.ttl_s = ttl_s
        self.public_url = public_url.rstrip("/")
        self.clock = clock

    def _mac(self, tid: str, exp: int) -> str:
        msg = _CONTEXT + tid.encode() + b"\n" + str(exp).encode()
        digest = hmac.new(self._key, msg, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def query(self, tid: str, expires: int | None = None) -> str:
        """``exp=...&sig=...`` for ``tid`` (valid ``ttl_s`` from now unless ``expires``)."""
        validate_transcript_id(tid)
        exp = int(self.clock() + self.ttl_s) if expires is None else int(expires)
        return f"exp={exp}&sig={self._mac(tid, exp)}"

    def url(self, tid: str, expires: int | None = None) -> str:
        """The full link to the transcript page (relative when no ``public_url``)."""
        return f"{self.public_url}/t/{quote(tid)}?{self.query(tid, expires)}"

    def check(self, tid: str, exp: str | None, sig: str | None) -> LinkCheck:
        """Whether ``exp``/``sig`` (from the query string) open ``tid`` now."""
        if not exp or not sig or not exp.isdigit() or len(exp) > 12 or len(sig) > 128:
            return LinkCheck.INVALID
        try:
            validate_transcript_id(tid)
        except ValueError:
            return LinkCheck.INVALID
        expected = self._mac(tid, int(exp))
        if not hmac.compare_digest(expected.encode(), sig.encode()):
            return LinkCheck.INVALID
        if int(exp) < self.clock():
            return LinkCheck.EXPIRED
        return LinkCheck.OK
