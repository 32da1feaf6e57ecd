"""mod_captions on what a stock Jitsi install has: the export switched on
through the room metadata, locked and members-only rooms, tenant JIDs, token
features as Jitsi evaluates them.

Each test runs a real Prosody with the module and a real sidecar
(``tests/test_prosody_module.deployment``). The facts each one checks:

- Jicofo opens the videobridge export only while the room metadata has both
  ``asyncTranscription`` and ``recording.isTranscribingEnabled`` true (jicofo
  ``ChatRoomImpl.doSetRoomMetadata``); a dial answered without setting them
  brings the transcriber and no audio.
- lib-jitsi-meet's dial carries ``JvbRoomPassword`` for a locked room; the
  transcriber must still get in (Prosody's ``password.lib.lua`` refuses a join
  whose ``<x xmlns=muc>`` has no or a wrong password; ``members_only.lib.lua``
  refuses a non-member).
- ``JvbRoomName`` is the client-side JID; in multi-tenant deployments
  ``room@conference.TENANT.BASE`` is ``[TENANT]room@conference.BASE`` here
  (jitsi-meet ``mod_filter_iq_rayo`` through ``room_jid_match_rewrite``).
- jitsi-meet ``util.lib.lua`` ``is_feature_allowed``: a token features table
  without ``transcription`` denies it, whatever the role.
"""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET

from tests.jitsi_clients import RAYO, error_condition, error_text, wait_for
from tests.prosody import MUC
from tests.test_prosody_module import (
    ROOM,
    TRANSCRIBER,
    deployment,
    left_with_off,
    moderated_room,
    transcriber_here,
)


def room_lua(d, code: str, room: str = ROOM) -> str:  # type: ignore[no-untyped-def]
    """Lua inside Prosody with ``r`` bound to the room."""
    return d.prosody.shell(
        f'>local r = prosody.hosts["{MUC}"].modules.muc.get_room_from_jid("{room}"); ' + code
    )


async def metadata(d, expr: str, room: str = ROOM) -> str:  # type: ignore[no-untyped-def]
    out = await asyncio.to_thread(room_lua, d, f"return tostring({expr})", room)
    last = out.strip().splitlines()[-1] if out.strip() else ""
    return last.removeprefix("Result: ").strip()


def password_header(value: str) -> ET.Element:
    return ET.Element(f"{{{RAYO}}}header", {"name": "JvbRoomPassword", "value": value})


async def test_a_dial_turns_the_videobridge_export_on_and_off(tmp_path):
    """Default options: the CC button's dial must end in audio, so the module
    sets what Jicofo needs in the metadata, and clears it when captions stop."""
    async with deployment(tmp_path, global_modules=("admin_shell",)) as d:
        sidecar = d.sidecar
        assert sidecar is not None
        focus, alice, _bob = await moderated_room(d)
        assert await metadata(d, "r.jitsiMetadata and r.jitsiMetadata.asyncTranscription") != "true"

        alice.set_property("requestingTranscription", "true")
        reply = await alice.dial()
        assert reply.get("type") == "result", ET.tostring(reply)
        await wait_for(lambda: transcriber_here(alice), 10, "transcriber joined")

        async def export_state() -> tuple[str, str, str]:
            return (
                await metadata(d, "r.jitsiMetadata.asyncTranscription"),
                await metadata(d, "r.jitsiMetadata.recording.isTranscribingEnabled"),
                await metadata(d, "r.jitsiMetadata.transcription.urlParams.room"),
            )

        async def until(want, limit: float = 10.0):  # type: ignore[no-untyped-def]
            t = asyncio.get_running_loop().time() + limit
            while True:
                got = await export_state()
                if want(got) or asyncio.get_running_loop().time() > t:
                    return got
                await asyncio.sleep(0.2)

        got = await until(lambda g: g[0] == "true" and g[1] == "true")
        assert got == ("true", "true", ROOM), got

        # the last requester turns the CC off: captions stop, the export goes off
        alice.set_property("requestingTranscription", "false")
        await wait_for(lambda: left_with_off(focus), 10, "transcriber left")
        got = await until(lambda g: g[1] == "false")
        assert got[1] == "false", got
        assert got[0] == "nil", "asyncTranscription is restored to what it was"
        assert not sidecar.rooms.get(ROOM).captioning


async def test_the_recording_dialogs_switch_off_stops_a_dialled_transcriber(tmp_path):
    """A participant turning transcription off in the metadata (the recording
    dialog) stops what the dial started: Jicofo closes the export then."""
    async with deployment(tmp_path, global_modules=("admin_shell",)) as d:
        focus, alice, _bob = await moderated_room(d)
        alice.set_property("requestingTranscription", "true")
        assert (await alice.dial()).get("type") == "result"
        await wait_for(lambda: transcriber_here(alice), 10, "transcriber joined")
        await asyncio.to_thread(
            room_lua,
            d,
            "r.jitsiMetadata.recording = { isTranscribingEnabled = false }; "
            f'prosody.hosts["{MUC}"].events.fire_event("jitsi-metadata-updated", '
            '{ room = r, key = "recording", '
            'actor = r:get_occupant_by_nick(r.jid .. "/a1b2c3d4") }); '
            'return "ok"',
        )
        await wait_for(lambda: left_with_off(focus), 10, "transcriber left")


async def test_token_without_the_transcription_feature_is_refused(tmp_path):
    async with deployment(tmp_path, global_modules=("admin_shell",)) as d:
        _focus, alice, bob = await moderated_room(d)
        # a token with features, but not this one: Jitsi says no, moderator or not
        out = await asyncio.to_thread(
            d.prosody.shell,
            ">for _, s in pairs(prosody.full_sessions) do if s.username == 'alice' then "
            "s.jitsi_meet_context_features = { recording = true, livestreaming = 'true' } "
            "elseif s.username == 'bob' then "
            "s.granted_jitsi_meet_context_features = { transcription = true } end end; return 'ok'",
        )
        assert "ok" in out, out
        reply = await alice.dial()
        assert error_condition(reply) == "forbidden", ET.tostring(reply)
        assert "token" in error_text(reply)
        # features granted to the session (no token features) decide for a non-moderator
        reply = await bob.dial()
        assert reply.get("type") == "result", ET.tostring(reply)
        await wait_for(lambda: transcriber_here(alice), 10, "transcriber joined")


async def test_the_transcriber_gets_into_a_locked_room(tmp_path):
    async with deployment(tmp_path, global_modules=("admin_shell",)) as d:
        _focus, alice, _bob = await moderated_room(d)
        out = await asyncio.to_thread(room_lua, d, 'r:set_password("s3cret-42"); return "ok"')
        assert "ok" in out, out
        alice.set_property("requestingTranscription", "true")
        reply = await alice.dial(extra=[password_header("s3cret-42")])
        assert reply.get("type") == "result", ET.tostring(reply)
        await wait_for(lambda: transcriber_here(alice), 15, "transcriber joined the locked room")
        assert "s3cret-42" not in d.prosody.log().split("Transcription requested", 1)[-1]


async def test_the_transcriber_gets_into_a_members_only_room(tmp_path):
    """Jitsi's lobby makes the room members-only; the transcriber is let in as
    Jitsi's lobby module lets the whitelisted domains in."""
    async with deployment(tmp_path, global_modules=("admin_shell",)) as d:
        _focus, alice, _bob = await moderated_room(d)
        # as the lobby does: the people already in become members, then the room closes
        out = await asyncio.to_thread(
            room_lua,
            d,
            'for _, who in ipairs({ "alice@localhost", "bob@localhost" }) do '
            'r:set_affiliation(true, who, "member") end; r:set_members_only(true); return "ok"',
        )
        assert "ok" in out, out
        alice.set_property("requestingTranscription", "true")
        reply = await alice.dial()
        assert reply.get("type") == "result", ET.tostring(reply)
        await wait_for(
            lambda: transcriber_here(alice), 15, "transcriber joined the members-only room"
        )


async def test_a_tenant_rooms_dial_names_its_client_side_jid(tmp_path):
    tenant_room = f"[acme]standup@{MUC}"
    async with deployment(tmp_path, global_modules=("admin_shell",)) as d:
        sidecar = d.sidecar
        assert sidecar is not None
        focus = await d.focus(tenant_room)
        alice = await d.client("alice", "a1b2c3d4", "Alice", room=tenant_room)
        await focus.grant_moderator(alice.endpoint)
        # another tenant's room of the same name is not hers
        reply = await alice.dial("standup@conference.other.localhost")
        assert error_condition(reply) == "forbidden", ET.tostring(reply)
        # what lib-jitsi-meet sends in a tenant: the client-side JID
        alice.set_property("requestingTranscription", "true")
        reply = await alice.dial("standup@conference.acme.localhost")
        assert reply.get("type") == "result", ET.tostring(reply)
        assert reply.find(f"{{{RAYO}}}ref").get("uri") == f"xmpp:{TRANSCRIBER}"
        await wait_for(
            lambda: sidecar.rooms.get(tenant_room) is not None, 10, "room on the sidecar"
        )
        assert sidecar.rooms.get(tenant_room).captioning


async def test_captions_started_through_the_api_get_the_export_too(tmp_path):
    """An operator or integration starting captions on the sidecar directly:
    the module's health check follows it, so the audio comes as well."""
    async with deployment(tmp_path, global_modules=("admin_shell",)) as d:
        sidecar = d.sidecar
        assert sidecar is not None
        _focus, alice, _bob = await moderated_room(d)
        await sidecar.rooms.start(ROOM, "captions", requested_by="api")

        async def enabled() -> str:
            return await metadata(
                d,
                "r.jitsiMetadata and r.jitsiMetadata.recording "
                "and r.jitsiMetadata.recording.isTranscribingEnabled",
            )

        t = asyncio.get_running_loop().time() + 15
        while await enabled() != "true":
            assert asyncio.get_running_loop().time() < t, "the export was not turned on"
            await asyncio.sleep(0.3)
        # names reach the sidecar with it
        await wait_for(lambda: "a1b2c3d4" in sidecar.rooms.get(ROOM).roster, 10, "roster sent")

        await sidecar.rooms.stop(ROOM, "captions")
        t = asyncio.get_running_loop().time() + 15
        while await enabled() != "false":
            assert asyncio.get_running_loop().time() < t, "the export was not turned off"
            await asyncio.sleep(0.3)
        assert alice.occupant_jid  # still in the room, nothing else changed
