"""mod_captions reloaded while a meeting runs, on whichever Prosody the tests
run (``PROSODY_BIN``: Debian's 0.12 by default, 13 with ``make
test-prosody13``).

An operator who upgrades the module reloads it (``prosodyctl shell
"module:reload('captions', 'conference.example.com')"``) instead of
restarting Prosody. The new instance knows nothing of the meetings in
progress; it rebuilds them from mod_muc's ``live_rooms()`` and each
occupant's last presence (``occupant:get_presence()``), the MUC internals
that this test holds to on both versions. Participants do not send a new
presence because a server module was reloaded, so without that a dial after
the reload would reach the sidecar with an empty roster (captions without
names) or be refused as coming from no occupant.
"""

from __future__ import annotations

import asyncio
import os
import re
import xml.etree.ElementTree as ET

from tests.jitsi_clients import RAYO, wait_for
from tests.prosody import MUC
from tests.test_prosody_module import (
    ALICE_AVATAR,
    ROOM,
    TRANSCRIBER,
    deployment,
    moderated_room,
    transcriber_here,
)


async def test_a_module_reloaded_mid_meeting_keeps_the_room_and_its_names(tmp_path):
    async with deployment(tmp_path, global_modules=("admin_shell",)) as d:
        sidecar = d.sidecar
        assert sidecar is not None
        version = re.search(r"Prosody version (\S+)", d.prosody.log())
        assert version, "no version in the Prosody log"
        expected = os.environ.get("PROSODY_EXPECT_VERSION")
        if expected:  # make test-prosody13: the Prosody asked for is the one running
            assert version[1].startswith(expected), (version[1], expected)

        focus, alice, bob = await moderated_room(d)
        # nothing asked for yet: the sidecar does not have the room
        assert ROOM not in sidecar.rooms.rooms

        out = await asyncio.to_thread(d.prosody.shell, f'module:reload("captions", "{MUC}")')
        assert "error" not in out.lower(), out
        await wait_for(
            lambda: d.prosody.log().count(f"Captions for {MUC} through") == 2, 10, "module reloaded"
        )

        # the moderator dials after the reload (her presence with
        # requestingTranscription is the only one sent since; Bob sends nothing)
        alice.set_property("requestingTranscription", "true")
        reply = await alice.dial()
        assert reply.get("type") == "result", ET.tostring(reply)
        ref = reply.find(f"{{{RAYO}}}ref")
        assert ref is not None and ref.get("uri") == f"xmpp:{TRANSCRIBER}"
        room = sidecar.rooms.get(ROOM)
        assert room.captioning
        # Bob's name can only have come from his stored presence
        assert set(room.roster) == {"a1b2c3d4", "b5e6f7a8"}
        assert room.roster["a1b2c3d4"].name == "Alice"
        assert room.roster["a1b2c3d4"].avatar_url == ALICE_AVATAR
        assert room.roster["b5e6f7a8"].name == "Bob"
        await wait_for(lambda: transcriber_here(bob), 10, "transcriber joined")

        # the rebuilt state follows the room on: the last requester stopping
        # ends captions, as before the reload
        alice.set_property("requestingTranscription", "false")
        await wait_for(lambda: not sidecar.rooms.get(ROOM).captioning, 10, "captions off")
        print(f"\nProsody {version[1]}: reload kept the room")
