"""XMPP clients that behave like Jitsi's, for tests against a real Prosody.

- :class:`JitsiClient` joins a room as lib-jitsi-meet does: the MUC resource is
  the endpoint id, the display name is in ``<nick>``, local participant
  properties are ``<jitsi_participant_NAME>value</...>`` children of every
  presence (jabber:client), and the CC button's dial IQ goes to the focus
  occupant (``modules/xmpp/strophe.rayo.ts``).
- :class:`FocusClient` is Jicofo as far as the room is concerned: it joins
  first as ``ROOM/focus`` (creating the room, so it owns it) and grants the
  moderator role with a MUC admin IQ.

Every stanza a client receives is recorded in ``events`` with its arrival time.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable

import slixmpp
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

JITMEET = "http://jitsi.org/jitmeet"
MUC = "http://jabber.org/protocol/muc"
MUC_USER = "http://jabber.org/protocol/muc#user"
MUC_ADMIN = "http://jabber.org/protocol/muc#admin"
NICK = "http://jabber.org/protocol/nick"
RAYO = "urn:xmpp:rayo:1"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
FEATURE_TRANSCRIBER = "http://jitsi.org/protocol/transcriber"
MUC_OWNER = "http://jabber.org/protocol/muc#owner"
XDATA = "jabber:x:data"
JINGLE = "urn:xmpp:jingle:1"
JINGLE_RTP = "urn:xmpp:jingle:apps:rtp:1"
JINGLE_SSMA = "urn:xmpp:jingle:apps:rtp:ssma:0"


async def wait_for(cond: Callable[[], object], limit: float = 15.0, what: str = "") -> float:
    """Poll ``cond`` until it is true; returns the seconds it took."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > limit:
            raise AssertionError(f"not met within {limit} s: {what or cond}")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


class _Recorder(slixmpp.ClientXMPP):
    def __init__(self, jid: str, password: str) -> None:
        super().__init__(jid, password)
        self.enable_starttls = False
        self.enable_direct_tls = False
        self.enable_plaintext = True
        self.plugin["feature_mechanisms"].unencrypted_plain = True
        self.events: list[tuple[float, str, ET.Element]] = []
        self.online = asyncio.Event()
        self.add_event_handler("session_start", self._session_start)
        self.iqs_sent = 0
        for kind in ("presence", "message", "iq"):
            self.register_handler(
                Callback(
                    kind,
                    MatchXPath(f"{{jabber:client}}{kind}"),
                    lambda s, kind=kind: self.events.append((time.monotonic(), kind, s.xml)),
                )
            )

    async def _session_start(self, _event: object) -> None:
        self.send_presence()
        self.online.set()

    async def start(self, port: int) -> None:
        self.connect("127.0.0.1", port)
        await asyncio.wait_for(self.online.wait(), 10)

    def presences_from(self, occupant_jid: str) -> list[ET.Element]:
        return [
            el for _, k, el in self.events if k == "presence" and el.get("from") == occupant_jid
        ]


class FocusClient(_Recorder):
    """Jicofo's part: creates the room as ROOM/focus and hands out moderator roles."""

    def __init__(self, jid: str, password: str, room: str) -> None:
        super().__init__(jid, password)
        self.room = room
        self.register_handler(
            Callback("dial", MatchXPath(f"{{jabber:client}}iq/{{{RAYO}}}dial"), self._dial)
        )

    def _dial(self, iq: slixmpp.Iq) -> None:
        # Jicofo with no Jigasi to forward a dial to
        if iq["type"] == "set":
            err = iq.reply()
            err["type"] = "error"
            err["error"]["type"] = "cancel"
            err["error"]["condition"] = "service-unavailable"
            err["error"]["text"] = "no SIP gateway here (test focus)"
            err.send()

    async def create_room(self) -> None:
        pres = self.make_presence(pto=f"{self.room}/focus")
        pres.append(ET.Element(f"{{{MUC}}}x"))
        pres.send()
        await wait_for(lambda: self.presences_from(f"{self.room}/focus"), 10, "focus in the room")

    async def grant_moderator(self, endpoint: str) -> None:
        iq = self.make_iq_set(ito=self.room)
        query = ET.SubElement(iq.xml, f"{{{MUC_ADMIN}}}query")
        item = ET.SubElement(query, f"{{{MUC_ADMIN}}}item")
        item.set("nick", endpoint)
        item.set("role", "moderator")
        await iq.send(timeout=10)


class JitsiClient(_Recorder):
    """A Jitsi Meet participant (lib-jitsi-meet's ChatRoom).

    It accepts the focus's Jingle ``session-initiate`` with one audio source
    (``ENDPOINT-a0``, a random SSRC, ``ssrc-info`` owner), as a browser does
    once its media is set up; ``room_password`` is sent when joining.
    """

    def __init__(
        self,
        jid: str,
        password: str,
        room: str,
        endpoint: str,
        name: str,
        avatar: str = "",
        room_password: str | None = None,
    ) -> None:
        super().__init__(jid, password)
        self.room = room
        self.endpoint = endpoint
        self.name = name
        self.avatar = avatar
        self.room_password = room_password
        self.properties: dict[str, str] = {}
        self.ssrc = int.from_bytes(os.urandom(4), "big") or 1
        self.register_handler(
            Callback(
                "jingle",
                MatchXPath(f"{{jabber:client}}iq/{{{JINGLE}}}jingle"),
                self._jingle,  # type: ignore[arg-type]
            )
        )

    def _jingle(self, iq: slixmpp.Iq) -> None:
        jingle = iq.xml.find(f"{{{JINGLE}}}jingle")
        if iq["type"] != "set" or jingle is None:
            return
        iq.reply().send()
        if jingle.get("action") != "session-initiate":
            return
        accept = self.make_iq_set(ito=iq["from"])
        j = ET.SubElement(accept.xml, f"{{{JINGLE}}}jingle")
        j.set("action", "session-accept")
        j.set("sid", jingle.get("sid", ""))
        j.set("responder", str(self.boundjid))
        content = ET.SubElement(j, f"{{{JINGLE}}}content")
        content.set("creator", "initiator")
        content.set("name", "audio")
        content.set("senders", "both")
        desc = ET.SubElement(content, f"{{{JINGLE_RTP}}}description")
        desc.set("media", "audio")
        src = ET.SubElement(desc, f"{{{JINGLE_SSMA}}}source")
        src.set("ssrc", str(self.ssrc))
        src.set("name", f"{self.endpoint}-a0")
        ET.SubElement(src, f"{{{JITMEET}}}ssrc-info").set("owner", self.occupant_jid)
        accept.send()

    @property
    def occupant_jid(self) -> str:
        return f"{self.room}/{self.endpoint}"

    def _presence(self, join: bool) -> slixmpp.Presence:
        pres = self.make_presence(pto=self.occupant_jid)
        if join:
            x = ET.SubElement(pres.xml, f"{{{MUC}}}x")
            if self.room_password:
                ET.SubElement(x, f"{{{MUC}}}password").text = self.room_password
        nick = ET.Element(f"{{{NICK}}}nick")
        nick.text = self.name
        pres.append(nick)
        if self.avatar:
            av = ET.Element("{jabber:client}avatar-url")
            av.text = self.avatar
            pres.append(av)
        for name, value in self.properties.items():
            el = ET.Element(f"{{jabber:client}}jitsi_participant_{name}")
            el.text = value
            pres.append(el)
        return pres

    async def join(self) -> None:
        self._presence(join=True).send()
        await wait_for(
            lambda: self.presences_from(self.occupant_jid), 10, f"{self.endpoint} joined"
        )

    def set_property(self, name: str, value: str) -> None:
        """conference.setLocalParticipantProperty: a presence with every property."""
        self.properties[name] = value
        self._presence(join=False).send()

    async def configure_room(self, fields: dict[str, str]) -> ET.Element:
        """An owner's room configuration (muc#owner form), as jitsi-meet's
        lock (muc#roomconfig_roomsecret) or lobby (membersonly) do."""
        get = self.make_iq_get(ito=self.room)
        ET.SubElement(get.xml, f"{{{MUC_OWNER}}}query")
        await self.send_iq(get)
        iq = self.make_iq_set(ito=self.room)
        x = ET.SubElement(ET.SubElement(iq.xml, f"{{{MUC_OWNER}}}query"), f"{{{XDATA}}}x")
        x.set("type", "submit")
        for var, value in {
            "FORM_TYPE": "http://jabber.org/protocol/muc#roomconfig",
            **fields,
        }.items():
            f = ET.SubElement(x, f"{{{XDATA}}}field")
            f.set("var", var)
            ET.SubElement(f, f"{{{XDATA}}}value").text = value
        return await self.send_iq(iq)

    def set_room_metadata(self, component: str, key: str, data: object) -> None:
        """lib-jitsi-meet RoomMetadata.setMetadata: a message to the component."""
        msg = self.make_message(mto=component)
        el = ET.SubElement(msg.xml, f"{{{JITMEET}}}room_metadata")
        el.set("room", self.room)
        el.text = json.dumps({"key": key, "data": data, "type": "room_metadata"})
        msg.send()

    def room_metadata(self, component: str) -> list[dict]:
        """The metadata pushed by the component (json-message from it)."""
        out = []
        for _, kind, el in self.events:
            if kind == "message" and el.get("from") == component:
                jm = el.find(f"{{{JITMEET}}}json-message")
                if jm is not None and jm.text:
                    out.append(json.loads(jm.text))
        return out

    def set_name(self, name: str) -> None:
        self.name = name
        self._presence(join=False).send()

    def leave(self) -> None:
        pres = self.make_presence(pto=self.occupant_jid, ptype="unavailable")
        pres.send()

    async def send_iq(self, iq: slixmpp.Iq, limit: float = 15) -> ET.Element:
        """The reply, result or error, as XML."""
        self.iqs_sent += 1
        try:
            reply = await iq.send(timeout=limit)
        except IqError as e:
            return e.iq.xml
        except IqTimeout as e:
            raise AssertionError(f"no answer to the IQ within {limit} s") from e
        return reply.xml

    def dial_iq(
        self,
        room_name: str | None = None,
        *,
        target: str = "jitsi_meet_transcribe",
        to: str | None = None,
        extra: list[ET.Element] | None = None,
        password: str | None = None,
    ) -> slixmpp.Iq:
        """strophe.rayo.ts's dial: to the focus occupant, JvbRoomName header."""
        iq = self.make_iq_set(ito=to or f"{self.room}/focus")
        dial = ET.SubElement(iq.xml, f"{{{RAYO}}}dial")
        dial.set("from", "fromnumber")
        dial.set("to", target)
        if room_name is not None:
            header = ET.SubElement(dial, f"{{{RAYO}}}header")
            header.set("name", "JvbRoomName")
            header.set("value", room_name)
        if password:  # strophe.rayo.ts: JvbRoomPassword when the room has one
            header = ET.SubElement(dial, f"{{{RAYO}}}header")
            header.set("name", "JvbRoomPassword")
            header.set("value", password)
        for el in extra or []:
            dial.append(el)
        return iq

    async def dial(self, room_name: str | None = None, **kw: object) -> ET.Element:
        return await self.send_iq(self.dial_iq(room_name if room_name else self.room, **kw))  # type: ignore[arg-type]

    # -- what the client saw ------------------------------------------------
    def transcriber_presences(self, hidden_domain: str) -> list[ET.Element]:
        out = []
        for _, kind, el in self.events:
            if kind != "presence" or not (el.get("from") or "").startswith(self.room + "/"):
                continue
            item = el.find(f"{{{MUC_USER}}}x/{{{MUC_USER}}}item")
            if item is not None and (item.get("jid") or "").split("/")[0].endswith(hidden_domain):
                out.append(el)
        return out

    def captions(self) -> list[tuple[str, dict]]:
        """(from, json) of the json-message captions received."""
        out = []
        for _, kind, el in self.events:
            if kind == "message" and el.get("type") == "groupchat":
                jm = el.find(f"{{{JITMEET}}}json-message")
                if jm is not None and jm.text:
                    out.append((el.get("from") or "", json.loads(jm.text)))
        return out


def error_condition(reply: ET.Element) -> str | None:
    """The defined condition of an error reply, None for a result."""
    if reply.get("type") != "error":
        return None
    err = reply.find("{jabber:client}error")
    if err is None:
        return "?"
    for child in err:
        if child.tag.startswith(f"{{{STANZAS}}}") and not child.tag.endswith("}text"):
            return child.tag.split("}", 1)[1]
    return "?"


def error_text(reply: ET.Element) -> str:
    el = reply.find(f"{{jabber:client}}error/{{{STANZAS}}}text")
    return el.text or "" if el is not None else ""


def transcription_status(pres: ET.Element) -> str | None:
    ts = pres.find("{jabber:client}transcription-status")
    return ts.get("status") if ts is not None else None


def has_transcriber_feature(pres: ET.Element) -> bool:
    return any(
        el.tag.endswith("}feature") and el.get("var") == FEATURE_TRANSCRIBER for el in pres.iter()
    )
