"""mod_captions in a real Prosody, with a real sidecar and Jitsi-like clients.

Each test starts Debian's Prosody with the repo's ``prosody-module`` on its
plugin path and ``captions`` enabled on the conference component, and (except
where the sidecar is the thing under test) a real :class:`Sidecar` whose
transcriber occupant logs into that Prosody. The clients behave like
lib-jitsi-meet (``tests/jitsi_clients.py``); a focus client plays Jicofo: it
creates each room as ``ROOM/focus`` from Jitsi's auth domain and grants the
moderator role with a MUC admin IQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from sidecar.audio import encode_opus, load_audio
from sidecar.config import Trigger, load_config
from sidecar.server import Sidecar
from tests.conftest import librivox, play
from tests.jitsi_clients import (
    RAYO,
    FocusClient,
    JitsiClient,
    error_condition,
    error_text,
    has_transcriber_feature,
    transcription_status,
    wait_for,
)
from tests.prosody import DOMAIN, HIDDEN, MUC, Prosody, free_port, make_prosody

PLUGINS = str(Path(__file__).resolve().parent.parent / "prosody-module")
AUTH = f"auth.{DOMAIN}"  # Jitsi's domain for the focus (and Jigasi)
ROOM = f"standup@{MUC}"
TRANSCRIBER = f"transcriber@{HIDDEN}"
TOKEN = "tok-5bd1c07e-never-in-a-log"
ALICE_AVATAR = "https://avatars.example.org/alice.png"


@dataclass
class Deployment:
    tmp_path: Path
    prosody: Prosody
    http_port: int
    grpc_port: int = field(default_factory=free_port)
    sidecar: Sidecar | None = None
    clients: list = field(default_factory=list)

    def sidecar_config(self):  # type: ignore[no-untyped-def]
        return load_config(
            None,
            env={
                "CAPTIONS_SERVER_TOKEN": TOKEN,
                "CAPTIONS_SERVER_GRPC_LISTEN": f"127.0.0.1:{self.grpc_port}",
                "CAPTIONS_SERVER_HTTP_LISTEN": f"127.0.0.1:{self.http_port}",
                "CAPTIONS_STORE_STORE_DIR": str(self.tmp_path / "store"),
                "CAPTIONS_XMPP_ENABLED": "true",
                "CAPTIONS_XMPP_JID": TRANSCRIBER,
                "CAPTIONS_XMPP_PASSWORD": "tsecret",
                "CAPTIONS_XMPP_HOST": "127.0.0.1",
                "CAPTIONS_XMPP_PORT": str(self.prosody.port),
                "CAPTIONS_XMPP_STARTTLS": "false",
            },
        )

    async def start_sidecar(self, *, preload: bool = False) -> Sidecar:
        sidecar = Sidecar(self.sidecar_config())
        await sidecar.start(preload=preload)
        assert (sidecar.ports.http, sidecar.ports.grpc) == (self.http_port, self.grpc_port)
        self.sidecar = sidecar
        return sidecar

    async def focus(self, room: str = ROOM) -> FocusClient:
        focus = FocusClient(f"focus@{AUTH}", "fsecret", room)
        self.clients.append(focus)
        await focus.start(self.prosody.port)
        await focus.create_room()
        return focus

    async def client(
        self, user: str, endpoint: str, name: str, room: str = ROOM, **kw: str
    ) -> JitsiClient:
        c = JitsiClient(f"{user}@{DOMAIN}", f"{user}-pw", room, endpoint, name, **kw)
        self.clients.append(c)
        await c.start(self.prosody.port)
        await c.join()
        return c


@contextlib.asynccontextmanager
async def deployment(
    tmp_path: Path,
    *,
    options: dict[str, str] | None = None,
    sidecar: bool = True,
    preload: bool = False,
    url: str | None = None,
    users: tuple[str, ...] = ("alice", "bob", "carol"),
    global_modules: tuple[str, ...] = (),
) -> AsyncIterator[Deployment]:
    """Prosody with mod_captions, a sidecar, accounts; everything stopped after.

    ``options``: module options (Lua literals) over the defaults below.
    """
    http_port = free_port()
    token_file = tmp_path / "captions-token"
    token_file.write_text(TOKEN + "\n")
    opts = {
        "captions_sidecar_url": f'"{url or f"http://127.0.0.1:{http_port}"}"',
        "captions_token_file": f'"{token_file}"',
        "captions_request_timeout": "2",
        "captions_retries": "2",
        "captions_retry_backoff": "0.1",
        "captions_health_check_interval": "1",
        "captions_exclude_domains": f'{{ "{AUTH}" }}',
    } | (options or {})
    prosody = make_prosody(
        tmp_path,
        plugin_paths=[PLUGINS],
        extra_modules=["captions"],
        extra_hosts=[AUTH],
        global_options='statistics = "internal"',
        global_modules=list(global_modules),
        muc_options="".join(f"  {k} = {v}\n" for k, v in opts.items()),
    )
    prosody.start()
    deadline = time.monotonic() + 10
    while f"Captions for {MUC} through" not in prosody.log():
        if time.monotonic() > deadline or "Error initializing module 'captions'" in prosody.log():
            prosody.stop()
            raise AssertionError("mod_captions did not load:\n" + _tail(prosody.log()))
        await asyncio.sleep(0.05)
    prosody.register("transcriber", HIDDEN, "tsecret")
    prosody.register("focus", AUTH, "fsecret")
    for user in users:
        prosody.register(user, DOMAIN, f"{user}-pw")
    d = Deployment(tmp_path, prosody, http_port)
    try:
        if sidecar:
            await d.start_sidecar(preload=preload)
        yield d
        log = prosody.log()
        assert "conference.localhost:captions" in log
        assert TOKEN not in log, "the sidecar token must never be logged"
        assert not re.search(r":captions\s+error|Traceback", log), _tail(log)
    finally:
        for c in d.clients:
            c.disconnect()
        if d.sidecar is not None:
            await d.sidecar.stop(grace=0.5)
        prosody.stop()


def _tail(log: str) -> str:
    return "\n".join(
        line for line in log.splitlines() if "captions" in line or not line[:3].isalpha()
    )[-4000:]


def transcriber_presences(c: JitsiClient | FocusClient) -> list[ET.Element]:
    out = []
    for _, kind, el in c.events:
        if kind == "presence" and (el.get("from") or "").startswith(ROOM + "/"):
            item = el.find(
                "{http://jabber.org/protocol/muc#user}x/{http://jabber.org/protocol/muc#user}item"
            )
            if item is not None and (item.get("jid") or "").startswith(TRANSCRIBER + "/"):
                out.append(el)
    return out


def transcriber_here(c: JitsiClient | FocusClient) -> bool:
    p = transcriber_presences(c)
    return bool(p) and p[-1].get("type") != "unavailable"


def left_with_off(c: JitsiClient | FocusClient) -> bool:
    """The transcriber's last presences: OFF, then unavailable."""
    p = transcriber_presences(c)
    return (
        len(p) >= 2
        and p[-1].get("type") == "unavailable"
        and transcription_status(p[-2]) == "OFF"
        and p[-2].get("type") != "unavailable"
    )


async def moderated_room(d: Deployment) -> tuple[FocusClient, JitsiClient, JitsiClient]:
    focus = await d.focus()
    alice = await d.client("alice", "a1b2c3d4", "Alice", avatar=ALICE_AVATAR)
    bob = await d.client("bob", "b5e6f7a8", "Bob")
    await focus.grant_moderator(alice.endpoint)
    return focus, alice, bob


async def quiet_for(seconds: float, cond) -> None:  # type: ignore[no-untyped-def]
    """cond stays false for that long."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        assert not cond()
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------


@pytest.mark.slow
async def test_dial_starts_captions_that_carry_roster_names_and_stop_without_requesters(
    tmp_path,
):
    async with deployment(tmp_path, preload=True) as d:
        sidecar = d.sidecar
        assert sidecar is not None
        focus, alice, bob = await moderated_room(d)

        # a participant who is not a moderator (and has no token) is refused
        bob.set_property("requestingTranscription", "true")
        reply = await bob.dial()
        assert error_condition(reply) == "forbidden", ET.tostring(reply)
        assert "moderator" in error_text(reply)
        assert ROOM not in sidecar.rooms.rooms

        # the moderator's dial: a result with the ref lib-jitsi-meet reads
        alice.set_property("requestingTranscription", "true")
        alice.set_property("transcription_language", "en-US")
        t0 = time.monotonic()
        reply = await alice.dial()
        dial_s = time.monotonic() - t0
        assert reply.get("type") == "result", ET.tostring(reply)
        ref = reply.find(f"{{{RAYO}}}ref")
        assert ref is not None and ref.get("uri") == f"xmpp:{TRANSCRIBER}"
        room = sidecar.rooms.get(ROOM)
        assert room.captioning and room.transcribing
        assert room.roster["a1b2c3d4"].name == "Alice"
        assert room.roster["a1b2c3d4"].avatar_url == ALICE_AVATAR
        assert room.roster["b5e6f7a8"].name == "Bob"
        assert set(room.roster) == {"a1b2c3d4", "b5e6f7a8"}  # no focus, no transcriber

        # the transcriber joins as Jigasi would
        join_s = await wait_for(lambda: transcriber_here(bob), 10, "transcriber joined")
        pres = transcriber_presences(bob)[-1]
        assert transcription_status(pres) == "ON" and has_transcriber_feature(pres)
        transcriber_occupant = pres.get("from")

        # a second dial while it is there: conflict, as Jicofo answers
        reply = await alice.dial()
        assert error_condition(reply) == "conflict"

        # Alice speaks: Bob gets json-message captions from the hidden
        # occupant, with the name the module put in the roster
        wav = next(w for w, _ in librivox() if w.name.endswith("0880.wav"))
        packets = encode_opus(np.concatenate([load_audio(wav), np.zeros(16000, np.float32)]))
        await play(sidecar.rooms, ROOM, {"a1b2c3d4": packets})
        await wait_for(
            lambda: any(not c["is_interim"] for _, c in bob.captions()), 15, "a final caption"
        )
        for sender, c in bob.captions():
            assert sender == transcriber_occupant
            assert c["participant"]["id"] == "a1b2c3d4"
            assert c["participant"]["name"] == "Alice"
            assert c["participant"].get("avatar_url", ALICE_AVATAR) == ALICE_AVATAR
        final = next(c for _, c in bob.captions() if not c["is_interim"])
        assert "young man" in final["transcript"][0]["text"].lower()

        # requesters turn captions off one by one: the transcriber leaves
        # (OFF first) only when the last one does
        bob.set_property("requestingTranscription", "false")
        await quiet_for(1.0, lambda: not transcriber_here(bob))
        alice.set_property("requestingTranscription", "false")
        off_s = await wait_for(lambda: left_with_off(bob), 10, "transcriber left with OFF")
        assert not sidecar.rooms.get(ROOM).active
        print(
            f"\ndial answered in {dial_s:.3f} s; transcriber in {join_s:.3f} s after that; "
            f"left {off_s:.3f} s after the last requester stopped"
        )


async def test_auto_start_on_the_first_participant(tmp_path):
    options = {"captions_captions_mode": '"auto-on"', "captions_trigger": '"automatic"'}
    async with deployment(tmp_path, options=options) as d:
        sidecar = d.sidecar
        assert sidecar is not None
        focus = await d.focus()
        # the focus alone is nobody
        await quiet_for(1.5, lambda: transcriber_here(focus))
        t0 = time.monotonic()
        alice = await d.client("alice", "a1b2c3d4", "Alice")
        await wait_for(lambda: transcriber_here(alice), 10, "transcriber joined")
        auto_s = time.monotonic() - t0
        room = sidecar.rooms.get(ROOM)
        assert room.captioning and not room.transcribing
        assert room.trigger == Trigger.AUTOMATIC
        assert room.roster["a1b2c3d4"].name == "Alice"

        # nobody's requestingTranscription turns an automatic room off
        alice.set_property("requestingTranscription", "true")
        alice.set_property("requestingTranscription", "false")
        await quiet_for(1.0, lambda: not transcriber_here(alice))
        assert sidecar.rooms.get(ROOM).captioning

        # the last participant leaves: EndRoom, the transcriber leaves with OFF
        alice.leave()
        await wait_for(lambda: left_with_off(focus), 10, "transcriber left")
        await wait_for(lambda: ROOM not in sidecar.rooms.rooms, 5, "room ended")
        print(f"\ntranscriber joined {auto_s:.3f} s after the first participant")


async def test_auto_start_on_the_second_participant(tmp_path):
    options = {
        "captions_captions_mode": '"auto-on"',
        "captions_transcription_mode": '"auto-on"',
        "captions_trigger": '"automatic-2nd-participant"',
    }
    async with deployment(tmp_path, options=options) as d:
        sidecar = d.sidecar
        assert sidecar is not None
        focus = await d.focus()
        alice = await d.client("alice", "a1b2c3d4", "Alice")
        await quiet_for(1.5, lambda: transcriber_here(alice))
        assert ROOM not in sidecar.rooms.rooms or not sidecar.rooms.rooms[ROOM].active
        t0 = time.monotonic()
        bob = await d.client("bob", "b5e6f7a8", "Bob")
        await wait_for(lambda: transcriber_here(alice), 10, "transcriber joined")
        auto_s = time.monotonic() - t0
        # the transcriber joins on StartTranscription; StartCaptions follows it
        await wait_for(lambda: sidecar.rooms.get(ROOM).captioning, 10, "captions on")
        room = sidecar.rooms.get(ROOM)
        assert room.captioning and room.transcribing
        assert room.trigger == Trigger.AUTOMATIC_2ND_PARTICIPANT
        assert {p.name for p in room.roster.values()} == {"Alice", "Bob"}

        # back to one participant: it stays on; then nobody: it ends
        bob.leave()
        await wait_for(lambda: "b5e6f7a8" not in sidecar.rooms.get(ROOM).roster, 5)
        await quiet_for(1.0, lambda: not transcriber_here(alice))
        alice.leave()
        await wait_for(lambda: left_with_off(focus), 10, "transcriber left")
        await wait_for(lambda: ROOM not in sidecar.rooms.rooms, 5, "room ended")
        print(f"\ntranscriber joined {auto_s:.3f} s after the second participant")


async def test_a_restarted_sidecar_gets_the_room_back_without_anyone_asking(tmp_path):
    async with deployment(tmp_path) as d:
        assert d.sidecar is not None
        focus, alice, bob = await moderated_room(d)
        alice.set_property("requestingTranscription", "true")
        reply = await alice.dial()
        assert reply.get("type") == "result", ET.tostring(reply)
        await wait_for(lambda: transcriber_here(bob), 10, "transcriber joined")
        bob.set_name("Robert")
        await wait_for(lambda: d.sidecar.rooms.get(ROOM).roster["b5e6f7a8"].name == "Robert", 5)

        # the sidecar goes away (its transcriber leaves) and comes back empty
        # on the same port
        await d.sidecar.stop(grace=0.5)
        d.sidecar = None
        await wait_for(lambda: not transcriber_here(bob), 10, "transcriber gone")
        await asyncio.sleep(1.5)  # a health check or two find nobody there
        t0 = time.monotonic()
        new = await d.start_sidecar()
        assert ROOM not in new.rooms.rooms
        await wait_for(lambda: transcriber_here(bob), 15, "transcriber back")
        back_s = time.monotonic() - t0
        room = new.rooms.get(ROOM)
        await wait_for(lambda: room.transcribing and room.captioning, 5, "both on again")
        assert {pid: p.name for pid, p in room.roster.items()} == {
            "a1b2c3d4": "Alice",
            "b5e6f7a8": "Robert",
        }
        assert transcription_status(transcriber_presences(bob)[-1]) == "ON"
        # nobody asked: no IQ after the first dial
        assert alice.iqs_sent == 1 and bob.iqs_sent == 0
        print(f"\ntranscriber back {back_s:.3f} s after the new sidecar started")


async def test_videobridge_path_follows_the_room_metadata(tmp_path):
    meeting_id = "3c9f1a52-7d1e-4b8a-9f0e-2a6b5c4d3e21"
    async with deployment(
        tmp_path, options={"captions_async_transcription": "true"}, global_modules=("admin_shell",)
    ) as d:
        sidecar = d.sidecar
        assert sidecar is not None
        focus = await d.focus()
        alice = await d.client("alice", "a1b2c3d4", "Alice")

        # Lua inside Prosody, as mod_muc_meeting_id and mod_room_metadata_component act
        def lua(code: str) -> str:
            room = f'local r = prosody.hosts["{MUC}"].modules.muc.get_room_from_jid("{ROOM}"); '
            return d.prosody.shell(">" + room + code)

        # the module marked the room at creation, so the CC button takes this path
        out = await asyncio.to_thread(lua, "return tostring(r.jitsiMetadata.asyncTranscription)")
        assert "true" in out, out

        # the moderator switches transcription on in the recording dialog: the
        # metadata component stores it and fires jitsi-metadata-updated
        t0 = time.monotonic()
        await asyncio.to_thread(
            lua,
            f'r._data.meetingId = "{meeting_id}"; '
            "r.jitsiMetadata.recording = { isTranscribingEnabled = true }; "
            f'prosody.hosts["{MUC}"].events.fire_event("jitsi-metadata-updated", '
            '{ room = r, key = "recording" }); return "ok"',
        )
        await wait_for(lambda: transcriber_here(alice), 10, "transcriber joined")
        on_s = time.monotonic() - t0
        # the transcriber joins on StartTranscription; StartCaptions follows it
        await wait_for(lambda: sidecar.rooms.get(ROOM).captioning, 10, "captions on")
        room = sidecar.rooms.get(ROOM)
        # a transcript, and the captions Jitsi shows from the same results
        await wait_for(lambda: room.transcribing and room.captioning, 10, "both on")
        # the export's URL names the room (Jicofo appends transcription.urlParams)
        out = await asyncio.to_thread(lua, "return r.jitsiMetadata.transcription.urlParams.room")
        assert ROOM in out, out
        # Jicofo's {{MEETING_ID}} WebSocket finds the room, with names for the endpoints
        assert sidecar.rooms.room_for_meeting(meeting_id) == ROOM
        assert room.roster["a1b2c3d4"].name == "Alice"

        # per-room settings put in the metadata server-side reach the sidecar
        await asyncio.to_thread(
            lua,
            'r.jitsiMetadata.captions = { language = "de", translation_languages = { "en" } }; '
            f'prosody.hosts["{MUC}"].events.fire_event("room-metadata-changed", {{ room = r }}); '
            'return "ok"',
        )
        await wait_for(lambda: sidecar.rooms.get(ROOM).effective.language == "de", 5)
        assert sidecar.rooms.get(ROOM).effective.translation_languages == ("en",)

        # switched off (an internal change this time): the transcript ends
        await asyncio.to_thread(
            lua,
            "r.jitsiMetadata.recording = { isTranscribingEnabled = false }; "
            f'prosody.hosts["{MUC}"].events.fire_event("room-metadata-changed", {{ room = r }}); '
            'return "ok"',
        )
        await wait_for(lambda: left_with_off(focus), 10, "transcriber left")
        assert not sidecar.rooms.get(ROOM).transcribing
        print(f"\ntranscriber joined {on_s:.3f} s after isTranscribingEnabled (incl. the shell)")


async def test_token_features_decide_over_the_role(tmp_path):
    async with deployment(tmp_path, global_modules=("admin_shell",)) as d:
        focus, alice, bob = await moderated_room(d)
        # what mod_auth_token puts on a session from the JWT's context.features
        out = await asyncio.to_thread(
            d.prosody.shell,
            ">for _, s in pairs(prosody.full_sessions) do if s.username == 'alice' then "
            "s.jitsi_meet_context_features = { transcription = false } "
            "elseif s.username == 'bob' then "
            "s.jitsi_meet_context_features = { transcription = 'true' } end end; return 'ok'",
        )
        assert "ok" in out, out
        reply = await alice.dial()  # a moderator whose token says no
        assert error_condition(reply) == "forbidden"
        assert "token" in error_text(reply)
        reply = await bob.dial()  # a participant whose token says yes
        assert reply.get("type") == "result", ET.tostring(reply)
        assert reply.find(f"{{{RAYO}}}ref").get("uri") == f"xmpp:{TRANSCRIBER}"
        await wait_for(lambda: transcriber_here(alice), 10, "transcriber joined")
        # the outcomes are on Prosody's own metrics
        stats = await asyncio.to_thread(d.prosody.shell, 'stats:show("captions")')
        for line in ("outcome=accepted", "outcome=forbidden", "method=StartCaptions code=OK"):
            assert line in stats, stats


async def test_dial_refusals_for_bad_input(tmp_path):
    async with deployment(tmp_path) as d:
        sidecar = d.sidecar
        assert sidecar is not None
        focus, alice, bob = await moderated_room(d)
        calls: list[str] = []
        for name in ("start", "update_roster", "update_settings"):
            orig = getattr(sidecar.rooms, name)

            def spy(*a, _orig=orig, _name=name, **kw):  # type: ignore[no-untyped-def]
                calls.append(_name)
                return _orig(*a, **kw)

            setattr(sidecar.rooms, name, spy)

        async def expect(iq, condition: str) -> None:  # type: ignore[no-untyped-def]
            reply = await alice.send_iq(iq)
            assert error_condition(reply) == condition, ET.tostring(reply)
            assert error_text(reply), "every refusal says why"

        # garbage inside the dial
        await expect(alice.dial_iq(None), "bad-request")  # no JvbRoomName
        junk = ET.Element(f"{{{RAYO}}}header", {"name": "JvbRoomName"})  # no value
        await expect(alice.dial_iq(None, extra=[junk]), "bad-request")
        await expect(alice.dial_iq("not a room@@/x"), "bad-request")
        await expect(alice.dial_iq(f"{MUC}"), "bad-request")  # a host, not a room
        twice = ET.Element(f"{{{RAYO}}}header", {"name": "JvbRoomName", "value": ROOM})
        await expect(alice.dial_iq(ROOM, extra=[twice]), "bad-request")
        noise = ET.Element("{urn:example:junk}blob")
        noise.text = "\u00e9" * 5000
        await expect(alice.dial_iq("\u00e9\u00e9@" + MUC, extra=[noise]), "forbidden")

        # a forged JvbRoomName: Alice moderates standup, names another room
        other = f"board@{MUC}"
        carol = await d.client("carol", "c9d0e1f2", "Carol", room=other)
        await expect(alice.dial_iq(other), "forbidden")
        # and a dial into a room she is not in
        await expect(alice.dial_iq(other, to=f"{other}/focus"), "forbidden")
        # a room that does not exist
        await expect(alice.dial_iq(f"nowhere@{MUC}", to=f"nowhere@{MUC}/focus"), "item-not-found")

        # a SIP dial-out is not ours: it goes through to the focus (Jicofo)
        reply = await alice.send_iq(alice.dial_iq(ROOM, target="+15551234567"))
        assert any(
            k == "iq" and el.find(f"{{{RAYO}}}dial[@to='+15551234567']") is not None
            for _, k, el in focus.events
        ), "the focus got the SIP dial"
        assert error_text(reply) == "no SIP gateway here (test focus)"  # the focus answered

        assert calls == [], "nothing reached the sidecar"
        assert not transcriber_here(bob) and not transcriber_here(carol)


async def test_a_presence_flood_is_coalesced_and_prosody_keeps_serving(tmp_path):
    async with deployment(tmp_path) as d:
        sidecar = d.sidecar
        assert sidecar is not None
        focus, alice, bob = await moderated_room(d)
        alice.set_property("requestingTranscription", "true")
        reply = await alice.dial()
        assert reply.get("type") == "result", ET.tostring(reply)
        await wait_for(lambda: transcriber_here(alice), 10, "transcriber joined")

        counts: dict[str, int] = {"update_roster": 0, "start": 0, "stop": 0}
        for name in counts:
            orig = getattr(sidecar.rooms, name)

            def spy(*a, _orig=orig, _name=name, **kw):  # type: ignore[no-untyped-def]
                counts[_name] += 1
                return _orig(*a, **kw)

            setattr(sidecar.rooms, name, spy)

        # 400 presences from Bob: new names, requestingTranscription toggled,
        # languages changed; Carol pings the server meanwhile
        carol = await d.client("carol", "c9d0e1f2", "Carol")
        n = 400
        rtts: list[float] = []

        async def pings() -> None:
            for _ in range(10):
                iq = carol.make_iq_get(ito=DOMAIN)
                iq.append(ET.Element("{urn:xmpp:ping}ping"))
                t = time.monotonic()
                reply = await carol.send_iq(iq, limit=10)
                assert reply.get("type") == "result"
                rtts.append(time.monotonic() - t)
                await asyncio.sleep(0.05)

        ping_task = asyncio.create_task(pings())
        t0 = time.monotonic()
        for i in range(n):
            bob.name = f"Bob {i}"
            bob.properties["requestingTranscription"] = "true" if i % 2 else "false"
            bob.properties["translation_language"] = ("de", "fr", "en")[i % 3]
            bob._presence(join=False).send()
            if i % 50 == 0:
                await asyncio.sleep(0)
        await ping_task
        await wait_for(
            lambda: sidecar.rooms.get(ROOM).roster["b5e6f7a8"].name == f"Bob {n - 1}",
            15,
            "the last name reached the sidecar",
        )
        flood_s = time.monotonic() - t0
        await asyncio.sleep(0.5)
        # Alice still requests: captions stayed on through the toggling
        assert transcriber_here(alice)
        room = sidecar.rooms.get(ROOM)
        assert room.captioning and room.transcribing
        assert counts["start"] == 0 and counts["stop"] == 0
        assert counts["update_roster"] < n // 4, counts
        assert max(rtts) < 3.0, rtts  # not blocked (a blocked loop waits for the flood)
        # the requesters' languages became the room's settings: Bob (last
        # requesting) reads German, nobody said what is spoken yet
        assert room.room_settings.translation_languages == ("de",)
        alice.set_property("transcription_language", "fr-FR")
        await wait_for(lambda: sidecar.rooms.get(ROOM).room_settings.language == "fr-FR", 5)
        assert sidecar.rooms.get(ROOM).effective.language == "fr-FR"
        print(
            f"\n{n} presences in {flood_s:.2f} s -> {counts['update_roster']} UpdateRoster calls;"
            f" pings during the flood: max {max(rtts) * 1000:.0f} ms"
        )


async def test_a_hanging_sidecar_times_out_and_prosody_keeps_serving(tmp_path):
    # a TCP server that accepts and never answers
    conns: list[asyncio.StreamWriter] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(writer)
        with contextlib.suppress(Exception):
            await reader.read(65536)
            await asyncio.sleep(3600)

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with deployment(
            tmp_path,
            sidecar=False,
            url=f"http://127.0.0.1:{port}",
            options={"captions_request_timeout": "1.5"},
        ) as d:
            focus, alice, bob = await moderated_room(d)
            alice.set_property("requestingTranscription", "true")
            t0 = time.monotonic()
            dial = asyncio.create_task(alice.dial())
            # while the dial waits for the sidecar, Prosody serves others
            rtts = []
            while not dial.done():
                iq = bob.make_iq_get(ito=DOMAIN)
                iq.append(ET.Element("{urn:xmpp:ping}ping"))
                t = time.monotonic()
                assert (await bob.send_iq(iq, limit=5)).get("type") == "result"
                rtts.append(time.monotonic() - t)
                await asyncio.sleep(0.1)
            reply = dial.result()
            dial_s = time.monotonic() - t0
            assert error_condition(reply) == "service-unavailable", ET.tostring(reply)
            assert "DEADLINE_EXCEEDED" in error_text(reply)
            assert 1.4 <= dial_s < 3.5, dial_s
            assert conns, "the module did connect"
            assert len(rtts) >= 5 and max(rtts) < 1.0, rtts
            # the room is not left half-on: a later dial tries again
            t0 = time.monotonic()
            reply = await alice.dial()
            assert error_condition(reply) == "service-unavailable"
            print(
                f"\ndial refused after {dial_s:.2f} s (timeout 1.5 s); {len(rtts)} pings"
                f" meanwhile, max {max(rtts) * 1000:.0f} ms"
            )
    finally:
        for w in conns:
            w.close()
        server.close()


async def test_a_room_no_meeting_owns_is_ended_on_the_sidecar(tmp_path):
    """After a Prosody restart the sidecar may still serve rooms nobody is in."""
    async with deployment(tmp_path) as d:
        sidecar = d.sidecar
        assert sidecar is not None
        ghost = f"ghost@{MUC}"
        await sidecar.rooms.start(ghost, "transcription", requested_by="prosody")
        await sidecar.rooms.start("elsewhere@conference.other", "transcription")
        await wait_for(lambda: ghost not in sidecar.rooms.rooms, 15, "orphan ended")
        # rooms of other hosts are not this module's business
        assert "elsewhere@conference.other" in sidecar.rooms.rooms
        metas = {m.room: m for m in sidecar.store.list()}
        assert metas[ghost].complete  # its transcript was closed, not left open
