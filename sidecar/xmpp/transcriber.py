"""The hidden transcriber occupant: how captions reach Jitsi Meet through the MUC.

The sidecar logs in as the transcriber account on the hidden domain (e.g.
``transcriber@recorder.HOST``) and joins each room whose captions are on,
as Jigasi's transcriber does (jitsi-protocol.md sections 2 and 3):

- every presence carries the jigasi and transcriber features,
  ``<transcription-status status="ON"/>`` and the nick "Transcriber";
  lib-jitsi-meet raises the transcribing state only for a hidden-domain
  member with the transcriber feature, and leaving without ``OFF`` shows
  "transcribing failed", so ``OFF`` always goes out before leaving;
- captions are ``json-message`` groupchat messages (lib-jitsi-meet needs a
  ``type`` key and drops delayed messages; recent jitsi-meet accepts them
  only from a hidden participant);
- optionally a plain-text chat line per final and a link to the transcript.

After a connection loss it reconnects with backoff and rejoins every room it
should be in. A room that refuses the join (password-protected,
members-only as Jitsi's lobby makes it, banned) is tried again with a
capped back-off, its reason said once in the log and through
``on_refused`` (the room status warning); the room password of the start
call (the dial's ``JvbRoomPassword``) goes in the join presence. Meanwhile
the room's captions take the videobridge carrier (:mod:`sidecar.rooms`).

Jingle invitations from Jicofo are declined: audio comes from the
videobridge export or another ingest, never through this session.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import ssl
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field

import slixmpp
from prometheus_client import Counter, Gauge
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from sidecar.config import ConfigError
from sidecar.events import Caption
from sidecar.jitsi import caption_json
from sidecar.xmpp.tls import TlsPolicy, explain, probe_certificate

log = logging.getLogger(__name__)

JITMEET = "http://jitsi.org/jitmeet"
MUC = "http://jabber.org/protocol/muc"
MUC_USER = "http://jabber.org/protocol/muc#user"
NICK = "http://jabber.org/protocol/nick"
JINGLE = "urn:xmpp:jingle:1"
FEATURE_JIGASI = "http://jitsi.org/protocol/jigasi"
FEATURE_TRANSCRIBER = "http://jitsi.org/protocol/transcriber"

SENT = Counter("captions_xmpp_messages_total", "Stanzas sent to rooms", ["kind"])
CONNECTED = Gauge("captions_xmpp_connected", "1 while the transcriber account is online")
JOINED = Gauge("captions_xmpp_rooms_joined", "Rooms the transcriber occupant is in")
RECONNECTS = Counter("captions_xmpp_reconnects_total", "Reconnections after a lost connection")
REFUSED = Counter(
    "captions_xmpp_join_refused_total", "Room joins refused, by condition", ["condition"]
)
_CONDITIONS = {
    "not-authorized",
    "registration-required",
    "forbidden",
    "service-unavailable",
    "conflict",
    "item-not-found",
    "not-allowed",
}
TLS_REFUSED = Counter(
    "captions_xmpp_tls_refused_total", "XMPP server certificates refused by the TLS policy"
)
JINGLE_DECLINED = Counter("captions_xmpp_jingle_declined_total", "Jingle invitations declined")


@dataclass(frozen=True, kw_only=True)
class TranscriberOptions:
    jid: str  # transcriber@recorder.example.org
    password: str
    host: str = ""  # server to connect to; "" resolves the JID's domain
    port: int = 5222
    nick: str = "Transcriber"
    starttls: bool = True  # False only for a server on loopback
    send_text: bool = False  # Jigasi's SEND_TXT: finals as plain chat lines too
    advertise_url: str = ""  # template with {room} and {transcript_id}; "" = off
    tls: TlsPolicy = TlsPolicy()  # how the server's certificate is trusted
    rejoin_base_s: float = 2.0  # first wait after a refused join, doubled each time
    rejoin_max_s: float = 300.0  # the longest wait between two tries


@dataclass
class _RoomState:
    room: str
    resource: str
    joined: bool = False
    transcript_id: str = ""
    advertised: bool = False
    attempts: int = 0
    password: str = ""
    occupants: set[str] = field(default_factory=set)  # MUC resources seen in the room
    notices: list[tuple[str, str]] = field(default_factory=list)  # (to, text) until joined
    refused: str = ""  # the condition of the last refusal, logged once
    retry: asyncio.TimerHandle | None = None


class TranscriberOccupant:
    """One XMPP session for all rooms of this sidecar."""

    def __init__(self, options: TranscriberOptions) -> None:
        self.options = options
        self.rooms: dict[str, _RoomState] = {}
        self.client = self._make_client()
        self._closing = False
        self._online = asyncio.Event()
        self._backoff = 1.0
        self._reconnect_task: asyncio.Task[None] | None = None
        self.on_joined: list[Callable[[str], None]] = []
        # (room, reason) when a join is refused, in words an operator can act on
        self.on_refused: list[Callable[[str, str], None]] = []
        # the server's certificate was refused: no retry, the reason in words
        self.tls_error = ""
        self._tls_pending = False  # a refused handshake is being explained
        self._tls_failed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- connection --------------------------------------------------------
    def _make_client(self) -> slixmpp.ClientXMPP:
        c = slixmpp.ClientXMPP(self.options.jid, self.options.password)
        c.register_plugin("xep_0030")
        c.register_plugin("xep_0199", {"keepalive": True, "interval": 30, "timeout": 10})
        c.enable_starttls = self.options.starttls
        c.enable_direct_tls = False
        if self.options.starttls:
            c.ssl_context = self.options.tls.context()
            c.add_event_handler("ssl_cert", self._check_cert)
            c.add_event_handler("ssl_invalid_chain", self._invalid_chain)
        if not self.options.starttls:
            # plain TCP is only for a server on the same host (tests, loopback)
            c.enable_plaintext = True
            c.plugin["feature_mechanisms"].unencrypted_plain = True
        c.add_event_handler("session_start", self._session_start)
        c.add_event_handler("disconnected", self._disconnected)
        c.add_event_handler("failed_auth", self._failed_auth)
        c.register_handler(
            Callback(
                "room presence",
                MatchXPath("{jabber:client}presence"),
                self._presence,  # type: ignore[arg-type]
            )
        )
        c.register_handler(
            Callback(
                "jingle",
                MatchXPath(f"{{jabber:client}}iq/{{{JINGLE}}}jingle"),
                self._jingle,  # type: ignore[arg-type]
            )
        )
        return c

    async def start(self, wait_s: float = 15.0) -> None:
        """Connect; waits up to ``wait_s`` for the session, then goes on
        trying in the background (the sidecar serves without XMPP meanwhile).

        Raises :class:`ConfigError` when the server's certificate is refused:
        that needs an option set (``xmpp.ca_file``, ``xmpp.pinned_cert_sha256``,
        ``xmpp.tls_server_name``), not retries."""
        self._connect()
        waits = [asyncio.ensure_future(e.wait()) for e in (self._online, self._tls_failed)]
        try:
            await asyncio.wait(waits, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if self.tls_error:
            raise ConfigError(self._server(), "", self.tls_error)
        if not self._online.is_set():
            log.warning("xmpp: not online after %.0f s; will keep trying", wait_s)

    def _connect(self) -> None:
        if self.options.host:
            self.client.connect(self.options.host, self.options.port)
        else:
            self.client.connect()

    def _server(self) -> str:
        where = f"{self.options.host}:{self.options.port}" if self.options.host else ""
        return f"the XMPP connection to {where or slixmpp.JID(self.options.jid).domain}"

    def _check_cert(self, pem: str) -> None:
        """After the handshake: the pin and the name, where configured."""
        der = ssl.PEM_cert_to_DER_cert(pem)
        transport = self.client.transport
        peercert = transport.get_extra_info("peercert") if transport is not None else None
        problem = self.options.tls.check(der, peercert or None, self.client.boundjid.domain)
        if problem is not None:
            self._fail_tls(problem)

    def _invalid_chain(self, error: BaseException) -> None:
        """The handshake failed verification: find out why, in words."""
        domain = slixmpp.JID(self.options.jid).domain
        self.client.abort()
        self._tls_pending = True

        async def explain_it() -> None:
            host = self.options.host or domain
            probed = await probe_certificate(host, self.options.port, domain)
            self._fail_tls(explain(error, self.options.tls.server_name or domain, probed))

        task = asyncio.get_running_loop().create_task(explain_it())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fail_tls(self, message: str) -> None:
        if not self.tls_error:
            log.error("xmpp: %s", message)
        self.tls_error = message
        TLS_REFUSED.inc()
        self._tls_failed.set()
        self.client.abort()

    @property
    def online(self) -> bool:
        return self._online.is_set()

    async def _session_start(self, _event: object) -> None:
        self._backoff = 1.0
        self.client.send_presence()
        self._online.set()
        CONNECTED.set(1)
        log.info("xmpp: online as %s", self.client.boundjid)
        for state in self.rooms.values():
            state.joined = False
            self._send_presence(state, "ON")  # rejoin after a reconnect

    def _failed_auth(self, _event: object) -> None:
        log.error("xmpp: authentication failed for %s", self.options.jid)

    def _disconnected(self, _event: object) -> None:
        self._online.clear()
        CONNECTED.set(0)
        JOINED.set(0)
        for state in self.rooms.values():
            state.joined = False
        if self._closing:
            return
        if self._reconnect_task is not None and not self._reconnect_task.done():
            return
        self._reconnect_task = asyncio.get_running_loop().create_task(self._later())

    def _tls_refused(self) -> bool:
        # a refused certificate needs an option set, not retries
        return bool(self.tls_error) or self._tls_pending

    async def _later(self) -> None:
        # a failed TLS handshake loses the connection before slixmpp reports
        # the verification error: give it a moment to tell the two apart
        await asyncio.sleep(0.2)
        if self._closing or self._tls_refused():
            return
        delay = self._backoff
        self._backoff = min(30.0, self._backoff * 2)
        log.warning("xmpp: connection lost; reconnecting in %.0f s", delay)
        RECONNECTS.inc()
        await asyncio.sleep(delay)
        if not self._closing and not self._tls_refused():
            self._connect()

    async def close(self) -> None:
        self._closing = True
        for room in list(self.rooms):
            self.leave(room)
        await asyncio.sleep(0.2)  # let OFF and the leave presence go out
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
        for t in list(self._tasks):
            t.cancel()
        for state in self.rooms.values():
            if state.retry is not None:
                state.retry.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.disconnect(), 5)
        CONNECTED.set(0)

    # -- rooms -------------------------------------------------------------
    def join(self, room: str, transcript_id: str = "", password: str = "") -> None:
        if room in self.rooms:
            state = self.rooms[room]
            state.transcript_id = transcript_id or state.transcript_id
            if state.joined:
                self._advertise(state)  # transcription may start after captions
            elif password and password != state.password:
                # a new password for a room that refused us: try it now
                state.password = password
                if state.retry is not None:
                    state.retry.cancel()
                    state.retry = None
                if self.online:
                    state.resource = secrets.token_hex(4)
                    self._send_presence(state, "ON")
            return
        # the MUC resource is the occupant's endpoint id, as Jitsi clients use
        state = _RoomState(
            room, secrets.token_hex(4), transcript_id=transcript_id, password=password
        )
        self.rooms[room] = state
        if self.online:
            self._send_presence(state, "ON")

    def leave(self, room: str) -> None:
        state = self.rooms.pop(room, None)
        if state is not None and state.retry is not None:
            state.retry.cancel()
        if state is None or not self.online:
            return
        # OFF first, or the UI shows "transcribing failed"
        self._send_presence(state, "OFF")
        self._send_presence(state, "OFF", unavailable=True)
        JOINED.set(sum(1 for s in self.rooms.values() if s.joined))

    def _send_presence(self, state: _RoomState, status: str, unavailable: bool = False) -> None:
        pres = self.client.make_presence(pto=f"{state.room}/{state.resource}")
        if unavailable:
            pres["type"] = "unavailable"
        else:
            x = ET.Element(f"{{{MUC}}}x")
            if state.password and not state.joined:
                ET.SubElement(x, f"{{{MUC}}}password").text = state.password
            pres.append(x)
        feats = ET.Element(f"{{{JITMEET}}}features")
        for var in (FEATURE_JIGASI, FEATURE_TRANSCRIBER):
            f = ET.SubElement(feats, f"{{{JITMEET}}}feature")
            f.set("var", var)
        # lib-jitsi-meet looks for these children without a namespace check;
        # Jigasi sends features in the jabber:client namespace
        pres.append(_reparent(feats, "jabber:client"))
        ts = ET.Element("{jabber:client}transcription-status")
        ts.set("status", status)
        pres.append(ts)
        nick = ET.Element(f"{{{NICK}}}nick")
        nick.text = self.options.nick
        pres.append(nick)
        pres.send()
        SENT.labels("presence").inc()

    def _presence(self, pres: slixmpp.Presence) -> None:
        room = pres["from"].bare
        state = self.rooms.get(room)
        if state is None:
            return
        resource = pres["from"].resource
        if resource != state.resource:
            # someone else: whom a private notice can reach
            if pres["type"] == "unavailable":
                state.occupants.discard(resource)
            elif pres["type"] != "error" and resource and len(state.occupants) < 10000:
                state.occupants.add(resource)
            return
        if pres["type"] == "error":
            state.joined = False
            self._refused(state, pres["error"]["condition"] or "undefined-condition")
            return
        if pres["type"] == "unavailable":
            # kicked, or the room went away under us, while the room still
            # wants captions: come back (leave() removes the room first)
            if state.joined:
                log.warning("xmpp: removed from %s; rejoining", room)
            state.joined = False
            state.occupants.clear()
            JOINED.set(sum(1 for s in self.rooms.values() if s.joined))
            self._retry_join(state)
            return
        if not state.joined:
            state.joined = True
            state.attempts = 0
            if state.refused:
                log.info("xmpp: joined %s after it had refused the join", room)
            state.refused = ""
            JOINED.set(sum(1 for s in self.rooms.values() if s.joined))
            log.info("xmpp: joined %s as %s", room, state.resource)
            self._advertise(state)
            notices, state.notices = state.notices, []
            for to, text in notices:
                self._notice(state, to, text)
            for cb in self.on_joined:
                cb(room)

    def _refused(self, state: _RoomState, condition: str) -> None:
        reason = self.refusal_reason(state.room, condition, bool(state.password))
        REFUSED.labels(condition if condition in _CONDITIONS else "other").inc()
        if state.refused != condition:
            # once per kind of refusal, not once per try
            log.error("xmpp: cannot join %s: %s", state.room, reason)
            state.refused = condition
            for cb in self.on_refused:
                cb(state.room, reason)
        self._retry_join(state)

    def refusal_reason(self, room: str, condition: str, had_password: bool) -> str:
        """Why a join was refused, and what to set, in an operator's words."""
        me = slixmpp.JID(self.options.jid)
        if condition == "not-authorized":
            told = "a wrong password" if had_password else "no password"
            return (
                f"the room {room} is password-protected and the transcriber is not "
                f'whitelisted (the start call brought {told}): add "{me.bare}" to '
                "muc_password_whitelist on the conference component, or let the dial carry "
                "JvbRoomPassword"
            )
        if condition == "registration-required":
            return (
                f"the room {room} is members-only (lobby) and the transcriber is not "
                f'whitelisted: add "{me.domain}" to muc_lobby_whitelist (docker-jitsi-meet '
                "does with ENABLE_TRANSCRIPTIONS)"
            )
        if condition == "forbidden":
            return f"the transcriber {me.bare} is banned from the room {room}"
        if condition == "service-unavailable":
            return f"the room {room} is full or does not accept the transcriber"
        return f"the room {room} refused the transcriber's join ({condition})"

    def _retry_join(self, state: _RoomState) -> None:
        if self._closing:
            return
        state.attempts += 1
        delay = rejoin_delay(self.options, state.attempts)
        if state.retry is not None:
            state.retry.cancel()

        def again() -> None:
            state.retry = None
            if self.rooms.get(state.room) is state and not state.joined and self.online:
                state.resource = secrets.token_hex(4)  # a fresh nick avoids a conflict
                self._send_presence(state, "ON")

        state.retry = asyncio.get_running_loop().call_later(delay, again)

    def _advertise(self, state: _RoomState) -> None:
        if not self.options.advertise_url or state.advertised or not state.transcript_id:
            return
        url = self.options.advertise_url.format(room=state.room, transcript_id=state.transcript_id)
        self._groupchat(state.room, body=f"The transcript of this meeting will be at {url}")
        state.advertised = True
        SENT.labels("advertise").inc()

    def joined(self, room: str) -> bool:
        """Whether the occupant is in ``room`` now (the room's ``muc`` carrier
        can send)."""
        state = self.rooms.get(room)
        return state is not None and state.joined and self.online

    def notify(self, room: str, text: str, to: str = "") -> None:
        """One plain-text line for the room's people: to the occupant ``to``
        (an endpoint id: a private MUC message) when it is in the room, else
        to the whole room. Sent when the occupant is in; kept until then."""
        state = self.rooms.get(room)
        if state is None:
            return
        if state.joined and self.online:
            self._notice(state, to, text)
        elif len(state.notices) < 8:
            state.notices.append((to, text))

    def withdraw(self, room: str, text: str) -> None:
        """Drop a notice still waiting for the join."""
        state = self.rooms.get(room)
        if state is not None:
            state.notices = [n for n in state.notices if n[1] != text]

    def _notice(self, state: _RoomState, to: str, text: str) -> None:
        if to and to in state.occupants:
            msg = self.client.make_message(mto=f"{state.room}/{to}", mtype="chat", mbody=text)
            msg.append(ET.Element(f"{{{MUC_USER}}}x"))  # a private message in the MUC
            msg.send()
            SENT.labels("notice_private").inc()
        else:
            self._groupchat(state.room, body=text)
            SENT.labels("notice").inc()

    # -- captions ----------------------------------------------------------
    def send_caption(self, c: Caption) -> None:
        state = self.rooms.get(c.room)
        if state is None or not state.joined or not self.online:
            SENT.labels("not_joined").inc()
            return
        self._groupchat(c.room, json_message=caption_json(c))
        SENT.labels("interim" if c.is_interim else "final").inc()
        if self.options.send_text and not c.is_interim and c.text:
            self._groupchat(c.room, body=f"{c.participant_name}: {c.text}")
            SENT.labels("text").inc()

    def _groupchat(
        self, room: str, *, body: str | None = None, json_message: dict[str, object] | None = None
    ) -> None:
        msg = self.client.make_message(mto=room, mtype="groupchat")
        if body is not None:
            msg["body"] = body
        if json_message is not None:
            el = ET.Element(f"{{{JITMEET}}}json-message")
            el.text = json.dumps(json_message, ensure_ascii=False)
            msg.append(el)
        msg.send()

    # -- Jingle ------------------------------------------------------------
    def _jingle(self, iq: slixmpp.Iq) -> None:
        jingle = iq.xml.find(f"{{{JINGLE}}}jingle")
        if iq["type"] != "set" or jingle is None:
            return
        action = jingle.get("action", "")
        sid = jingle.get("sid", "")
        iq.reply().send()  # acknowledge, then decline the session itself
        if action != "session-initiate":
            return
        JINGLE_DECLINED.inc()
        log.info("xmpp: declining Jingle session %s from %s", sid, iq["from"])
        term = self.client.make_iq_set(ito=iq["from"])
        j = ET.SubElement(term.xml, f"{{{JINGLE}}}jingle")
        j.set("action", "session-terminate")
        j.set("sid", sid)
        reason = ET.SubElement(j, f"{{{JINGLE}}}reason")
        ET.SubElement(reason, f"{{{JINGLE}}}decline")
        text = ET.SubElement(reason, f"{{{JINGLE}}}text")
        text.text = "audio for transcription comes from the videobridge export"
        term.send()


def rejoin_delay(options: TranscriberOptions, attempt: int) -> float:
    """Seconds before try ``attempt`` (1, 2, ...) of a refused join: doubling
    from ``rejoin_base_s``, never more than ``rejoin_max_s``."""
    return float(min(options.rejoin_max_s, options.rejoin_base_s * 2.0 ** min(attempt - 1, 30)))


def _reparent(el: ET.Element, ns: str) -> ET.Element:
    """Copy of ``el`` with its tree moved into namespace ``ns``."""
    local = el.tag.split("}", 1)[-1]
    out = ET.Element(f"{{{ns}}}{local}", el.attrib)
    out.text = el.text
    for child in el:
        out.append(_reparent(child, ns))
    return out
