"""The sidecar process: one event loop runs grpc.aio and the aiohttp listener.

HTTP listener: ``/metrics`` (Prometheus), ``/healthz`` (JSON), and the
control API as gRPC-Web under ``/captions.v1.Captions/<Method>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar.api.grpcweb import GrpcWebGateway
from sidecar.api.metrics import MetricsInterceptor
from sidecar.api.servicer import CaptionsService
from sidecar.config import SidecarConfig
from sidecar.counters import flush_all
from sidecar.engine import Engine
from sidecar.ingest.mediajson import MediaJsonEndpoint
from sidecar.ingest.rtp import RtpIngest
from sidecar.ingest.skynet import SkynetEndpoint
from sidecar.metrics import track_rooms
from sidecar.proto.captions.v1 import captions_pb2, captions_pb2_grpc
from sidecar.room_events import (
    RoomEnded,
    RoomEvent,
    SessionStarted,
    SessionStopped,
    TranscriptReady,
)
from sidecar.rooms import Carrier, Room
from sidecar.xmpp.tls import TlsPolicy, normalise_fingerprint
from sidecar.xmpp.transcriber import TranscriberOccupant, TranscriberOptions

log = logging.getLogger(__name__)

SERVICE_NAME = "captions.v1.Captions"
# an HTTP client must send its request headers within this long of
# connecting (or of its previous response), and a gRPC-Web body within
# BODY_TIMEOUT_S of its headers: half-sent requests hold nothing for longer
HEADER_TIMEOUT_S = 15.0
BODY_TIMEOUT_S = 15.0
NO_AUDIO_NOTICE = (
    "Captions are on, but no audio reaches the transcriber, so no captions can appear. "
    "The administrator should check the videobridge export (jicofo.transcription."
    "url-template and the room metadata component)."
)


def _split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


@dataclass
class Ports:
    grpc: int = 0
    http: int = 0
    rtp: int = 0


class Sidecar:
    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        token = config.server.require_token()
        # the composition root: store, outputs, recognisers, scheduler, rooms
        self.engine = Engine.from_config(config, token=token)
        self.events = self.engine.events
        assert self.engine.outputs is not None
        self.outputs = self.engine.outputs
        self.store = self.engine.store
        self.scheduler = self.engine.scheduler
        self.whisper = self.engine.whisper
        self.providers = self.engine.providers
        self.vad = self.engine.vad
        self.rooms = self.engine.rooms
        lim = config.limits
        track_rooms(self.rooms)
        self.service = CaptionsService(self.rooms, self.store, token)
        ing = config.ingest
        self.mediajson = MediaJsonEndpoint(
            self.rooms,
            token=ing.token or token,
            max_message_bytes=ing.max_message_bytes,
            max_messages_per_second=ing.max_messages_per_second,
            auto_start=ing.auto_start,
        )
        self.skynet = SkynetEndpoint(
            self.rooms,
            token=ing.token or token,
            max_message_bytes=ing.max_message_bytes,
            max_messages_per_second=ing.max_messages_per_second,
            auto_start=ing.auto_start,
            jwt_keys_dir=ing.jigasi_public_keys_dir,
            jwt_audience=ing.jigasi_audience,
        )
        self.rtp: RtpIngest | None = None
        if ing.rtp_listen:
            # room for the RTP header and extensions on top of the payload limit
            self.rtp = RtpIngest(self.rooms, max_packet_bytes=min(65535, lim.max_frame_bytes + 128))
        self.occupant: TranscriberOccupant | None = None
        x = config.xmpp
        if x.enabled:
            self.occupant = TranscriberOccupant(
                TranscriberOptions(
                    jid=x.jid,
                    password=x.require_password(),
                    host=x.host,
                    port=x.port,
                    nick=x.nick,
                    starttls=x.starttls,
                    send_text=x.send_text,
                    advertise_url=x.advertise_url,
                    tls=TlsPolicy(
                        ca_file=str(x.ca_file) if x.ca_file is not None else "",
                        pinned_sha256=normalise_fingerprint(x.pinned_cert_sha256 or "") or "",
                        server_name=x.tls_server_name or "",
                    ),
                )
            )
            self.rooms.on_change.append(self._room_changed)
            self.events.add_listener("muc", self._room_event)
            self.occupant.on_refused.append(self._join_refused)
            self.occupant.on_joined.append(self._joined)
        self.health = health.aio.HealthServicer()
        self.grpc_server: grpc.aio.Server | None = None
        self.runner: web.AppRunner | None = None
        self.ports = Ports()
        self.started = time.time()
        self.ready = False

    def _room_changed(self, room: Room, what: str) -> None:
        """The no-audio notice goes to the room (or the moderator who asked); a
        repeated start call hands the occupant the room's password."""
        occ = self.occupant
        if occ is None or "@" not in room.name:
            return
        if what == "no_audio":
            # the moderator who asked (a private message), else the whole room
            occ.notify(room.name, NO_AUDIO_NOTICE, to=room.requested_by)
        elif what == "audio":
            occ.withdraw(room.name, NO_AUDIO_NOTICE)  # not sent yet: no longer true
        elif what == "start" and room.active and occ.rooms.get(room.name) is not None:
            # a start call again (already on, so no event): it may bring the room's
            # password (the dial's JvbRoomPassword) that a refused join needs
            occ.join(room.name, room.transcript_id, password=room.room_password)

    def _room_event(self, event: RoomEvent) -> None:
        """The transcriber occupant, a subscriber of the room events: it is in
        every room with captions or a transcript on, and posts the transcript's
        link when transcription starts and when the transcript is ready."""
        occ = self.occupant
        if occ is None or "@" not in event.room:
            return  # not a MUC room (a Jigasi connection id): nothing to join
        room = self.rooms.rooms.get(event.room)
        if isinstance(event, SessionStarted) and room is not None and room.active:
            occ.join(room.name, room.transcript_id, password=room.room_password)
            if "muc" not in room.carriers:
                name = room.name
                room.carriers["muc"] = Carrier(
                    "muc", ready=lambda: occ.joined(name), send=occ.send_caption
                )
            link = self.outputs.link(event.transcript_id)
            if event.kind == "transcription" and link and self.config.links.post_in_chat:
                occ.notify(room.name, f"This meeting is being transcribed. The transcript: {link}")
        elif isinstance(event, TranscriptReady):
            link = event.url or self.outputs.link(event.meta.id)
            if link and self.config.links.post_in_chat:
                occ.notify(event.room, f"The transcript of this meeting is ready: {link}")
        elif isinstance(event, RoomEnded) or (
            isinstance(event, SessionStopped) and (room is None or not room.active)
        ):
            occ.leave(event.room)
            if room is not None:
                room.carriers.pop("muc", None)
                room.warnings.pop("join", None)

    def _join_refused(self, name: str, reason: str) -> None:
        room = self.rooms.rooms.get(name)
        if room is not None:
            room.warnings["join"] = (
                f"the transcriber occupant is not in the room, captions go through the "
                f"videobridge if it is connected: {reason}"
            )

    def _joined(self, name: str) -> None:
        room = self.rooms.rooms.get(name)
        if room is not None:
            room.warnings.pop("join", None)

    def http_app(self) -> web.Application:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        service = captions_pb2.DESCRIPTOR.services_by_name["Captions"]
        GrpcWebGateway(
            self.service,
            service,
            allow_origin=self.config.server.allow_origin,
            authorize=self.service.authorized_headers,
            body_timeout_s=BODY_TIMEOUT_S,
        ).add_routes(app)
        self.mediajson.add_routes(app, self.config.ingest.mediajson_path)
        self.skynet.add_routes(app, self.config.ingest.skynet_path)
        self.outputs.routes.add_routes(app)
        return app

    async def _metrics(self, request: web.Request) -> web.Response:
        flush_all()
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        finals, interims = self.scheduler.backlog
        body = {
            "status": "ok" if self.ready else "starting",
            "uptime_s": round(time.time() - self.started, 1),
            "rooms": len(self.rooms.rooms),
            "active_rooms": sum(1 for r in self.rooms.rooms.values() if r.active),
            "queued_finals": finals,
            "queued_interims": interims,
        }
        return web.json_response(body, status=200 if self.ready else 503)

    async def start(self, *, preload: bool = True) -> None:
        recovered = await asyncio.to_thread(self.store.recover)
        for meta in recovered:
            log.warning(
                "recovered transcript %s left open by a crash (%d entries)", meta.id, meta.entries
            )
        # after recovery, so that the archiver's first round uploads what it finished
        await self.outputs.start()
        self.scheduler.start()
        self.rooms.start_background()
        if self.occupant is not None:
            await self.occupant.start(wait_s=10)
        # the first caption must not wait for the model to load, nor for a
        # cloud recogniser's client (credentials are checked here too)
        await self.providers.start(preload_whisper=preload)

        server = grpc.aio.server(
            interceptors=[MetricsInterceptor()],
            options=[
                ("grpc.max_receive_message_length", 4 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
            ],
        )
        captions_pb2_grpc.add_CaptionsServicer_to_server(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        host, port = _split(self.config.server.grpc_listen)
        self.ports.grpc = server.add_insecure_port(f"{host}:{port}")
        await server.start()
        self.grpc_server = server

        # aiohttp's keep-alive timer runs from the connection's start until a
        # request's headers are in: it is the header read timeout (aiohttp
        # has no other), and it closes idle keep-alive connections too
        self.runner = web.AppRunner(
            self.http_app(),
            access_log=None,
            keepalive_timeout=HEADER_TIMEOUT_S,
            lingering_time=2.0,  # reading what a refused request still sends
        )
        await self.runner.setup()
        host, port = _split(self.config.server.http_listen)
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        server_obj = getattr(site, "_server", None)
        sockets = getattr(server_obj, "sockets", None) or []
        self.ports.http = sockets[0].getsockname()[1] if sockets else port
        shown = host if host not in ("0.0.0.0", "::", "") else "SIDECAR-HOST"
        self.rooms.mediajson_url = (
            f"ws://{shown}:{self.ports.http}{self.config.ingest.mediajson_path}/{{{{MEETING_ID}}}}"
        )

        if self.rtp is not None:
            self.ports.rtp = await self.rtp.start(*_split(self.config.ingest.rtp_listen))

        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        self.ready = True
        log.info(
            "serving gRPC on %s:%d, HTTP on %s:%d",
            *_split(self.config.server.grpc_listen)[:1],
            self.ports.grpc,
            _split(self.config.server.http_listen)[0],
            self.ports.http,
        )

    async def stop(self, grace: float = 5.0) -> None:
        """Finish every room (finals, transcripts) while its outputs are still
        up, refusing new sessions meanwhile; then close the listeners."""
        self.ready = False
        self.mediajson.closing = True
        self.skynet.closing = True
        await self.health.enter_graceful_shutdown()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.rooms.close(), 60)
        await self.mediajson.close()
        await self.skynet.close()
        if self.rtp is not None:
            self.rtp.close()
        if self.occupant is not None:
            await self.occupant.close()
        # the rooms' last events are out: deliver what can be, keep the rest on disk
        await self.outputs.close()
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace)
        if self.runner is not None:
            await self.runner.cleanup()
        await self.providers.aclose()
        await self.scheduler.close()


async def serve(config: SidecarConfig) -> None:
    sidecar = Sidecar(config)
    await sidecar.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"captions sidecar ready: grpc={sidecar.ports.grpc} http={sidecar.ports.http}",
        flush=True,
    )
    await stop.wait()
    log.info("shutting down")
    await sidecar.stop()
