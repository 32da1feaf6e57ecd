"""Webhooks: room events POSTed to the operator's endpoints, signed, retried, durable.

Each ``[[webhooks]]`` endpoint gets the event types it asks for as JSON::

    POST <url>
    Content-Type: application/json
    Captions-Event-Id: 6f1c...          (the idempotency key: same on every retry)
    Captions-Event-Type: transcription.ready
    Captions-Delivery-Attempt: 1
    Captions-Signature: t=1764600000,v1=<hex HMAC-SHA256(secret, "<t>." + body)>

    {"version": 1, "id": "6f1c...", "type": "transcription.ready",
     "created_at": "2026-12-01T20:00:00.000Z", "room": "weekly@conference.example.org",
     "data": {...}}

The body is fixed when the event is accepted (retries send the very same
bytes); the timestamp is the time of the attempt, so a receiver can refuse
replays older than a few minutes. :func:`verify_signature` is the reference
check; ``docs/webhooks.md`` shows a standalone receiver.

Delivery: one worker per endpoint sends its messages in order. A 2xx answer
is success; anything else (or no answer within ``timeout_s``) is retried
with exponential back-off and full jitter (``backoff_initial_s`` doubling up
to ``backoff_max_s``), until the message is ``max_age_s`` old, when it is
dropped with an error line. Every accepted event is in the durable
:class:`~sidecar.outputs.outbox.Outbox` before anything is sent, and is
marked done only after its 2xx: a restart or a crash loses nothing and at
worst repeats a message (at-least-once; deduplicate on ``Captions-Event-Id``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from prometheus_client import Counter, Gauge, Histogram

from sidecar.config import WebhookEndpoint
from sidecar.outputs.outbox import Outbox, OutboxRecord
from sidecar.room_events import EventBus, RoomEvent, SubscriberLagged, Subscription

__all__ = [
    "SCHEMA_VERSION",
    "SIGNATURE_HEADER",
    "WebhookSender",
    "event_body",
    "sign",
    "verify_signature",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SIGNATURE_HEADER = "Captions-Signature"
USER_AGENT = "jitsi-captions-sidecar-webhooks/1"
FAILING_AFTER = 5  # consecutive failed attempts before the endpoint is called failing

DELIVERIES = Counter(
    "captions_webhook_deliveries_total",
    "Webhook messages by outcome (delivered, dropped after max_age_s)",
    ["endpoint", "result"],
)
ATTEMPTS = Counter(
    "captions_webhook_attempts_total",
    "Webhook POST attempts by result (ok, http_error, network_error, timeout)",
    ["endpoint", "result"],
)
ATTEMPT_SECONDS = Histogram(
    "captions_webhook_attempt_seconds",
    "Duration of one webhook POST",
    ["endpoint"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
PENDING = Gauge("captions_webhook_pending", "Webhook messages waiting in the outbox", ["endpoint"])
FAILING = Gauge(
    "captions_webhook_failing",
    f"1 while an endpoint has failed {FAILING_AFTER} or more attempts in a row",
    ["endpoint"],
)


def _iso(ms: int) -> str:
    dt = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def event_body(event: RoomEvent) -> str:
    """The JSON body of ``event`` (schema version :data:`SCHEMA_VERSION`)."""
    return json.dumps(
        {
            "version": SCHEMA_VERSION,
            "id": event.id,
            "type": event.type,
            "created_at": _iso(event.at_ms),
            "room": event.room,
            "data": event.data(),
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )


def sign(secret: str | bytes, timestamp: int, body: bytes) -> str:
    """The ``Captions-Signature`` header value for ``body`` sent at ``timestamp``."""
    key = secret.encode() if isinstance(secret, str) else secret
    mac = hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(
    secret: str | bytes,
    header: str,
    body: bytes,
    *,
    tolerance_s: float = 300.0,
    now: float | None = None,
) -> bool:
    """Whether ``header`` is a valid signature of ``body`` made less than ``tolerance_s`` ago.

    Compares in constant time; accepts several ``v1=`` values (none today,
    but a key rollover on the sender would add one).
    """
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        k, sep, v = item.strip().partition("=")
        if sep:
            parts.setdefault(k, []).append(v)
    try:
        ts = int(parts["t"][0])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    expected = sign(secret, ts, body).split("v1=", 1)[1]
    ok = False
    for candidate in parts.get("v1", []):
        ok |= hmac.compare_digest(candidate.encode(), expected.encode())
    return ok


class _EndpointState:
    def __init__(self, ep: WebhookEndpoint) -> None:
        self.ep = ep
        self.queue: deque[OutboxRecord] = deque()
        self.wakeup = asyncio.Event()
        self.consecutive_failures = 0
        self.last_error = ""
        self.task: asyncio.Task[None] | None = None


class WebhookSender:
    """Subscribes to the room events and delivers them to every configured endpoint."""

    def __init__(
        self,
        endpoints: Iterable[WebhookEndpoint],
        outbox_dir: Path,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.endpoints = {ep.name: _EndpointState(ep) for ep in endpoints}
        self.outbox = Outbox(outbox_dir)
        self.clock = clock
        self.rng = rng or random.Random()
        self._sub: Subscription | None = None
        self._intake: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closing = False
        self._accepted = 0
        self._busy = False
        self._close_ev = asyncio.Event()
        self._progress = asyncio.Event()  # set after every batch stored and message finished
        orphans = {r.endpoint for r in self.outbox.pending()} - set(self.endpoints)
        for name in sorted(orphans):
            n = len(self.outbox.pending(name))
            log.warning(
                "webhooks: %d messages in the outbox for endpoint %r, which is no longer "
                "configured; kept until it is configured again",
                n,
                name,
            )

    @property
    def wanted(self) -> frozenset[str]:
        out: set[str] = set()
        for st in self.endpoints.values():
            out |= st.ep.events
        return frozenset(out)

    def attach(self, bus: EventBus) -> None:
        """Subscribe to ``bus`` (call before events you want delivered are published)."""
        wanted = self.wanted
        self._sub = bus.subscribe(
            "webhooks",
            maxsize=100_000,
            accept=lambda e: e.type in wanted,
            include_interims="caption.interim" in wanted,
        )

    async def start(self) -> None:
        """Load what the outbox still holds and start delivering."""
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": USER_AGENT}, connector=aiohttp.TCPConnector(limit=64)
        )
        for rec in self.outbox.pending():
            st = self.endpoints.get(rec.endpoint)
            if st is not None:
                st.queue.append(rec)
        for name, st in self.endpoints.items():
            PENDING.labels(name).set(len(st.queue))
            FAILING.labels(name).set(0)
            st.task = asyncio.create_task(self._worker(st), name=f"webhook-{name}")
        if self._sub is not None:
            self._intake = asyncio.create_task(self._intake_loop(self._sub), name="webhook-intake")

    # -- intake: events into the outbox -------------------------------------------------
    async def _intake_loop(self, sub: Subscription) -> None:
        while True:
            try:
                first = await sub.get()
            except StopAsyncIteration:
                return
            except SubscriberLagged:
                log.error("webhooks: fell behind the room events; some were not sent")
                return
            self._busy = True
            batch = [first]
            while len(batch) < 500 and (more := sub.get_nowait()) is not None:
                batch.append(more)
            try:
                await self.accept(batch)
            except Exception:
                log.exception("webhooks: could not store %d events in the outbox", len(batch))
            finally:
                self._busy = False
                self._progress.set()

    async def accept(self, events: Iterable[RoomEvent]) -> int:
        """Store ``events`` durably for every endpoint that wants them; returns messages queued."""
        now = self.clock()
        records: list[OutboxRecord] = []
        for event in events:
            body: str | None = None
            for name, st in self.endpoints.items():
                if not st.ep.wants(event.type):
                    continue
                body = body or event_body(event)
                records.append(
                    OutboxRecord(
                        key=f"{name}/{event.id}",
                        endpoint=name,
                        event_id=event.id,
                        type=event.type,
                        created=now,
                        body=body,
                    )
                )
        if records:
            await asyncio.to_thread(self.outbox.put, records)
            for rec in records:
                st = self.endpoints[rec.endpoint]
                st.queue.append(rec)
                st.wakeup.set()
                PENDING.labels(rec.endpoint).set(len(st.queue))
        self._accepted += len(records)
        return len(records)

    async def flushed(self) -> None:
        """Wait until every event published so far is in the outbox (for tests and shutdown)."""
        while self._sub is not None and not self._sub.closed and (len(self._sub) or self._busy):
            self._progress.clear()
            await self._progress.wait()

    async def drained(self) -> None:
        """Wait until every queued message is delivered (or dropped)."""
        await self.flushed()
        while any(st.queue for st in self.endpoints.values()):
            self._progress.clear()
            await self._progress.wait()

    def pending(self, endpoint: str | None = None) -> int:
        return len(self.outbox.pending(endpoint))

    # -- delivery -----------------------------------------------------------------------
    async def _worker(self, st: _EndpointState) -> None:
        while not self._closing:
            try:
                await self._deliver(st)
            except asyncio.CancelledError:
                raise
            except Exception:
                # the outbox could not be written (disk full...): what is queued stays
                # queued, in memory and on disk, and is tried again
                log.exception("webhook endpoint %r: delivery failed; retrying", st.ep.name)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._close_ev.wait(), st.ep.backoff_max_s)

    async def _deliver(self, st: _EndpointState) -> None:
        name = st.ep.name
        while not self._closing:
            if not st.queue:
                st.wakeup.clear()
                await st.wakeup.wait()
                continue
            rec = st.queue[0]
            if self.clock() - rec.created > st.ep.max_age_s:
                log.error(
                    "webhook endpoint %r: dropping %s event %s after %.0f s of failed "
                    "attempts (max_age_s); last error: %s",
                    name,
                    rec.type,
                    rec.event_id,
                    self.clock() - rec.created,
                    st.last_error or "none",
                )
                await asyncio.to_thread(self.outbox.done, [rec.key], "dropped")
                st.queue.popleft()
                DELIVERIES.labels(name, "dropped").inc()
                PENDING.labels(name).set(len(st.queue))
                self._progress.set()
                continue
            ok = await self._attempt(st, rec)
            if ok:
                await asyncio.to_thread(self.outbox.done, [rec.key])
                st.queue.popleft()
                DELIVERIES.labels(name, "delivered").inc()
                PENDING.labels(name).set(len(st.queue))
                self._progress.set()
                if st.consecutive_failures >= FAILING_AFTER:
                    log.warning(
                        "webhook endpoint %r is delivering again after %d failed attempts",
                        name,
                        st.consecutive_failures,
                    )
                st.consecutive_failures = 0
                FAILING.labels(name).set(0)
                continue
            st.consecutive_failures += 1
            n = st.consecutive_failures
            delay = min(st.ep.backoff_max_s, st.ep.backoff_initial_s * 2 ** min(n - 1, 30))
            delay = self.rng.uniform(delay / 2, delay)  # jitter: endpoints do not retry in step
            if n == FAILING_AFTER or (n > FAILING_AFTER and n % 20 == 0):
                FAILING.labels(name).set(1)
                log.warning(
                    "webhook endpoint %r keeps failing: %d attempts in a row, last: %s; "
                    "%d messages waiting; next try in %.1f s",
                    name,
                    n,
                    st.last_error,
                    len(st.queue),
                    delay,
                )
            with contextlib.suppress(TimeoutError):
                # a close wakes the worker early
                await asyncio.wait_for(self._close_ev.wait(), delay)

    async def _attempt(self, st: _EndpointState, rec: OutboxRecord) -> bool:
        assert self._session is not None
        rec.attempts += 1
        body = rec.body.encode()
        ts = int(self.clock())
        headers = {
            "Content-Type": "application/json",
            "Captions-Event-Id": rec.event_id,
            "Captions-Event-Type": rec.type,
            "Captions-Delivery-Attempt": str(rec.attempts),
            SIGNATURE_HEADER: sign(st.ep.secret, ts, body),
        }
        t0 = time.monotonic()
        name = st.ep.name
        try:
            async with self._session.post(
                st.ep.url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=st.ep.timeout_s),
                allow_redirects=False,
            ) as resp:
                await resp.read()
                status = resp.status
        except TimeoutError:
            ATTEMPTS.labels(name, "timeout").inc()
            st.last_error = f"no answer within {st.ep.timeout_s:g} s"
            return False
        except aiohttp.ClientError as e:
            ATTEMPTS.labels(name, "network_error").inc()
            st.last_error = f"{type(e).__name__}: {e}"
            return False
        finally:
            ATTEMPT_SECONDS.labels(name).observe(time.monotonic() - t0)
        if 200 <= status < 300:
            ATTEMPTS.labels(name, "ok").inc()
            return True
        ATTEMPTS.labels(name, "http_error").inc()
        st.last_error = f"HTTP {status}"
        return False

    async def close(self, drain_s: float = 0.0) -> None:
        """Stop; with ``drain_s``, first wait that long for the queues to empty.

        What is not delivered stays in the outbox for the next start.
        """
        if self._intake is not None and self._sub is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await self.flushed()
        if drain_s > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_s):
                    await self.drained()
        self._closing = True
        self._close_ev.set()
        if self._sub is not None:
            self._sub.close()
        tasks = [t for t in [self._intake, *(s.task for s in self.endpoints.values())] if t]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._session is not None:
            await self._session.close()
        self.outbox.close()
