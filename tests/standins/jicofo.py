"""A Jicofo stand-in: the focus as far as rooms, metadata and the export go.

Written from jicofo's source (mirror read Aug 2026; no code taken). Rules, with
the file each follows (paths under jicofo/, jicofo-common/, jicofo-selector/
``src/main``):

XMPP (jicofo-common .../xmpp/XmppProvider.kt)
  1. Logs in (focus@auth.DOMAIN) and discovers components with a disco#info
     to the XMPP domain: every identity of category "component" is a
     component (type, address = the identity's name) (discoverComponents).
Metadata (jicofo .../xmpp/RoomMetadataHandler.kt, jicofo-common .../xmpp/JsonMessage.kt)
  2. Room metadata is read only from NORMAL messages whose sender is the
     discovered "room_metadata" component, from their ``json-message``
     child (``room`` attribute names the conference); nothing else counts.
  3. The JSON is a typed JsonMessage: ``type`` must be "room_metadata" and
     every known field must have its declared type (Jackson: an object where
     an object is declared, a list of strings, string maps; booleans may be
     JSON booleans or the strings "true"/"false"); unknown fields are ignored.
     A message that does not parse, or names no known conference, is logged
     and dropped.
Room (jicofo-common .../xmpp/muc/ChatRoomImpl.kt)
  4. Joins ROOM/focus (creating the room), reads the owner configuration form
     and takes ``muc#roominfo_meetingId`` from it, and submits
     ``muc#roomconfig_whois = anyone`` (joinAs). No meeting id: a random UUID
     (JitsiMeetConferenceImpl.setMeetingId).
  5. doSetRoomMetadata: transcription = metadata.transcription; transcribing
     is enabled exactly when recording.isTranscribingEnabled == true and
     asyncTranscription == true.
  6. A member is a transcriber / jigasi / jibri only when its presence
     signals the feature and its JID's domain is in trusted-domains
     (ChatRoomMemberImpl).
  7. Ownership is granted with a muc#admin item affiliation="owner" for the
     member's real JID (grantOwnership); with auto-owner the first member
     that is not jibri/jigasi and not a visitor gets it (jicofo
     .../xmpp/muc/ChatRoomRoleManager.kt AutoOwnerRoleManager).
Conference (jicofo .../conference/JitsiMeetConferenceImpl.java)
  8. Members are invited once min-participants (2, jicofo reference.conf)
     are in, or at once while transcribing is enabled (checkMinParticipants);
     the first time everyone is invited, later only the newcomer
     (onMemberJoined, inviteAllChatMembers). Enabling transcribing with
     members in and nobody invited invites everyone (setEnableTranscribing).
  9. setEnableTranscribing(on): no change -> nothing; otherwise, once the
     conference has a bridge session, the transcriber URL is the configured
     url-template with {{MEETING_ID}} replaced; off clears it. Without a
     url-template nothing is exported ("Transcription enabled, but no URL is
     configured"). Before the first bridge session the value waits for it
     (getColibriSessionManager).
Export (jicofo-selector .../TranscriptionConfig.kt, .../bridge/colibri/ColibriV2SessionManager.kt)
 10. Headers: the configured http-headers, with metadata
     transcription.httpHeaders merged over them when present
     (processTranscriptionMetadata). URL: {{REGION}} -> the bridge's region
     (empty here); metadata transcription.urlParams appended as a query
     string, keys and values URL-encoded like java.net.URLEncoder, joined
     with "?" or "&" (buildTranscriberSpec).
 11. One connect with id "transcriber", type transcriber, ping
     interval/timeout from jicofo.transcription.ping (10 s / 3 s) when
     enabled. A second, different URL while one is set is refused
     ("Changing to a different transcriber URL is not supported"); clearing
     it expires the connect (setTranscriberUrl, updateConnects).
Jingle (jicofo-common .../xmpp/JingleUtils.kt, .../jingle/JingleSession.kt,
        .../codec/CodecUtil.kt, jicofo .../conference/ParticipantInviteRunnable.java)
 12. Each invited member gets ``session-initiate`` (initiator = the focus):
     an audio content with Opus PT 111 48000/2 (minptime 10, useinbandfec
     1), the ssrc-audio-level header extension, an ICE-UDP transport with
     the bridge's DTLS fingerprint and candidates, BUNDLE. The member's
     replies (ack, ``session-accept`` with its sources, ``session-terminate``
     with a reason) are recorded; accepted sources are given to the bridge.

Not done: the focus component's conference IQ (tests call
:meth:`Jicofo.conference`), Jibri/Jigasi selection and the rayo dial (a dial
that reaches the focus is answered ``service-unavailable``, as Jicofo does
with no Jigasi), visitors, breakout rooms, the ``audio-recording-enabled``
conference property, the domain mapper (the test Prosody has none: rooms are
joined by their internal JID, and a metadata ``room`` in the client form
``room@conference.TENANT.DOMAIN`` is mapped to ``[TENANT]room@conference.DOMAIN``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote_plus, urlsplit

import slixmpp
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from tests.jitsi_clients import JITMEET, MUC, MUC_ADMIN, MUC_USER, RAYO, _Recorder, wait_for
from tests.standins.videobridge import BridgeConference, Connect, Videobridge

log = logging.getLogger(__name__)

DISCO_INFO = "http://jabber.org/protocol/disco#info"
MUC_OWNER = "http://jabber.org/protocol/muc#owner"
XDATA = "jabber:x:data"
JINGLE = "urn:xmpp:jingle:1"
RTP = "urn:xmpp:jingle:apps:rtp:1"
HDREXT = "urn:xmpp:jingle:apps:rtp:rtp-hdrext:0"
ICE = "urn:xmpp:jingle:transports:ice-udp:1"
DTLS = "urn:xmpp:jingle:apps:dtls:0"
GROUP = "urn:xmpp:jingle:apps:grouping:0"
SSMA = "urn:xmpp:jingle:apps:rtp:ssma:0"
F_TRANSCRIBER = "http://jitsi.org/protocol/transcriber"
F_JIGASI = "http://jitsi.org/protocol/jigasi"
F_JIBRI = "http://jitsi.org/protocol/jibri"
TRANSCRIBER_CONNECT_ID = "transcriber"


@dataclass
class TranscriptionConfig:
    """jicofo.transcription (jicofo-selector reference.conf)."""

    url_template: str | None = None
    http_headers: dict[str, str] = field(default_factory=dict)
    ping_enabled: bool = True
    ping_interval: float = 10.0
    ping_timeout: float = 3.0


@dataclass
class JicofoConfig:
    domain: str = "localhost"  # jicofo.xmpp.client.xmpp-domain
    jid: str = "focus@auth.localhost"
    password: str = "fsecret"
    transcription: TranscriptionConfig = field(default_factory=TranscriptionConfig)
    trusted_domains: tuple[str, ...] = ("auth.localhost", "recorder.localhost")
    min_participants: int = 2
    auto_owner: bool = True
    muc_domain_prefix: str = "conference"


@dataclass
class Member:
    nick: str
    jid: str  # real JID (public in Jitsi rooms)
    role: str
    affiliation: str
    is_transcriber: bool = False
    is_jigasi: bool = False
    is_jibri: bool = False


@dataclass
class JingleRecord:
    """One member's Jingle session with the focus, as the focus saw it."""

    sid: str
    initiated: ET.Element | None = None
    ack: str | None = None  # "result" or the error condition
    actions: list[tuple[str, str | None]] = field(default_factory=list)  # (action, reason)

    @property
    def declined(self) -> bool:
        return any(a == "session-terminate" and r == "decline" for a, r in self.actions)

    @property
    def accepted(self) -> bool:
        return any(a == "session-accept" for a, _ in self.actions)


def java_url_encode(text: str) -> str:
    """java.net.URLEncoder.encode(text, "UTF-8")."""
    return quote_plus(text, safe="*").replace("~", "%7E")


def room_jid_match_rewrite(room_jid: str, domain: str, prefix: str = "conference") -> str:
    """jitsi-meet util.lib.lua room_jid_match_rewrite: room@conference.T.DOMAIN
    -> [T]room@conference.DOMAIN (the domain mapper's job on a stock install)."""
    node, _, host = room_jid.partition("@")
    head = f"{prefix}."
    tail = f".{domain}"
    if host.startswith(head) and host.endswith(tail):
        tenant = host[len(head) : -len(tail)]
        if tenant and "." not in tenant:
            return f"[{tenant}]{node}@{prefix}.{domain}"
    return room_jid


class MetadataError(ValueError):
    pass


def _obj(v: Any, what: str) -> dict[str, Any] | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise MetadataError(f"{what}: an object is declared, got {type(v).__name__}")
    return v


def _bool(v: Any, what: str) -> bool | None:
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    raise MetadataError(f"{what}: a boolean is declared, got {v!r}")


def _str_map(v: Any, what: str) -> dict[str, str] | None:
    m = _obj(v, what)
    if m is None:
        return None
    out = {}
    for k, x in m.items():
        if isinstance(x, (dict, list)):
            raise MetadataError(f"{what}.{k}: a string is declared")
        out[k] = x if isinstance(x, str) else json.dumps(x)
    return out


def _str_list(v: Any, what: str) -> list[str] | None:
    if v is None:
        return None
    if not isinstance(v, list) or any(isinstance(x, (dict, list)) for x in v):
        raise MetadataError(f"{what}: a list of strings is declared")
    return [str(x) for x in v]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:  # JsonParser.Feature.STRICT_DUPLICATE_DETECTION
            raise MetadataError(f"duplicate field {k!r}")
        out[k] = v
    return out


def parse_room_metadata(text: str) -> dict[str, Any]:
    """JsonMessage.parse for a RoomMetadata: the checked metadata (rule 3)."""
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except ValueError as e:
        raise MetadataError(f"not JSON: {e}") from e
    if not isinstance(obj, dict) or obj.get("type") not in ("room_metadata", "av_moderation"):
        raise MetadataError("not a JsonMessage of a known type")
    if obj["type"] != "room_metadata":
        raise MetadataError(f"Received invalid message type: {text[:100]}")
    md = _obj(obj.get("metadata"), "metadata")
    if md is None:
        return {}
    visitors = _obj(md.get("visitors"), "visitors")
    if visitors is not None:
        _bool(visitors.get("live"), "visitors.live")
    start_muted = _obj(md.get("startMuted"), "startMuted")
    if start_muted is not None:
        _bool(start_muted.get("audio"), "startMuted.audio")
        _bool(start_muted.get("video"), "startMuted.video")
    _str_list(md.get("moderators"), "moderators")
    _str_list(md.get("participants"), "participants")
    recording = _obj(md.get("recording"), "recording")
    out: dict[str, Any] = {
        "recording": None
        if recording is None
        else {
            "isTranscribingEnabled": _bool(
                recording.get("isTranscribingEnabled"), "recording.isTranscribingEnabled"
            )
        },
        "asyncTranscription": _bool(md.get("asyncTranscription"), "asyncTranscription"),
    }
    limit = md.get("participantsSoftLimit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)):
        raise MetadataError("participantsSoftLimit: an integer is declared")
    _bool(md.get("visitorsEnabled"), "visitorsEnabled")
    _bool(md.get("lobbyEnabled"), "lobbyEnabled")
    tr = _obj(md.get("transcription"), "transcription")
    out["transcription"] = (
        None
        if tr is None
        else {
            "urlParams": _str_map(tr.get("urlParams"), "transcription.urlParams"),
            "httpHeaders": _str_map(tr.get("httpHeaders"), "transcription.httpHeaders"),
        }
    )
    translation = _obj(md.get("translation"), "translation")
    if translation is not None:
        _str_map(translation.get("httpHeaders"), "translation.httpHeaders")
    atr = _obj(md.get("audioTranslationRequests"), "audioTranslationRequests")
    for k, v in (atr or {}).items():
        _str_list(v, f"audioTranslationRequests.{k}")
    return out


class Conference:
    """One room as Jicofo runs it (JitsiMeetConferenceImpl + ChatRoomImpl)."""

    def __init__(self, jicofo: Jicofo, room: str) -> None:
        self.jicofo = jicofo
        self.room = room  # the MUC JID the focus is in
        self.meeting_id: str | None = None
        self.members: dict[str, Member] = {}  # nick -> member, the focus not included
        self.owner: str | None = None
        self.metadata: dict[str, Any] | None = None  # the last parsed RoomMetadata
        self.metadata_received = 0
        self.transcription: dict[str, Any] | None = None
        self.enable_transcription = False
        self.transcribing_changes: list[bool] = []
        self.invited: dict[str, JingleRecord] = {}  # nick -> the Jingle session
        self.bridge: BridgeConference | None = None
        self.transcriber_url: str | None = None
        self.transcriber_headers: dict[str, str] | None = None
        self.url_refusals = 0
        self.joined = asyncio.Event()

    # -- members ---------------------------------------------------------
    def _presence(self, pres: ET.Element) -> None:
        nick = (pres.get("from") or "").partition("/")[2]
        if nick == "focus":
            if pres.get("type") != "unavailable":
                self.joined.set()
            return
        if pres.get("type") == "error":
            return
        if pres.get("type") == "unavailable":
            self.members.pop(nick, None)
            rec = self.invited.pop(nick, None)
            if rec is not None and self.bridge is not None:
                self.bridge.remove_endpoint(nick)
            if nick == self.owner:
                self.owner = None
                self._elect_owner()
            return
        item = pres.find(f"{{{MUC_USER}}}x/{{{MUC_USER}}}item")
        real = item.get("jid", "") if item is not None else ""
        feats = {el.get("var") for el in pres.iter() if el.tag.endswith("}feature")}
        domain = real.partition("@")[2].partition("/")[0]
        trusted = domain in self.jicofo.config.trusted_domains
        new = nick not in self.members
        self.members[nick] = Member(
            nick=nick,
            jid=real,
            role=item.get("role", "") if item is not None else "",
            affiliation=item.get("affiliation", "") if item is not None else "",
            is_transcriber=F_TRANSCRIBER in feats and trusted,
            is_jigasi=F_JIGASI in feats and trusted,
            is_jibri=F_JIBRI in feats and trusted,
        )
        if new:
            self._member_joined(nick)

    def _member_joined(self, nick: str) -> None:
        if self.jicofo.config.auto_owner and self.owner is None:
            self._elect_owner()
        if not self._min_participants():
            return
        if not self.invited:
            self._invite_all()
        else:
            self._invite(nick)

    def _min_participants(self) -> bool:
        need = 1 if self.enable_transcription else self.jicofo.config.min_participants
        return len(self.members) >= need

    def _elect_owner(self) -> None:
        if not self.jicofo.config.auto_owner:
            return
        for m in self.members.values():
            if not (m.is_jibri or m.is_jigasi) and m.affiliation == "owner":
                self.owner = m.nick
                return
        for m in self.members.values():
            if not (m.is_jibri or m.is_jigasi) and m.role != "visitor":
                self.owner = m.nick
                self.jicofo.spawn(self.grant_ownership(m.nick))
                return

    async def grant_ownership(self, nick: str) -> None:
        """ChatRoomImpl.grantOwnership: affiliation owner for the real JID."""
        member = self.members.get(nick)
        if member is None or not member.jid:
            log.warning("jicofo: cannot grant owner to %s, real JID unknown", nick)
            return
        iq = self.jicofo.make_iq_set(ito=self.room)
        query = ET.SubElement(iq.xml, f"{{{MUC_ADMIN}}}query")
        item = ET.SubElement(query, f"{{{MUC_ADMIN}}}item")
        item.set("affiliation", "owner")
        item.set("jid", member.jid.partition("/")[0])
        await iq.send(timeout=10)

    # -- Jingle ----------------------------------------------------------
    def _invite_all(self) -> None:
        for nick in list(self.members):
            self._invite(nick)

    def _invite(self, nick: str) -> None:
        if nick in self.invited or nick not in self.members:
            return
        rec = JingleRecord(sid=secrets.token_hex(6))
        self.invited[nick] = rec
        first_session = self.bridge is None
        if self.bridge is None:
            assert self.meeting_id is not None
            self.bridge = self.jicofo.bridge.conference(self.meeting_id, self.room)
        self.bridge.add_endpoint(nick)
        if first_session and self.transcriber_url is not None:
            # a URL set before any session waits for the first one
            self.jicofo.spawn(self._apply_connects())
        self.jicofo.spawn(self._send_initiate(nick, rec))

    async def _send_initiate(self, nick: str, rec: JingleRecord) -> None:
        iq = self.jicofo.make_iq_set(ito=f"{self.room}/{nick}")
        iq.xml.append(self._offer(rec.sid))
        rec.initiated = iq.xml
        try:
            await iq.send(timeout=15)
            rec.ack = "result"
        except slixmpp.exceptions.IqError as e:
            rec.ack = e.iq["error"]["condition"] or "error"
        except slixmpp.exceptions.IqTimeout:
            rec.ack = "timeout"

    def _offer(self, sid: str) -> ET.Element:
        j = ET.Element(f"{{{JINGLE}}}jingle")
        j.set("action", "session-initiate")
        j.set("initiator", str(self.jicofo.boundjid))
        j.set("sid", sid)
        content = ET.SubElement(j, f"{{{JINGLE}}}content")
        content.set("creator", "initiator")
        content.set("name", "audio")
        content.set("senders", "both")
        desc = ET.SubElement(content, f"{{{RTP}}}description")
        desc.set("media", "audio")
        pt = ET.SubElement(desc, f"{{{RTP}}}payload-type")
        pt.attrib.update({"id": "111", "name": "opus", "clockrate": "48000", "channels": "2"})
        for name, value in (("minptime", "10"), ("useinbandfec", "1")):
            p = ET.SubElement(pt, f"{{{RTP}}}parameter")
            p.set("name", name)
            p.set("value", value)
        ext = ET.SubElement(desc, f"{{{HDREXT}}}rtp-hdrext")
        ext.set("id", "1")
        ext.set("uri", "urn:ietf:params:rtp-hdrext:ssrc-audio-level")
        ET.SubElement(desc, f"{{{HDREXT}}}extmap-allow-mixed")
        tr = ET.SubElement(content, f"{{{ICE}}}transport")
        tr.set("ufrag", secrets.token_hex(4))
        tr.set("pwd", secrets.token_hex(12))
        fp = ET.SubElement(tr, f"{{{DTLS}}}fingerprint")
        fp.set("hash", "sha-256")
        fp.set("setup", "actpass")
        fp.text = ":".join(f"{b:02X}" for b in secrets.token_bytes(32))
        cand = ET.SubElement(tr, f"{{{ICE}}}candidate")
        cand.attrib.update(
            {
                "component": "1",
                "foundation": "1",
                "generation": "0",
                "id": secrets.token_hex(4),
                "ip": "127.0.0.1",
                "network": "0",
                "port": "10000",
                "priority": "2130706431",
                "protocol": "udp",
                "type": "host",
            }
        )
        group = ET.SubElement(j, f"{{{GROUP}}}group")
        group.set("semantics", "BUNDLE")
        ET.SubElement(group, f"{{{GROUP}}}content").set("name", "audio")
        return j

    def _jingle_from(self, nick: str, jingle: ET.Element) -> None:
        rec = self.invited.get(nick)
        if rec is None:
            return
        action = jingle.get("action", "")
        reason_el = jingle.find(f"{{{JINGLE}}}reason")
        reason = None
        if reason_el is not None:
            for child in reason_el:
                if not child.tag.endswith("}text"):
                    reason = child.tag.split("}", 1)[1]
        rec.actions.append((action, reason))
        if action in ("session-accept", "source-add") and self.bridge is not None:
            sources = []
            for src in jingle.iter(f"{{{SSMA}}}source"):
                name = src.get("name") or f"{nick}-a0"
                with contextlib.suppress(TypeError, ValueError):
                    sources.append((name, int(src.get("ssrc") or "")))
            if sources:
                self.bridge.set_sources(nick, sources)

    # -- metadata and transcribing -----------------------------------------
    def set_room_metadata(self, md: dict[str, Any]) -> None:
        """ChatRoomImpl.doSetRoomMetadata (rule 5)."""
        self.metadata = md
        self.metadata_received += 1
        self.transcription = md.get("transcription")
        recording = md.get("recording") or {}
        self._set_enable_transcribing(
            recording.get("isTranscribingEnabled") is True and md.get("asyncTranscription") is True
        )

    def _set_enable_transcribing(self, enable: bool) -> None:
        if enable == self.enable_transcription:
            return
        log.info("jicofo: %s enableTranscribing=%s", self.room, enable)
        self.enable_transcription = enable
        self.transcribing_changes.append(enable)
        if enable and self.members and not self.invited:
            self._invite_all()
        if self.bridge is None:
            # takes effect when the first bridge session is made
            self._set_transcriber_url(enable)
            return
        self._set_transcriber_url(enable)
        self.jicofo.spawn(self._apply_connects())

    def _set_transcriber_url(self, enable: bool) -> None:
        cfg = self.jicofo.config.transcription
        url: str | None = None
        headers: dict[str, str] | None = None
        if enable:
            if not cfg.url_template:
                log.info("jicofo: transcription enabled, but no URL is configured")
                return
            assert self.meeting_id is not None
            url = cfg.url_template.replace("{{MEETING_ID}}", self.meeting_id)
            url = url.replace("{{REGION}}", "")
            tr = self.transcription or {}
            params = tr.get("urlParams")
            if params:
                query = "&".join(
                    f"{java_url_encode(k)}={java_url_encode(v)}" for k, v in params.items()
                )
                url += ("&" if urlsplit(url).query else "?") + query
            custom = tr.get("httpHeaders")
            headers = dict(cfg.http_headers) | custom if custom is not None else None
        if self.transcriber_url == url:
            return
        if self.transcriber_url is not None and url is not None:
            log.error("jicofo: changing to a different transcriber URL is not supported")
            self.url_refusals += 1
            return
        self.transcriber_url = url
        self.transcriber_headers = headers

    async def _apply_connects(self) -> None:
        if self.bridge is None:
            return
        cfg = self.jicofo.config.transcription
        running = TRANSCRIBER_CONNECT_ID in self.bridge.exporters
        if self.transcriber_url is None:
            if running:
                await self.bridge.apply_connects(
                    [Connect(id=TRANSCRIBER_CONNECT_ID, url="", expire=True)]
                )
            return
        if running:
            return
        await self.bridge.apply_connects(
            [
                Connect(
                    id=TRANSCRIBER_CONNECT_ID,
                    url=self.transcriber_url,
                    type="transcriber",
                    http_headers=self.transcriber_headers
                    if self.transcriber_headers is not None
                    else dict(cfg.http_headers),
                    ping=(int(cfg.ping_interval * 1000), int(cfg.ping_timeout * 1000))
                    if cfg.ping_enabled
                    else None,
                )
            ]
        )


class Jicofo(_Recorder):
    """The focus: rooms, room metadata, Jingle invitations, the bridge's export."""

    def __init__(self, port: int, bridge: Videobridge, config: JicofoConfig | None = None) -> None:
        self.config = config or JicofoConfig()
        super().__init__(self.config.jid, self.config.password)
        self.port = port
        self.bridge = bridge
        self.components: set[tuple[str, str]] = set()  # (type, address)
        self.metadata_component: str | None = None
        self.conferences: dict[str, Conference] = {}
        self.metadata_dropped: list[str] = []  # why each ignored metadata message was
        self.dials: list[ET.Element] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.register_handler(
            Callback(
                "metadata",
                MatchXPath(f"{{jabber:client}}message/{{{JITMEET}}}json-message"),
                self._json_message,  # type: ignore[arg-type]
            )
        )
        self.register_handler(
            Callback(
                "jingle",
                MatchXPath(f"{{jabber:client}}iq/{{{JINGLE}}}jingle"),
                self._jingle,  # type: ignore[arg-type]
            )
        )
        self.register_handler(
            Callback(
                "muc presence",
                MatchXPath("{jabber:client}presence"),
                self._muc_presence,  # type: ignore[arg-type]
            )
        )
        self.register_handler(
            Callback("dial", MatchXPath(f"{{jabber:client}}iq/{{{RAYO}}}dial"), self._dial)  # type: ignore[arg-type]
        )

    def spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def start(self, port: int | None = None) -> None:  # type: ignore[override]
        await super().start(port or self.port)
        await self.discover_components()

    async def discover_components(self) -> None:
        """XmppProvider.discoverComponents (rule 1)."""
        iq = self.make_iq_get(ito=self.config.domain)
        ET.SubElement(iq.xml, f"{{{DISCO_INFO}}}query")
        reply = await iq.send(timeout=10)
        found = set()
        for ident in reply.xml.iter(f"{{{DISCO_INFO}}}identity"):
            if ident.get("category") == "component":
                found.add((ident.get("type") or "", ident.get("name") or ""))
        self.components = found
        self.metadata_component = next((a for t, a in found if t == "room_metadata"), None)
        log.info("jicofo: components %s; room_metadata at %s", found, self.metadata_component)

    async def conference(self, room: str, password: str | None = None) -> Conference:
        """Join (create) the room as ROOM/focus and set it up (rule 4)."""
        conf = self.conferences.get(room)
        if conf is not None:
            return conf
        conf = self.conferences[room] = Conference(self, room)
        pres = self.make_presence(pto=f"{room}/focus")
        x = ET.SubElement(pres.xml, f"{{{MUC}}}x")
        if password:
            ET.SubElement(x, f"{{{MUC}}}password").text = password
        pres.send()
        await asyncio.wait_for(conf.joined.wait(), 10)
        get = self.make_iq_get(ito=room)
        ET.SubElement(get.xml, f"{{{MUC_OWNER}}}query")
        form = (await get.send(timeout=10)).xml
        meeting_id = None
        for f in form.iter(f"{{{XDATA}}}field"):
            if f.get("var") == "muc#roominfo_meetingId":
                v = f.find(f"{{{XDATA}}}value")
                meeting_id = (v.text or "").strip() if v is not None else None
        conf.meeting_id = meeting_id or str(uuid.uuid4())
        submit = self.make_iq_set(ito=room)
        q = ET.SubElement(submit.xml, f"{{{MUC_OWNER}}}query")
        xd = ET.SubElement(q, f"{{{XDATA}}}x")
        xd.set("type", "submit")
        for var, value in (
            ("FORM_TYPE", "http://jabber.org/protocol/muc#roomconfig"),
            ("muc#roomconfig_whois", "anyone"),
        ):
            fl = ET.SubElement(xd, f"{{{XDATA}}}field")
            fl.set("var", var)
            ET.SubElement(fl, f"{{{XDATA}}}value").text = value
        await submit.send(timeout=10)
        return conf

    # -- stanzas ---------------------------------------------------------
    def _muc_presence(self, pres: slixmpp.Presence) -> None:
        room = str(pres["from"].bare)
        conf = self.conferences.get(room)
        if conf is not None:
            conf._presence(pres.xml)

    def _json_message(self, msg: slixmpp.Message) -> None:
        """RoomMetadataHandler.processStanza (rules 2 and 3)."""
        el = msg.xml
        if el.get("type") not in (None, "", "normal"):
            return  # only NORMAL messages are listened to
        sender = el.get("from") or ""
        if self.metadata_component is None or sender != self.metadata_component:
            if el.get("type") in (None, "", "normal"):
                self.metadata_dropped.append(f"not from the room_metadata component: {sender}")
            return
        jm = el.find(f"{{{JITMEET}}}json-message")
        assert jm is not None
        try:
            room_attr = jm.get("room")
            if not room_attr:
                raise MetadataError("no room attribute")
            md = parse_room_metadata(jm.text or "")
            room = room_jid_match_rewrite(
                room_attr, self.config.domain, self.config.muc_domain_prefix
            )
            conf = self.conferences.get(room)
            if conf is None:
                raise MetadataError(f"Conference {room_attr} does not exist.")
        except MetadataError as e:
            log.info("jicofo: failed to process room_metadata: %s", e)
            self.metadata_dropped.append(str(e))
            return
        conf.set_room_metadata(md)

    def _jingle(self, iq: slixmpp.Iq) -> None:
        if iq["type"] != "set":
            return
        iq.reply().send()
        frm = iq["from"]
        conf = self.conferences.get(str(frm.bare))
        jingle = iq.xml.find(f"{{{JINGLE}}}jingle")
        if conf is not None and jingle is not None:
            conf._jingle_from(frm.resource, jingle)

    def _dial(self, iq: slixmpp.Iq) -> None:
        # no Jigasi to forward a dial to (JigasiIqHandler finds none)
        if iq["type"] != "set":
            return
        self.dials.append(iq.xml)
        err = iq.reply()
        err["type"] = "error"
        err["error"]["type"] = "cancel"
        err["error"]["condition"] = "service-unavailable"
        err["error"]["text"] = "no Jigasi here (test Jicofo)"
        err.send()

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        self.disconnect()
        await self.bridge.close()


@contextlib.asynccontextmanager
async def jicofo_and_bridge(
    port: int, config: JicofoConfig | None = None, bridge: Videobridge | None = None
) -> AsyncIterator[Jicofo]:
    """A logged-in Jicofo stand-in with its bridge; everything closed after."""
    jicofo = Jicofo(port, bridge or Videobridge(), config)
    await jicofo.start()
    try:
        yield jicofo
    finally:
        await jicofo.stop()


async def wait_transcribing(conf: Conference, on: bool, limit: float = 20) -> None:
    await wait_for(lambda: conf.enable_transcription is on, limit, f"transcribing {on}")
