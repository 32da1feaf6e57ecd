"""Transcripts over HTTP: the participant's page behind a signed link, downloads, the operator API.

Routes (added to the sidecar's aiohttp app by :meth:`TranscriptRoutes.add_routes`)::

    GET    /t/{id}?exp=&sig=                  the transcript page (HTML)
    GET    /t/{id}/data.json?exp=&sig=        meta, entries, download links
    GET    /t/{id}/events?exp=&sig=           live updates (Server-Sent Events)
    GET    /t/{id}/download/{fmt}?exp=&sig=   a file: txt, srt, vtt, md, jsonl
    GET    /t/static/{file}                   the page's own CSS and JS (no external assets)
    GET    /api/v1/transcripts?room=&limit=   list (operator token)
    GET    /api/v1/transcripts/{id}           meta and a fresh signed link (operator token)
    GET    /api/v1/transcripts/{id}/{fmt}     a file (operator token)
    DELETE /api/v1/transcripts/{id}           delete everywhere (operator token)

Signed-link routes also accept ``Authorization: Bearer <operator token>``.
A refused link gets a page that says why: 403 not valid, 410 expired, 404
no such transcript. Pages are sent with ``Referrer-Policy: no-referrer``
(the link is the credential) and a CSP that allows only this origin.

Live updates come from the same room events as the gRPC subscription: the
stream first replays what the store holds (so nothing between loading the
page and connecting is missed; the page drops repeats by message id), then
sends ``caption`` events as they are published, and ``ended`` when the
transcript is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import json
import logging
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import Counter

from sidecar.outputs.links import LinkCheck, LinkSigner
from sidecar.room_events import (
    CaptionPublished,
    EventBus,
    RoomEnded,
    RoomEvent,
    SessionStopped,
    Subscription,
    TranscriptReady,
)
from sidecar.store.base import (
    FORMATS,
    InvalidTranscriptId,
    StoreError,
    TranscriptMeta,
    TranscriptNotFound,
    TranscriptStore,
)
from sidecar.store.render import entry_from_dict, entry_to_dict, format_iso

__all__ = ["TranscriptRoutes"]

log = logging.getLogger(__name__)

REQUESTS = Counter(
    "captions_transcript_http_requests_total",
    "Transcript page and download requests by route and result",
    ["route", "result"],
)

CONTENT_TYPES = {
    "jsonl": "application/x-ndjson; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
    "txt": "text/plain; charset=utf-8",
    "md": "text/markdown; charset=utf-8",
}
FORMAT_NAMES = {
    "txt": "Plain text",
    "srt": "SubRip subtitles",
    "vtt": "WebVTT subtitles",
    "md": "Markdown",
    "jsonl": "JSON Lines",
}
_STATIC = {"transcript.js": "text/javascript", "transcript.css": "text/css"}
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
HEARTBEAT_S = 15.0


def _asset(name: str) -> bytes:
    return resources.files("sidecar.outputs").joinpath("web", name).read_bytes()


def _refusal(status: int, title: str, text: str) -> web.Response:
    body = _asset("refused.html").decode()
    body = body.replace("{{title}}", html.escape(title)).replace("{{text}}", html.escape(text))
    return web.Response(
        status=status, text=body, content_type="text/html", headers=_SECURITY_HEADERS
    )


class TranscriptRoutes:
    """The HTTP face of the store; ``signer`` None switches signed links off."""

    def __init__(
        self,
        store: TranscriptStore,
        *,
        token: str,
        signer: LinkSigner | None = None,
        bus: EventBus | None = None,
    ) -> None:
        self.store = store
        self.token = token
        self.signer = signer
        self.bus = bus
        self._subs: set[Subscription] = set()
        self._closing = False

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/t/static/{name}", self._static)
        r.add_get("/t/{id}", self._page)
        r.add_get("/t/{id}/data.json", self._data)
        r.add_get("/t/{id}/events", self._events)
        r.add_get("/t/{id}/download/{fmt}", self._download)
        r.add_get("/api/v1/transcripts", self._api_list)
        r.add_get("/api/v1/transcripts/{id}", self._api_info)
        r.add_get("/api/v1/transcripts/{id}/{fmt}", self._api_download)
        r.add_delete("/api/v1/transcripts/{id}", self._api_delete)

    async def close(self) -> None:
        """End live streams (at shutdown)."""
        self._closing = True
        for sub in list(self._subs):
            sub.close()

    # -- access -------------------------------------------------------------------------
    def _operator(self, request: web.Request) -> bool:
        auth = request.headers.get("Authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() != "bearer" or not value:
            return False
        return hmac.compare_digest(value.strip().encode(), self.token.encode())

    def _link(self, request: web.Request, tid: str) -> LinkCheck:
        if self._operator(request):
            return LinkCheck.OK
        if self.signer is None:
            return LinkCheck.INVALID
        q = request.query
        return self.signer.check(tid, q.get("exp"), q.get("sig"))

    def _require_operator(self, request: web.Request) -> None:
        if not self._operator(request):
            raise web.HTTPUnauthorized(
                text=json.dumps({"error": "the operator token is required"}),
                content_type="application/json",
                headers={"WWW-Authenticate": 'Bearer realm="captions"'},
            )

    async def _meta(self, tid: str) -> TranscriptMeta:
        return await asyncio.to_thread(self.store.info, tid)

    def _refuse_link(self, route: str, check: LinkCheck) -> web.Response:
        REQUESTS.labels(route, check.value).inc()
        if check is LinkCheck.EXPIRED:
            return _refusal(
                410,
                "This link has expired",
                "The link to this transcript is no longer valid. Ask the meeting's "
                "organiser or the site's operator for a new one.",
            )
        return _refusal(
            403,
            "This link is not valid",
            "The link to this transcript is damaged or was revoked. Check that it was "
            "copied whole, or ask for a new one.",
        )

    async def _open(self, request: web.Request, route: str) -> TranscriptMeta | web.Response:
        tid = request.match_info["id"]
        check = self._link(request, tid)
        if check is not LinkCheck.OK:
            return self._refuse_link(route, check)
        try:
            return await self._meta(tid)
        except (TranscriptNotFound, InvalidTranscriptId):
            REQUESTS.labels(route, "not_found").inc()
            return _refusal(
                404,
                "No such transcript",
                "This transcript does not exist any more: it may have been deleted "
                "or removed after its retention period.",
            )

    # -- participant routes -------------------------------------------------------------
    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _STATIC:
            raise web.HTTPNotFound()
        headers = dict(_SECURITY_HEADERS, **{"Cache-Control": "public, max-age=300"})
        return web.Response(body=_asset(name), content_type=_STATIC[name], headers=headers)

    async def _page(self, request: web.Request) -> web.Response:
        got = await self._open(request, "page")
        if isinstance(got, web.Response):
            return got
        REQUESTS.labels("page", "ok").inc()
        body = _asset("transcript.html").decode()
        body = body.replace("{{title}}", html.escape(_title(got)))
        return web.Response(text=body, content_type="text/html", headers=_SECURITY_HEADERS)

    async def _data(self, request: web.Request) -> web.Response:
        got = await self._open(request, "data")
        if isinstance(got, web.Response):
            return got
        entries = await self._entries(got.id)
        tid = got.id
        q = request.query_string
        REQUESTS.labels("data", "ok").inc()
        body = {
            "meta": got.to_dict(),
            "title": _title(got),
            "live": not got.ended_at,
            "entries": entries,
            "downloads": [
                {"format": f, "label": FORMAT_NAMES[f], "href": f"{tid}/download/{f}?{q}"}
                for f in ("txt", "srt", "vtt", "md", "jsonl")
            ],
            "events": f"{tid}/events?{q}",
        }
        return web.json_response(body, headers=_SECURITY_HEADERS)

    async def _entries(self, tid: str) -> list[dict[str, Any]]:
        raw = await asyncio.to_thread(self.store.get, tid, "jsonl")
        out = []
        for line in raw.splitlines():
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    out.append(entry_to_dict(entry_from_dict(obj)))
        return out

    async def _download(self, request: web.Request) -> web.Response:
        got = await self._open(request, "download")
        if isinstance(got, web.Response):
            return got
        return await self._file(got.id, request.match_info["fmt"], "download")

    async def _file(self, tid: str, fmt: str, route: str) -> web.Response:
        if fmt not in FORMATS:
            REQUESTS.labels(route, "bad_format").inc()
            raise web.HTTPNotFound(text=f"unknown format {fmt[:20]!r}: one of {', '.join(FORMATS)}")
        try:
            data = await asyncio.to_thread(self.store.get, tid, fmt)
        except TranscriptNotFound:
            REQUESTS.labels(route, "not_found").inc()
            raise web.HTTPNotFound(text=f"no transcript {tid!r}") from None
        REQUESTS.labels(route, "ok").inc()
        headers = dict(_SECURITY_HEADERS)
        headers["Content-Disposition"] = f'attachment; filename="{tid}.{fmt}"'
        return web.Response(
            body=data,
            headers=headers,
            content_type=CONTENT_TYPES[fmt].split(";")[0],
            charset="utf-8",
        )

    async def _events(self, request: web.Request) -> web.StreamResponse:
        got = await self._open(request, "events")
        if isinstance(got, web.Response):
            return got
        meta = got
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # nginx in front must not buffer the stream
                "Referrer-Policy": "no-referrer",
            }
        )
        await resp.prepare(request)
        REQUESTS.labels("events", "ok").inc()
        sub = None
        if self.bus is not None and not meta.ended_at and not self._closing:
            sub = self.bus.subscribe(
                "transcript_page",
                maxsize=512,
                accept=lambda e: _concerns(e, meta),
                include_interims=True,
            )
            self._subs.add(sub)
        try:
            # what the store holds first: the page may have loaded before these were written
            for entry in await self._entries(meta.id):
                await _send(resp, "caption", _entry_event(entry))
            if sub is None:
                await _send(resp, "ended", {"transcript_id": meta.id})
                return resp
            while True:
                try:
                    event = await asyncio.wait_for(sub.get(), HEARTBEAT_S)
                except TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                except StopAsyncIteration:
                    break
                if isinstance(event, CaptionPublished):
                    await _send(resp, "caption", _caption_event(event))
                elif isinstance(event, TranscriptReady | SessionStopped | RoomEnded):
                    await _send(resp, "ended", {"transcript_id": meta.id})
                    break
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("transcript %s: live stream failed", meta.id)
        finally:
            if sub is not None:
                self._subs.discard(sub)
                sub.close()
        return resp

    # -- operator API -------------------------------------------------------------------
    def _describe(self, meta: TranscriptMeta) -> dict[str, Any]:
        out = meta.to_dict()
        if self.signer is not None:
            out["url"] = self.signer.url(meta.id)
        return out

    async def _api_list(self, request: web.Request) -> web.Response:
        self._require_operator(request)
        room = request.query.get("room") or None
        try:
            limit = max(1, min(10_000, int(request.query.get("limit", "100"))))
        except ValueError:
            raise web.HTTPBadRequest(text="limit must be an integer") from None
        try:
            metas = await asyncio.to_thread(self.store.list, room, limit)
        except StoreError as e:
            raise web.HTTPBadGateway(text=str(e)) from None
        return web.json_response({"transcripts": [self._describe(m) for m in metas]})

    async def _api_info(self, request: web.Request) -> web.Response:
        self._require_operator(request)
        try:
            meta = await self._meta(request.match_info["id"])
        except (TranscriptNotFound, InvalidTranscriptId) as e:
            raise web.HTTPNotFound(text=str(e)) from None
        return web.json_response(self._describe(meta))

    async def _api_download(self, request: web.Request) -> web.Response:
        self._require_operator(request)
        try:
            return await self._file(request.match_info["id"], request.match_info["fmt"], "api")
        except InvalidTranscriptId as e:
            raise web.HTTPNotFound(text=str(e)) from None

    async def _api_delete(self, request: web.Request) -> web.Response:
        self._require_operator(request)
        tid = request.match_info["id"]
        try:
            gone = await asyncio.to_thread(self.store.delete, tid)
        except InvalidTranscriptId as e:
            raise web.HTTPNotFound(text=str(e)) from None
        except StoreError as e:
            raise web.HTTPBadGateway(text=str(e)) from None
        if not gone:
            raise web.HTTPNotFound(text=f"no transcript {tid!r}")
        log.info("transcript %s deleted through the HTTP API", tid)
        return web.Response(status=204)


def _title(meta: TranscriptMeta) -> str:
    local = meta.room.split("@", 1)[0] if meta.room else meta.id
    return local or meta.id


def _concerns(event: RoomEvent, meta: TranscriptMeta) -> bool:
    if isinstance(event, CaptionPublished):
        return event.transcript_id == meta.id or (
            not event.transcript_id and event.room == meta.room
        )
    if isinstance(event, TranscriptReady):
        return event.meta.id == meta.id
    if isinstance(event, SessionStopped):
        return event.kind == "transcription" and event.transcript_id == meta.id
    if isinstance(event, RoomEnded):
        return event.room == meta.room
    return False


def _entry_event(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "message_id": entry.get("message_id", ""),
        "speaker_id": entry.get("speaker_id", ""),
        "speaker_name": entry.get("speaker_name", ""),
        "text": entry.get("text", ""),
        "start_time": entry.get("start_time", ""),
        "stop_time": entry.get("stop_time", ""),
        "is_interim": False,
    }


def _caption_event(event: CaptionPublished) -> dict[str, Any]:
    c = event.caption
    return {
        "message_id": c.message_id,
        "speaker_id": c.participant_id,
        "speaker_name": c.participant_name,
        "text": c.text,
        "start_time": format_iso(datetime.fromtimestamp(c.start_time_ms / 1000, tz=UTC)),
        "stop_time": format_iso(datetime.fromtimestamp(c.end_time_ms / 1000, tz=UTC)),
        "is_interim": c.is_interim,
    }


async def _send(resp: web.StreamResponse, name: str, data: dict[str, Any]) -> None:
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    await resp.write(f"event: {name}\ndata: {payload}\n\n".encode())
