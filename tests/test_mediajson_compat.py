"""Forward compatibility of the videobridge media export.

Every message here has the shape jicoco's ``MediaJson.kt`` gives it (the
classes the bridge serialises with Jackson, nulls left out):

- ``sequenceNumber``, ``media.chunk``, ``media.timestamp`` and
  ``stop.mediaInfo.bytesSent`` / ``duration`` are strings
  (``Int2StringSerializer`` / ``Long2StringSerializer``);
- ``ping.id``, ``media.audioLevel``, ``start.timestamp``, ``stop.timestamp``,
  ``mediaFormat.sampleRate`` / ``channels`` are JSON numbers, ``media.vad`` and
  ``start.diarize`` booleans (``diarize`` only ever ``true``: jvb
  ``MediaJsonSerializer.createStart`` leaves it out when off);
- ``mediaFormat.parameters`` is a ``Map<String, String>`` (the payload type's
  fmtp, from ``payloadType.parameters``);
- ``sources`` is ``{"exports": [names], "requests": [names]}`` (``SourcesEvent``,
  sent by jvb ``Exporter`` only when one is non-empty), ``info`` a free-form
  property bag with ``application``, ``version`` and maybe ``region``,
  ``session-end`` has no body.

Jicofo appends the room metadata's ``transcription.urlParams`` to the URL with
``URLEncoder.encode`` (form encoding) in ``ColibriV2SessionManager.
buildTranscriberSpec``; Python's ``urlencode`` encodes the same way.
"""

from __future__ import annotations

import asyncio
import base64
import json
from urllib.parse import urlencode

import aiohttp
from prometheus_client import REGISTRY

from sidecar.counters import flush_all
from tests.jitsi_clients import wait_for
from tests.test_mediajson import Bridge, make_sidecar

QUIET = base64.b64encode(base64.b64decode("+P/+")).decode()  # an Opus silence frame


def count(outcome: str) -> float:
    flush_all()
    return (
        REGISTRY.get_sample_value("captions_mediajson_messages_total", {"outcome": outcome}) or 0.0
    )


async def test_every_event_of_the_real_serializer_is_read_and_unknown_ones_are_ignored(tmp_path):
    sidecar = make_sidecar(tmp_path)
    await sidecar.start(preload=False)
    room = "fields@conference.example.org"
    url = f"http://127.0.0.1:{sidecar.ports.http}/mediajson/m-fields?room={room}"
    unknown_before = count("unknown_event")
    diarize_before = count("start_diarize")
    async with aiohttp.ClientSession() as session:
        bridge = Bridge(session, url)
        await bridge.connect()  # sends info
        await bridge.send(
            {
                "event": "info",
                "application": "jitsi-videobridge",
                "version": "2.3-250-gabcdef",
                "region": "eu-west",
            }
        )
        await bridge.send({"event": "sources", "exports": ["a1b2c3d4-a0"], "requests": []})
        await bridge.send(
            {
                "event": "start",
                "sequenceNumber": "1",
                "start": {
                    "tag": "a1b2c3d4-a0",
                    "mediaFormat": {
                        "encoding": "opus",
                        "sampleRate": 48000,
                        "channels": 2,
                        "parameters": {"minptime": "10", "useinbandfec": "1"},
                    },
                    "customParameters": {"endpointId": "a1b2c3d4"},
                    "diarize": True,
                },
            }
        )
        # events a newer bridge may send: counted, ignored, the socket stays
        for event in (
            {"event": "translation-result", "language": "fr", "text": "bonjour"},
            {"event": "launch-rockets", "count": "3"},
            {"event": "x" * 300},
        ):
            await bridge.send(event)
        for i in range(30):  # no audioLevel / vad: the sender had no extension
            await bridge.send(
                {
                    "event": "media",
                    "sequenceNumber": str(2 + i),
                    "media": {
                        "tag": "a1b2c3d4-a0",
                        "chunk": str(7 + i),
                        "timestamp": str(960 * (7 + i)),
                        "payload": QUIET,
                    },
                }
            )
        await bridge.send(
            {
                "event": "stop",
                "sequenceNumber": "40",
                "stop": {
                    "tag": "a1b2c3d4-a0",
                    "mediaInfo": {"bytesSent": "1234", "duration": "600"},
                    "timestamp": 960 * 37,
                },
            }
        )
        await bridge.send({"event": "ping", "id": 41})
        await wait_for(lambda: bridge.pongs == [41], 5, "the pong")
        assert bridge.ws is not None and not bridge.ws.closed
        assert count("unknown_event") == unknown_before + 3
        assert count("start_diarize") == diarize_before + 1
        conn = sidecar.mediajson.latest[room]
        assert conn.formats["a1b2c3d4-a0"]["parameters"] == {"minptime": "10", "useinbandfec": "1"}
        assert conn.exports == ["a1b2c3d4-a0"]
        r = sidecar.rooms.get(room)
        assert r.captioning and r.transcribing
        assert r.speakers == {} or "a1b2c3d4" in r.speakers  # stop finished it
        assert r.audio_seen, "the media without audioLevel/vad was not taken"
        # session-end: a clean close, the room's session over
        await bridge.send({"event": "session-end"})
        await asyncio.wait_for(bridge.reader, 5)
        assert bridge.ws.close_code == 1000
    await sidecar.stop()


async def test_url_parameters_from_the_room_metadata_are_honoured(tmp_path):
    sidecar = make_sidecar(tmp_path)
    await sidecar.start(preload=False)
    # what Jicofo makes of url-template ws://HOST/mediajson/{{MEETING_ID}} and
    # metadata transcription.urlParams {room, language}
    internal = "[acme]weekly@conference.example.org"
    query = urlencode({"room": internal, "language": "de"})
    assert "%5Bacme%5Dweekly%40conference" in query  # as URLEncoder.encode writes it
    url = f"http://127.0.0.1:{sidecar.ports.http}/mediajson/meeting-7f3a?{query}"
    async with aiohttp.ClientSession() as session:
        bridge = Bridge(session, url)
        await bridge.connect()
        await bridge.start("a1b2c3d4")
        await wait_for(lambda: internal in sidecar.rooms.rooms, 5, "the tenant room")
        r = sidecar.rooms.get(internal)
        assert r.effective.language == "de"
        assert sidecar.rooms.room_for_meeting("meeting-7f3a") == internal
        await bridge.drop()

        # a language this sidecar does not know: said in the log, the room
        # still starts with its default
        url2 = f"http://127.0.0.1:{sidecar.ports.http}/mediajson/m-2?" + urlencode(
            {"room": "other@conference.example.org", "language": "klingon"}
        )
        before = count("bad_url_parameter")
        bridge2 = Bridge(session, url2)
        await bridge2.connect()
        await wait_for(lambda: "other@conference.example.org" in sidecar.rooms.rooms, 5)
        assert sidecar.rooms.get("other@conference.example.org").effective.language == "en-US"
        assert count("bad_url_parameter") == before + 1
        await bridge2.drop()

        # the auth header Jicofo sends from http-headers is required
        bad = Bridge(session, url)
        try:
            await bad.connect(token="wrong")
        except aiohttp.WSServerHandshakeError as e:
            assert e.status == 401
        else:
            raise AssertionError("a wrong Authorization header was accepted")
    await sidecar.stop()


def test_replies_carry_event_and_type_as_the_bridge_parser_needs():
    """``Event.parse`` picks the class by ``event``; jitsi-meet reads ``type``."""
    from sidecar.events import Caption
    from sidecar.jitsi import caption_json

    c = Caption(
        room="r@c.x",
        participant_id="a1b2c3d4",
        participant_name="Alice",
        message_id="m",
        text="hi",
        is_interim=True,
        stability=0.5,
        language="en-US",
        start_time_ms=1,
        end_time_ms=2,
        timestamp_ms=3,
    )
    msg = json.loads(json.dumps(caption_json(c)))
    assert msg["event"] == msg["type"] == "transcription-result"
