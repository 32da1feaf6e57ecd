"""The hidden transcriber occupant in a real Prosody, seen by a real client.

A participant client joins the room the way lib-jitsi-meet does (endpoint id
as MUC resource, display name in <nick>) and checks what jitsi-meet relies
on: the transcriber's presence (features, transcription-status, nick, hidden
domain), json-message captions with every field the subtitles read, OFF
before leaving, rejoining after a lost connection, and a declined Jingle
invitation.
"""

from __future__ import annotations

import asyncio
import json
import time
import xml.etree.ElementTree as ET

import jiwer
import pytest
import slixmpp

from sidecar.audio import encode_opus, load_audio
from sidecar.config import load_config
from sidecar.rooms import Participant
from sidecar.server import Sidecar
from tests.conftest import librivox, normalise, play
from tests.prosody import DOMAIN, HIDDEN, MUC, make_prosody

JITMEET = "http://jitsi.org/jitmeet"
ROOM = f"standup@{MUC}"


class Participant_(slixmpp.ClientXMPP):
    """A Jitsi participant as lib-jitsi-meet joins: resource = endpoint id."""

    def __init__(self, jid: str, password: str, endpoint: str, name: str) -> None:
        super().__init__(jid, password)
        self.enable_starttls = False
        self.enable_plaintext = True
        self.plugin["feature_mechanisms"].unencrypted_plain = True
        self.endpoint = endpoint
        self.name = name
        self.events: list[tuple[float, str, ET.Element]] = []
        self.online = asyncio.Event()
        self.add_event_handler("session_start", self._start)
        self.register_handler(
            slixmpp.xmlstream.handler.Callback(
                "all",
                slixmpp.xmlstream.matcher.MatchXPath("{jabber:client}presence"),
                lambda p: self.events.append((time.monotonic(), "presence", p.xml)),
            )
        )
        self.register_handler(
            slixmpp.xmlstream.handler.Callback(
                "msg",
                slixmpp.xmlstream.matcher.MatchXPath("{jabber:client}message"),
                lambda m: self.events.append((time.monotonic(), "message", m.xml)),
            )
        )
        self.register_handler(
            slixmpp.xmlstream.handler.Callback(
                "iq",
                slixmpp.xmlstream.matcher.MatchXPath("{jabber:client}iq"),
                lambda i: self.events.append((time.monotonic(), "iq", i.xml)),
            )
        )

    async def _start(self, _e: object) -> None:
        self.send_presence()
        pres = self.make_presence(pto=f"{ROOM}/{self.endpoint}")
        pres.append(ET.Element("{http://jabber.org/protocol/muc}x"))
        nick = ET.Element("{http://jabber.org/protocol/nick}nick")
        nick.text = self.name
        pres.append(nick)
        pres.send()
        self.online.set()

    def transcriber_presences(self) -> list[ET.Element]:
        out = []
        for _, kind, el in self.events:
            if kind != "presence":
                continue
            item = el.find(
                "{http://jabber.org/protocol/muc#user}x/{http://jabber.org/protocol/muc#user}item"
            )
            if item is not None and (item.get("jid") or "").split("/")[0].endswith(HIDDEN):
                out.append(el)
        return out

    def captions(self) -> list[dict]:
        out = []
        for _, kind, el in self.events:
            if kind == "message" and el.get("type") == "groupchat":
                jm = el.find(f"{{{JITMEET}}}json-message")
                if jm is not None and jm.text:
                    out.append(json.loads(jm.text))
        return out


async def wait_for(cond, limit: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def status_of(pres: ET.Element) -> str | None:
    ts = pres.find("{jabber:client}transcription-status")
    return ts.get("status") if ts is not None else None


@pytest.mark.slow
async def test_transcriber_occupant_in_a_real_prosody(tmp_path):
    prosody = make_prosody(tmp_path)
    prosody.start()
    prosody.register("transcriber", HIDDEN, "tsecret")
    prosody.register("alice", DOMAIN, "asecret")
    prosody.register("focus", DOMAIN, "fsecret")
    cfg = load_config(
        None,
        env={
            "CAPTIONS_SERVER_TOKEN": "t",
            "CAPTIONS_SERVER_GRPC_LISTEN": "127.0.0.1:0",
            "CAPTIONS_SERVER_HTTP_LISTEN": "127.0.0.1:0",
            "CAPTIONS_STORE_STORE_DIR": str(tmp_path / "store"),
            "CAPTIONS_XMPP_ENABLED": "true",
            "CAPTIONS_XMPP_JID": f"transcriber@{HIDDEN}",
            "CAPTIONS_XMPP_PASSWORD": "tsecret",
            "CAPTIONS_XMPP_HOST": "127.0.0.1",
            "CAPTIONS_XMPP_PORT": str(prosody.port),
            "CAPTIONS_XMPP_STARTTLS": "false",
            "CAPTIONS_XMPP_SEND_TEXT": "true",
            "CAPTIONS_XMPP_ADVERTISE_URL": "https://meet.example.org/transcripts/{transcript_id}",
        },
    )
    sidecar = Sidecar(cfg)
    alice = Participant_(f"alice@{DOMAIN}", "asecret", "a1b2c3d4", "Alice")
    focus = Participant_(f"focus@{DOMAIN}", "fsecret", "focus", "Focus")
    try:
        await sidecar.start()
        assert sidecar.occupant is not None and sidecar.occupant.online
        alice.connect("127.0.0.1", prosody.port)
        await asyncio.wait_for(alice.online.wait(), 10)
        # Alice is in (and owns) the room before the focus and the transcriber come
        await wait_for(
            lambda: any(
                k == "presence" and el.get("from") == f"{ROOM}/a1b2c3d4"
                for _, k, el in alice.events
            )
        )
        focus.connect("127.0.0.1", prosody.port)
        await asyncio.wait_for(focus.online.wait(), 10)
        await sidecar.rooms.update_roster(ROOM, [Participant("a1b2c3d4", "Alice")])
        await sidecar.rooms.start(ROOM, "captions")
        await sidecar.rooms.start(ROOM, "transcription")

        await wait_for(lambda: alice.transcriber_presences())
        pres = alice.transcriber_presences()[0]
        feats = {f.get("var") for f in pres.iter() if f.tag.endswith("}feature")}
        assert {
            "http://jitsi.org/protocol/jigasi",
            "http://jitsi.org/protocol/transcriber",
        } <= feats
        assert status_of(pres) == "ON"
        nick = pres.find("{http://jabber.org/protocol/nick}nick")
        assert nick is not None and nick.text == "Transcriber"
        transcriber_nick = pres.get("from").split("/")[1]

        # speech in, captions out through the MUC
        (wav, ref) = librivox()[0]
        pcm = load_audio(wav)
        import numpy as np

        packets = encode_opus(np.concatenate([pcm, np.zeros(24000, np.float32)]))
        await play(sidecar.rooms, ROOM, {"a1b2c3d4": packets})
        await wait_for(lambda: any(not c["is_interim"] for c in alice.captions()), 10)
        caps = alice.captions()
        for c in caps:
            assert c["type"] == "transcription-result"
            assert c["participant"]["id"] == "a1b2c3d4"
            assert c["participant"]["name"] == "Alice"
            assert c["language"] == "en-US"
            assert isinstance(c["timestamp"], int)
            assert isinstance(c["transcript"][0]["text"], str)
            assert isinstance(c["stability"], float) and isinstance(c["is_interim"], bool)
        final = [c for c in caps if not c["is_interim"]]
        assert len(final) == 1
        assert {c["message_id"] for c in caps} == {final[0]["message_id"]}
        assert jiwer.wer(normalise(ref), normalise(final[0]["transcript"][0]["text"])) < 0.25
        # the json-message comes from the transcriber's occupant JID, without a delay stamp
        for _, kind, el in alice.events:
            if kind == "message" and el.find(f"{{{JITMEET}}}json-message") is not None:
                assert el.get("from") == f"{ROOM}/{transcriber_nick}"
                assert el.find("{urn:xmpp:delay}delay") is None
        bodies = [el.find("{jabber:client}body") for _, k, el in alice.events if k == "message"]
        assert any(b is not None and b.text and b.text.startswith("Alice: ") for b in bodies)
        # the link to the transcript (Jigasi's ADVERTISE_URL), once
        tid = sidecar.rooms.get(ROOM).transcript_id
        links = [b.text for b in bodies if b is not None and b.text and tid in b.text]
        assert links == [
            f"The transcript of this meeting will be at https://meet.example.org/transcripts/{tid}"
        ]

        # Jicofo inviting the transcriber to a Jingle session: declined cleanly
        iq = focus.make_iq_set(ito=f"{ROOM}/{transcriber_nick}")
        j = ET.SubElement(iq.xml, "{urn:xmpp:jingle:1}jingle")
        j.set("action", "session-initiate")
        j.set("sid", "sid123")
        j.set("initiator", f"{ROOM}/focus")
        await iq.send(timeout=10)
        await wait_for(
            lambda: any(
                k == "iq"
                and el.find("{urn:xmpp:jingle:1}jingle") is not None
                and el.find("{urn:xmpp:jingle:1}jingle").get("action") == "session-terminate"
                for _, k, el in focus.events
            )
        )

        # a moderator removes the transcriber while captions are on: it comes back
        n_kick = len(alice.transcriber_presences())
        kick = alice.make_iq_set(ito=ROOM)
        q = ET.SubElement(kick.xml, "{http://jabber.org/protocol/muc#admin}query")
        item = ET.SubElement(q, "{http://jabber.org/protocol/muc#admin}item")
        item.set("nick", transcriber_nick)
        item.set("role", "none")
        await kick.send(timeout=10)
        await wait_for(
            lambda: any(
                el.get("type") == "unavailable" for el in alice.transcriber_presences()[n_kick:]
            )
        )
        await wait_for(
            lambda: (
                alice.transcriber_presences()[-1].get("type") != "unavailable"
                and status_of(alice.transcriber_presences()[-1]) == "ON"
            ),
            20,
        )

        # a lost connection: the occupant comes back into the room by itself
        n_before = len(alice.transcriber_presences())
        sidecar.occupant.client.transport.abort()
        await wait_for(
            lambda: any(
                el.get("type") == "unavailable" for el in alice.transcriber_presences()[n_before:]
            ),
            20,
        )
        await wait_for(
            lambda: any(
                el.get("type") != "unavailable" and status_of(el) == "ON"
                for el in alice.transcriber_presences()[n_before + 1 :]
            ),
            20,
        )

        # stopping: OFF before the occupant leaves
        await sidecar.rooms.stop(ROOM, "captions")
        await sidecar.rooms.stop(ROOM, "transcription")
        await wait_for(lambda: alice.transcriber_presences()[-1].get("type") == "unavailable")
        last = alice.transcriber_presences()
        assert status_of(last[-2]) == "OFF" and last[-2].get("type") != "unavailable"
    finally:
        alice.disconnect()
        focus.disconnect()
        await sidecar.stop()
        prosody.stop()
