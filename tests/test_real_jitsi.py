"""Captions on a Jitsi-like deployment: every way of asking ends in captions.

Real Prosody 0.12 with mod_captions and the test plugins a stock Jitsi has
(room metadata component, meeting id, token features; ``tests/standins``),
the Jicofo stand-in as the focus (it reads the room metadata only from the
component and opens the videobridge export only under Jicofo's conditions),
the videobridge stand-in playing the participants' speech as real-time Opus
over the export WebSocket, the real sidecar with Whisper tiny.en and its
transcriber occupant, and Jitsi-like clients (lib-jitsi-meet's presence, dial
IQ and metadata messages).

A participant sees a caption on two carriers: json-message from the hidden
transcriber in the MUC, and EndpointMessage from "transcriber" relayed by
the bridge. Each utterance's final must arrive once, counting both.
"""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from collections import Counter
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from sidecar.sim.voices import synthesize
from tests.conftest import normalise
from tests.jitsi_clients import (
    MUC_ADMIN,
    MUC_USER,
    RAYO,
    JitsiClient,
    error_condition,
    wait_for,
)
from tests.prosody import HIDDEN, MUC
from tests.standins.deployment import METADATA, JitsiDeployment, jitsi_deployment
from tests.standins.jicofo import (
    Conference,
    JicofoConfig,
    MetadataError,
    TranscriptionConfig,
    java_url_encode,
    parse_room_metadata,
    room_jid_match_rewrite,
)

ROOM = f"standup@{MUC}"
TRANSCRIBER = f"transcriber@{HIDDEN}"
ALICE, BOB, CAROL = "a1b2c3d4", "b5e6f7a8", "c9d0e1f2"
SAY_ALICE = "The new release is ready for testing on Monday."
SAY_BOB = "I will prepare the test servers this afternoon."
LONG = 60  # seconds: generous waits for a loaded 2-core machine


# -- helpers -------------------------------------------------------------------
def _role(c: JitsiClient) -> tuple[str, str]:
    p = c.presences_from(c.occupant_jid)
    item = p[-1].find(f"{{{MUC_USER}}}x/{{{MUC_USER}}}item") if p else None
    return (item.get("role", ""), item.get("affiliation", "")) if item is not None else ("", "")


async def room_with_three(
    d: JitsiDeployment, room: str = ROOM
) -> tuple[Conference, JitsiClient, JitsiClient, JitsiClient]:
    """Jicofo creates the room; Alice (first in: owner by auto-owner), Bob
    and Carol join; Jicofo invites them to Jingle and they accept."""
    assert d.jicofo is not None
    conf = await d.jicofo.conference(room)
    alice = await d.client("alice", ALICE, "Alice", room=room)
    await wait_for(lambda: _role(alice) == ("moderator", "owner"), LONG, "Alice owner")
    bob = await d.client("bob", BOB, "Bob", room=room)
    carol = await d.client("carol", CAROL, "Carol", room=room)
    await wait_for(
        lambda: all(conf.invited.get(e) and conf.invited[e].accepted for e in (ALICE, BOB, CAROL)),
        LONG,
        "Jingle sessions accepted",
    )
    return conf, alice, bob, carol


def transcriber_nick(conf: Conference) -> str | None:
    return next((m.nick for m in conf.members.values() if m.jid.startswith(TRANSCRIBER)), None)


def finals(conf: Conference, c: JitsiClient) -> list[tuple[str, dict[str, Any]]]:
    """(carrier, caption) of every non-empty final the client got, over the
    MUC and over the bridge's data channel."""
    out = [("muc", j) for _, j in c.captions() if j.get("type") == "transcription-result"]
    if conf.bridge is not None:
        out += [("bridge", j) for j in conf.bridge.captions_at(c.endpoint)]
    return [
        (carrier, j)
        for carrier, j in out
        if not j.get("is_interim") and (j.get("transcript") or [{}])[0].get("text", "").strip()
    ]


async def speak(conf: Conference, turns: list[tuple[str, str]]) -> None:
    """The bridge plays the turns, one after another, in real time."""
    assert conf.bridge is not None
    voices = {ALICE: "en-us+m3", BOB: "en-us+f3"}
    gap = np.zeros(16000, np.float32)
    tracks: dict[str, list[np.ndarray]] = {ep: [] for ep, _ in turns}
    for ep, text in turns:
        pcm = await asyncio.to_thread(synthesize, text, voices.get(ep, "en-us+m3"))
        for other in tracks:
            tracks[other].append(pcm * 0.8 if other == ep else np.zeros_like(pcm))
            tracks[other].append(gap)
    await conf.bridge.play({ep: np.concatenate([gap, *t]) for ep, t in tracks.items()})


async def export_open(conf: Conference, why: str) -> None:
    await wait_for(
        lambda: (
            conf.bridge is not None
            and conf.bridge.exporter is not None
            and conf.bridge.exporter.is_connected
        ),
        LONG,
        f"the videobridge export socket open ({why}); Jicofo transcribing="
        f"{conf.enable_transcription}, metadata={conf.metadata}",
    )


async def captions_once(conf: Conference, viewer: JitsiClient, expect: dict[str, str]) -> None:
    """Every expected speaker's words reach the viewer; each final once."""
    names = {ALICE: "Alice", BOB: "Bob"}

    def have() -> bool:
        got = {j["participant"]["id"] for _, j in finals(conf, viewer)}
        return set(expect) <= got

    await wait_for(have, LONG, f"finals of {sorted(expect)} at {viewer.name}")
    await asyncio.sleep(3)  # late duplicates, on either carrier
    got = finals(conf, viewer)
    counts = Counter(j["message_id"] for _, j in got)
    dupes = {m: [c for c, j in got if j["message_id"] == m] for m, n in counts.items() if n > 1}
    assert not dupes, f"finals shown more than once (message id: carriers): {dupes}"
    for ep, text in expect.items():
        said = " ".join(j["transcript"][0]["text"] for _, j in got if j["participant"]["id"] == ep)
        words = set(normalise(text).split())
        heard = set(normalise(said).split())
        assert len(words & heard) >= len(words) // 2, (ep, text, said)
        assert all(
            j["participant"].get("name") == names[ep]
            for _, j in got
            if j["participant"]["id"] == ep
        )


async def press_cc(alice: JitsiClient, **dial: Any) -> ET.Element:
    """jitsi-meet's subtitles middleware: requestingTranscription, then the
    rayo dial to the focus (strophe.rayo.ts)."""
    alice.set_property("requestingTranscription", "true")
    return await alice.dial(**dial)


def dial_ok(reply: ET.Element) -> None:
    assert reply.get("type") == "result", ET.tostring(reply)
    ref = reply.find(f"{{{RAYO}}}ref")
    assert ref is not None and ref.get("uri", "").startswith("xmpp:"), ET.tostring(reply)


async def transcriber_declined_jingle(conf: Conference) -> None:
    await wait_for(lambda: transcriber_nick(conf) is not None, LONG, "transcriber in the room")
    nick = transcriber_nick(conf)
    assert nick is not None
    await wait_for(
        lambda: nick in conf.invited and conf.invited[nick].declined,
        LONG,
        "Jicofo invited the transcriber to Jingle and it declined",
    )


# -- the component and the stand-ins on their own (fast) -------------------------
async def test_metadata_component_and_jicofo_follow_jitsi(tmp_path):
    async with jitsi_deployment(tmp_path, preload=False) as d:
        assert d.jicofo is not None
        # Jicofo found the component as XmppProvider does
        assert ("room_metadata", METADATA) in d.jicofo.components
        conf = await d.jicofo.conference(ROOM)
        alice = await d.client("alice", ALICE, "Alice")
        await wait_for(lambda: _role(alice) == ("moderator", "owner"), LONG, "auto-owner")
        bob = await d.client("bob", BOB, "Bob")
        # the meeting id Jicofo read from the config form is the room's disco one
        disco = bob.make_iq_get(ito=ROOM)
        ET.SubElement(disco.xml, "{http://jabber.org/protocol/disco#info}query")
        info = await bob.send_iq(disco)
        values = [
            f.findtext("{jabber:x:data}value")
            for f in info.iter("{jabber:x:data}field")
            if f.get("var") == "muc#roominfo_meetingId"
        ]
        assert values == [conf.meeting_id] and len(conf.meeting_id or "") == 36
        # a newcomer gets the metadata at once
        await wait_for(lambda: bob.room_metadata(METADATA), LONG, "initial metadata")
        # two members: Jicofo invites both, they accept, the bridge knows their sources
        await wait_for(
            lambda: len(conf.invited) == 2 and all(r.accepted for r in conf.invited.values()), LONG
        )
        assert conf.bridge is not None
        assert [s.name for s in conf.bridge.endpoints[BOB].sources] == [f"{BOB}-a0"]

        # a moderator's key is stored and broadcast to everyone, Jicofo included
        alice.set_room_metadata(METADATA, "whiteboard", {"collabServerUrl": "https://wb.example"})

        def has_wb(mds: list[dict]) -> bool:
            return any("whiteboard" in m["metadata"] for m in mds)

        await wait_for(lambda: has_wb(bob.room_metadata(METADATA)), LONG, "broadcast")
        await wait_for(lambda: conf.metadata_received > 0, LONG, "Jicofo got the metadata")
        # the same value again: no broadcast; blocked keys and non-moderators refused
        n = len(bob.room_metadata(METADATA))
        alice.set_room_metadata(METADATA, "whiteboard", {"collabServerUrl": "https://wb.example"})
        alice.set_room_metadata(METADATA, "asyncTranscription", True)
        alice.set_room_metadata(METADATA, "transcription", {"urlParams": {"room": "x"}})
        bob.set_room_metadata(METADATA, "whiteboard", {"collabServerUrl": "https://evil.example"})
        await asyncio.sleep(2)
        assert len(bob.room_metadata(METADATA)) == n
        assert not any(
            "asyncTranscription" in m["metadata"] or "transcription" in m["metadata"]
            for m in bob.room_metadata(METADATA)
        )
        # metadata from anyone but the component is not Jicofo's business
        forged = bob.make_message(mto=d.jicofo.boundjid)
        jm = ET.SubElement(forged.xml, "{http://jitsi.org/jitmeet}json-message")
        jm.set("room", ROOM)
        jm.text = (
            '{"type":"room_metadata","metadata":{"asyncTranscription":true,'
            '"recording":{"isTranscribingEnabled":true}}}'
        )
        forged.send()
        jicofo = d.jicofo
        await wait_for(lambda: jicofo.metadata_dropped, LONG, "forged metadata dropped")
        assert conf.enable_transcription is False


def test_jicofo_transcribes_only_under_its_conditions():
    """ChatRoomImpl.doSetRoomMetadata and JitsiMeetConferenceImpl's URL rules,
    on the stand-in alone."""
    jicofo = SimpleNamespace(
        config=JicofoConfig(
            transcription=TranscriptionConfig(
                url_template="ws://h:1/mediajson/{{MEETING_ID}}?x=1",
                http_headers={"Authorization": "Bearer t", "X-A": "a"},
            )
        )
    )
    conf = Conference(jicofo, ROOM)  # type: ignore[arg-type]
    conf.meeting_id = "m-1"

    def md(text: str) -> None:
        conf.set_room_metadata(parse_room_metadata(text))

    md('{"type":"room_metadata","metadata":{"recording":{"isTranscribingEnabled":true}}}')
    assert conf.enable_transcription is False  # no asyncTranscription
    md('{"type":"room_metadata","metadata":{"asyncTranscription":true}}')
    assert conf.enable_transcription is False  # not switched on
    md(
        '{"type":"room_metadata","metadata":{"asyncTranscription":true,'
        '"recording":{"isTranscribingEnabled":true},"transcription":{"urlParams":'
        '{"room":"[t]r@conference.localhost"},"httpHeaders":{"X-A":"b"}}}}'
    )
    assert conf.enable_transcription is True
    assert conf.transcriber_url == (
        "ws://h:1/mediajson/m-1?x=1&room=%5Bt%5Dr%40conference.localhost"
    )
    assert conf.transcriber_headers == {"Authorization": "Bearer t", "X-A": "b"}
    md('{"type":"room_metadata","metadata":{"asyncTranscription":true,"recording":{}}}')
    assert conf.enable_transcription is False and conf.transcriber_url is None
    # what Jackson would not map is dropped whole
    for bad in (
        '{"type":"room_metadata","metadata":{"recording":[]}}',
        '{"type":"room_metadata","metadata":{"transcription":{"urlParams":[]}}}',
        '{"type":"room_metadata","metadata":{"asyncTranscription":"yes"}}',
        '{"type":"room_metadata","metadata":{},"metadata":{}}',
        '{"metadata":{"asyncTranscription":true}}',
    ):
        with pytest.raises(MetadataError):
            parse_room_metadata(bad)
    assert java_url_encode("a b~*é") == "a+b%7E*%C3%A9"
    assert room_jid_match_rewrite("r@conference.acme.localhost", "localhost") == (
        "[acme]r@conference.localhost"
    )


# -- end to end, the CC button -----------------------------------------------------
@pytest.mark.slow
async def test_cc_with_default_options_brings_captions_once(tmp_path):
    """(a) Today's default module options; a moderator presses CC."""
    async with jitsi_deployment(tmp_path) as d:
        conf, alice, bob, carol = await room_with_three(d)
        dial_ok(await press_cc(alice))
        await transcriber_declined_jingle(conf)
        await export_open(conf, "after the CC dial")
        assert conf.bridge is not None and conf.bridge.exporter is not None
        url = conf.bridge.exporter.connect.url
        assert url.startswith(f"ws://127.0.0.1:{d.http_port}/mediajson/{conf.meeting_id}"), url
        await speak(conf, [(ALICE, SAY_ALICE), (BOB, SAY_BOB)])
        await captions_once(conf, carol, {ALICE: SAY_ALICE, BOB: SAY_BOB})
        # whatever the service answered on the socket parsed as the bridge parses it
        assert conf.bridge.exporter.parse_failures == 0


async def grant_member(owner: JitsiClient, user_jid: str) -> None:
    """What the lobby does when a moderator admits someone: affiliation member."""
    iq = owner.make_iq_set(ito=owner.room)
    item = ET.SubElement(ET.SubElement(iq.xml, f"{{{MUC_ADMIN}}}query"), f"{{{MUC_ADMIN}}}item")
    item.set("affiliation", "member")
    item.set("jid", user_jid)
    reply = await owner.send_iq(iq)
    assert reply.get("type") == "result", ET.tostring(reply)


@pytest.mark.slow
async def test_cc_in_a_password_room(tmp_path):
    """(b) The room is locked; the dial carries JvbRoomPassword."""
    async with jitsi_deployment(tmp_path) as d:
        conf, alice, bob, carol = await room_with_three(d)
        reply = await alice.configure_room(
            {"muc#roomconfig_passwordprotectedroom": "1", "muc#roomconfig_roomsecret": "s3cret"}
        )
        assert reply.get("type") == "result", ET.tostring(reply)
        # the lock holds: somebody without the password is refused
        stranger = JitsiClient("carol@localhost", "carol-pw", ROOM, "deadbeef", "Stranger")
        d.clients.append(stranger)
        await stranger.start(d.prosody.port)
        stranger._presence(join=True).send()
        await wait_for(
            lambda: any(
                p.get("type") == "error" for p in stranger.presences_from(stranger.occupant_jid)
            ),
            LONG,
            "join without the password refused",
        )
        dial_ok(await press_cc(alice, password="s3cret"))
        await transcriber_declined_jingle(conf)
        await export_open(conf, "password room")
        await speak(conf, [(ALICE, SAY_ALICE)])
        await captions_once(conf, carol, {ALICE: SAY_ALICE})


@pytest.mark.slow
async def test_cc_in_a_members_only_room(tmp_path):
    """(c) A lobby-like room: members only, the participants admitted."""
    async with jitsi_deployment(tmp_path) as d:
        conf, alice, bob, carol = await room_with_three(d)
        for user in ("bob", "carol"):
            await grant_member(alice, f"{user}@localhost")
        reply = await alice.configure_room({"muc#roomconfig_membersonly": "1"})
        assert reply.get("type") == "result", ET.tostring(reply)
        await asyncio.sleep(1)
        assert all(_role(c)[0] for c in (bob, carol)), "members stay in"
        dial_ok(await press_cc(alice))
        await transcriber_declined_jingle(conf)
        await export_open(conf, "members-only room")
        await speak(conf, [(BOB, SAY_BOB)])
        await captions_once(conf, carol, {BOB: SAY_BOB})


@pytest.mark.slow
async def test_cc_in_a_tenant_room(tmp_path):
    """(d) Multi-tenant: the room is [acme]standup@conference.localhost inside
    Prosody; the client's JvbRoomName is standup@conference.acme.localhost
    (mod_filter_iq_rayo compares with room_jid_match_rewrite)."""
    internal = f"[acme]standup@{MUC}"
    async with jitsi_deployment(tmp_path) as d:
        conf, alice, bob, carol = await room_with_three(d, room=internal)
        dial_ok(await press_cc(alice, room_name="standup@conference.acme.localhost"))
        await transcriber_declined_jingle(conf)
        await export_open(conf, "tenant room")
        await speak(conf, [(ALICE, SAY_ALICE)])
        await captions_once(conf, carol, {ALICE: SAY_ALICE})


async def test_a_token_without_the_transcription_feature_is_refused(tmp_path):
    """(e) Jitsi's is_feature_allowed: a features table without
    "transcription" means no, even for a moderator; with it, yes, even for a
    participant who is not one."""
    tokens = {
        "alice": {"recording": "true", "livestreaming": True},
        "carol": {"transcription": "true"},
    }
    async with jitsi_deployment(tmp_path, preload=False, tokens=tokens) as d:
        conf, alice, bob, carol = await room_with_three(d)
        reply = await press_cc(alice)
        assert error_condition(reply) == "forbidden", ET.tostring(reply)
        await asyncio.sleep(3)
        assert transcriber_nick(conf) is None
        assert conf.enable_transcription is False
        assert conf.bridge is not None and conf.bridge.exporter is None
        # Bob: no token, not a moderator
        assert error_condition(await press_cc(bob)) == "forbidden"
        # Carol: not a moderator, her token allows it
        assert _role(carol)[0] == "participant"
        dial_ok(await press_cc(carol))
        await wait_for(lambda: transcriber_nick(conf) is not None, LONG, "transcriber joined")


@pytest.mark.slow
async def test_metadata_path_turns_the_export_on_and_off(tmp_path):
    """(f) asyncTranscription set by the module option; the moderator's
    recording dialog switches transcription on, then off."""
    async with jitsi_deployment(tmp_path, options={"captions_async_transcription": "true"}) as d:
        conf, alice, bob, carol = await room_with_three(d)
        await wait_for(
            lambda: any(
                m["metadata"].get("asyncTranscription") is True
                for m in carol.room_metadata(METADATA)
            ),
            LONG,
            "asyncTranscription in the room metadata",
        )
        alice.set_room_metadata(METADATA, "recording", {"isTranscribingEnabled": True})
        await export_open(conf, "isTranscribingEnabled true")
        await speak(conf, [(ALICE, SAY_ALICE)])
        await captions_once(conf, carol, {ALICE: SAY_ALICE})

        alice.set_room_metadata(METADATA, "recording", {"isTranscribingEnabled": False})
        exporter = conf.bridge.exporter if conf.bridge else None
        assert exporter is not None
        await wait_for(lambda: conf.enable_transcription is False, LONG, "Jicofo: transcribing off")
        await wait_for(lambda: exporter.closed.is_set(), LONG, "the export socket closed")
        assert exporter.events("session-end"), "the bridge ended the session"
        assert exporter.closes_sent == [(1001, "closing")]
        assert conf.bridge is not None and conf.bridge.exporter is None
        before = len(finals(conf, carol)) + len([c for _, c in carol.captions()])
        await speak(conf, [(BOB, SAY_BOB)])
        await asyncio.sleep(5)
        assert len(finals(conf, carol)) + len([c for _, c in carol.captions()]) == before


@pytest.mark.slow
async def test_captions_go_on_after_the_bridge_reconnects(tmp_path):
    """The export socket drops mid-meeting; the bridge reconnects at once with a
    new serializer (start again, sequence numbers and timestamps anew, as
    Exporter.onWebSocketOpen does) and the next words are captioned."""
    async with jitsi_deployment(tmp_path) as d:
        conf, alice, bob, carol = await room_with_three(d)
        dial_ok(await press_cc(alice))
        await export_open(conf, "after the CC dial")
        await speak(conf, [(ALICE, SAY_ALICE)])
        await captions_once(conf, carol, {ALICE: SAY_ALICE})
        ex = conf.bridge.exporter if conf.bridge else None
        assert ex is not None and ex.ws is not None
        await ex.ws.close()  # as a network drop looks to the bridge
        await wait_for(lambda: ex.connections == 2 and ex.is_connected, LONG, "reconnected")
        await speak(conf, [(BOB, SAY_BOB)])
        await captions_once(conf, carol, {ALICE: SAY_ALICE, BOB: SAY_BOB})
        assert len(ex.events("info")) == 2 and ex.parse_failures == 0
