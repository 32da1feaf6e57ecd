"""The transcriber occupant and locked rooms, in a real Prosody.

A password-protected room refuses a join without the password
(``not-authorized``), a members-only room (what Jitsi's lobby makes of a
room) one from a non-member (``registration-required``), XEP-0045 7.2.5 and
7.2.6. The occupant must then not hammer the room: it backs off (capped),
says why once, in the log and in the room status, and the room's captions
do not pretend to go through the MUC. With the start call's room password
(the dial's ``JvbRoomPassword``), or once whitelisted, it gets in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import xml.etree.ElementTree as ET

import grpc
import pytest
from prometheus_client import REGISTRY

from sidecar.config import load_config
from sidecar.proto.captions.v1 import captions_pb2 as pb
from sidecar.proto.captions.v1 import captions_pb2_grpc
from sidecar.server import Sidecar
from tests.jitsi_clients import JitsiClient, wait_for
from tests.prosody import DOMAIN, HIDDEN, MUC, make_prosody
from tests.test_carriers import sidecar_env
from tests.test_mediajson import TOKEN

MUC_OWNER = "http://jabber.org/protocol/muc#owner"
MUC_ADMIN = "http://jabber.org/protocol/muc#admin"
XDATA = "jabber:x:data"
ALICE = "a1b2c3d4"


async def configure(owner: JitsiClient, **fields: str) -> None:
    """The owner submits the room configuration form (XEP-0045 10.2)."""
    iq = owner.make_iq_set(ito=owner.room)
    query = ET.SubElement(iq.xml, f"{{{MUC_OWNER}}}query")
    x = ET.SubElement(query, f"{{{XDATA}}}x", {"type": "submit"})
    values = {"FORM_TYPE": "http://jabber.org/protocol/muc#roomconfig"}
    values |= {f"muc#roomconfig_{k}": v for k, v in fields.items()}
    for var, value in values.items():
        f = ET.SubElement(x, f"{{{XDATA}}}field", {"var": var})
        ET.SubElement(f, f"{{{XDATA}}}value").text = value
    reply = await owner.send_iq(iq)
    assert reply.get("type") == "result", ET.tostring(reply)


def refusals(condition: str) -> float:
    return (
        REGISTRY.get_sample_value("captions_xmpp_join_refused_total", {"condition": condition})
        or 0.0
    )


def refusal_lines(caplog: pytest.LogCaptureFixture, room: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and f"cannot join {room}" in r.getMessage()
    ]


@pytest.fixture
async def world(tmp_path):
    prosody = make_prosody(tmp_path)
    prosody.start()
    prosody.register("transcriber", HIDDEN, "tsecret")
    prosody.register("alice", DOMAIN, "asecret")
    sidecar = Sidecar(load_config(None, env=sidecar_env(tmp_path, prosody)))
    await sidecar.start(preload=False)
    assert sidecar.occupant is not None
    # short waits between tries, so the test sees several (the default is 2 s
    # doubling up to 300 s)
    sidecar.occupant.options = dataclasses.replace(
        sidecar.occupant.options, rejoin_base_s=0.2, rejoin_max_s=0.4
    )
    clients: list[JitsiClient] = []
    yield prosody, sidecar, clients
    for c in clients:
        c.disconnect()
    await sidecar.stop()
    prosody.stop()


async def test_password_room_refused_then_joined_with_the_start_calls_password(world, caplog):
    prosody, sidecar, clients = world
    caplog.set_level(logging.INFO)
    room = f"locked@{MUC}"
    alice = JitsiClient(f"alice@{DOMAIN}", "asecret", room, ALICE, "Alice")
    clients.append(alice)
    await alice.start(prosody.port)
    await alice.join()
    await configure(alice, roomsecret="s3cret", passwordprotectedroom="1")
    before = refusals("not-authorized")

    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.ports.grpc}") as channel:
        stub = captions_pb2_grpc.CaptionsStub(channel)
        md = (("authorization", f"Bearer {TOKEN}"),)
        # no password: refused, tried again with back-off, said once
        await stub.StartCaptions(pb.StartRequest(room=room, requested_by=ALICE), metadata=md)
        await wait_for(lambda: refusals("not-authorized") >= before + 3, 15, "three refusals")
        status = await stub.GetRoomStatus(pb.RoomRequest(room=room), metadata=md)
        assert "password-protected and the transcriber is not whitelisted" in status.warning
        assert f"transcriber@{HIDDEN}" in status.warning  # what to whitelist
        assert status.caption_carrier != "muc"
        assert not sidecar.occupant.joined(room)
        assert len(refusal_lines(caplog, room)) == 1
        assert "s3cret" not in caplog.text

        # the dial's JvbRoomPassword, passed on by the start call
        await stub.StartCaptions(
            pb.StartRequest(room=room, requested_by=ALICE, room_password="s3cret"), metadata=md
        )
        await wait_for(lambda: sidecar.occupant.joined(room), 10, "joined with the password")
        status = await stub.GetRoomStatus(pb.RoomRequest(room=room), metadata=md)
        assert status.warning == "" and status.caption_carrier == "muc"
    # Alice sees the transcriber, with its transcriber presence
    assert alice.transcriber_presences(HIDDEN)
    assert "s3cret" not in caplog.text


async def test_members_only_room_refused_until_the_transcriber_is_a_member(world, caplog):
    prosody, sidecar, clients = world
    caplog.set_level(logging.INFO)
    room = f"lobby@{MUC}"
    alice = JitsiClient(f"alice@{DOMAIN}", "asecret", room, ALICE, "Alice")
    clients.append(alice)
    await alice.start(prosody.port)
    await alice.join()
    await configure(alice, membersonly="1")
    before = refusals("registration-required")

    await sidecar.rooms.start(room, "captions", requested_by=ALICE)
    await wait_for(lambda: refusals("registration-required") >= before + 3, 15, "refusals")
    r = sidecar.rooms.get(room)
    assert "members-only (lobby) and the transcriber is not whitelisted" in r.warning
    assert f'"{HIDDEN}" to muc_lobby_whitelist' in r.warning
    assert r.carrier != "muc"
    assert len(refusal_lines(caplog, room)) == 1

    # the owner lets the transcriber in (what a lobby whitelist does server-side)
    iq = alice.make_iq_set(ito=room)
    q = ET.SubElement(iq.xml, f"{{{MUC_ADMIN}}}query")
    ET.SubElement(
        q, f"{{{MUC_ADMIN}}}item", {"jid": f"transcriber@{HIDDEN}", "affiliation": "member"}
    )
    assert (await alice.send_iq(iq)).get("type") == "result"
    await wait_for(lambda: sidecar.occupant.joined(room), 10, "joined as a member")
    assert r.warning == "" and r.carrier == "muc"
    await asyncio.sleep(0.5)
    assert len(refusal_lines(caplog, room)) == 1


def test_the_back_off_is_capped():
    """2 s, doubling, never more than rejoin_max_s between two tries."""
    from sidecar.xmpp.transcriber import TranscriberOptions, rejoin_delay

    o = TranscriberOptions(jid="t@h", password="p")
    waits = [rejoin_delay(o, n) for n in range(1, 100)]
    assert waits[:4] == [2.0, 4.0, 8.0, 16.0]
    assert max(waits) == waits[-1] == 300.0
