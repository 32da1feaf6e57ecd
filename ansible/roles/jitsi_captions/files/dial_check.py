#!/usr/bin/env python3
"""The role's last check: one dial through Prosody, as a Jitsi Meet moderator sends it.

Two XMPP sessions on Prosody's client port. The focus account (Jicofo's own,
from jicofo.conf) creates a check room as ROOM/focus and makes the participant
a moderator, which is Jicofo's part; the participant (anonymous on the Jitsi
domain, or a given account) joins, sets the requestingTranscription presence
property and sends lib-jitsi-meet's dial IQ (urn:xmpp:rayo:1, to
"jitsi_meet_transcribe") to ROOM/focus. mod_captions must answer it with a
result carrying <ref uri="xmpp:TRANSCRIBER"/>. Then the participant stops
asking and both leave, so the sidecar ends the room again.

Input: one JSON object on stdin (secrets stay off the command line):
host, port, domain, muc, focus_jid, focus_password, participant_jid,
participant_password, transcriber_jid, timeout. Output: one line of JSON,
{"ok": true|false, "detail": "..."}; the exit status is 0 only when ok.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
import sys
import xml.etree.ElementTree as ET

import slixmpp
from slixmpp.exceptions import IqError, IqTimeout

MUC = "http://jabber.org/protocol/muc"
MUC_ADMIN = "http://jabber.org/protocol/muc#admin"
RAYO = "urn:xmpp:rayo:1"


LOOPBACK = ("127.0.0.1", "::1", "localhost")


class Session(slixmpp.ClientXMPP):
    def __init__(self, jid: str, password: str, *, loopback: bool) -> None:
        super().__init__(jid, password)
        if loopback:
            # STARTTLS when Prosody offers it; a plain login only on this host
            self.enable_plaintext = True
            self.plugin["feature_mechanisms"].unencrypted_plain = True
        # loopback to Prosody; stock Jitsi certificates are self-signed
        self.ssl_context = ssl.create_default_context()
        self.ssl_context.check_hostname = False
        self.ssl_context.verify_mode = ssl.CERT_NONE
        self.enable_direct_tls = False
        self.online = asyncio.Event()
        self.presences: list[ET.Element] = []
        self.add_event_handler("session_start", self._started)
        self.add_event_handler("presence", lambda p: self.presences.append(p.xml))

    async def _started(self, _event: object) -> None:
        self.send_presence()
        self.online.set()

    def joined(self, occupant: str) -> bool:
        return any(
            p.get("from") == occupant and p.get("type") != "unavailable" for p in self.presences
        )


async def wait(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


def presence(s: Session, to: str, *, join: bool = False, requesting: str | None = None) -> None:
    p = s.make_presence(pto=to)
    if join:
        p.append(ET.Element(f"{{{MUC}}}x"))
    if requesting is not None:
        el = ET.Element("{jabber:client}jitsi_participant_requestingTranscription")
        el.text = requesting
        p.append(el)
    p.send()


async def check(cfg: dict) -> str:  # type: ignore[type-arg]
    timeout = float(cfg.get("timeout", 20))
    room = f"captions-check-{secrets.token_hex(4)}@{cfg['muc']}"
    nick = secrets.token_hex(4)
    loopback = cfg["host"] in LOOPBACK
    focus = Session(cfg["focus_jid"], cfg["focus_password"], loopback=loopback)
    who = Session(
        cfg.get("participant_jid") or cfg["domain"],
        cfg.get("participant_password") or "",
        loopback=loopback,
    )
    sessions = (focus, who)
    try:
        for s, name in ((focus, "focus"), (who, "participant")):
            s.connect(cfg["host"], int(cfg["port"]))
            try:
                await asyncio.wait_for(s.online.wait(), timeout)
            except TimeoutError:
                raise RuntimeError(
                    f"the {name} session did not log in to {cfg['host']}:{cfg['port']}"
                ) from None
        presence(focus, f"{room}/focus", join=True)
        await wait(
            lambda: focus.joined(f"{room}/focus"), timeout, "the focus could not create the room"
        )
        presence(who, f"{room}/{nick}", join=True)
        await wait(lambda: who.joined(f"{room}/{nick}"), timeout, "the participant could not join")
        iq = focus.make_iq_set(ito=room)
        item = ET.SubElement(ET.SubElement(iq.xml, f"{{{MUC_ADMIN}}}query"), f"{{{MUC_ADMIN}}}item")
        item.set("nick", nick)
        item.set("role", "moderator")
        await iq.send(timeout=timeout)
        presence(who, f"{room}/{nick}", requesting="true")
        dial = who.make_iq_set(ito=f"{room}/focus")
        d = ET.SubElement(dial.xml, f"{{{RAYO}}}dial")
        d.set("from", "fromnumber")
        d.set("to", "jitsi_meet_transcribe")
        h = ET.SubElement(d, f"{{{RAYO}}}header")
        h.set("name", "JvbRoomName")
        h.set("value", room)
        try:
            reply = (await dial.send(timeout=timeout)).xml
        except IqError as e:
            raise RuntimeError(
                f"the dial was refused: {ET.tostring(e.iq.xml, encoding='unicode')[:500]}"
            ) from None
        except IqTimeout:
            raise RuntimeError(
                f"no answer to the dial within {timeout:.0f} s (is mod_captions loaded?)"
            ) from None
        ref = reply.find(f"{{{RAYO}}}ref")
        want = f"xmpp:{cfg['transcriber_jid']}"
        if ref is None or ref.get("uri") != want:
            raise RuntimeError(
                f"the dial's answer has no <ref uri={want!r}/>: {ET.tostring(reply, encoding='unicode')[:500]}"
            )
        presence(who, f"{room}/{nick}", requesting="false")
        await asyncio.sleep(0.5)
        return f"dial answered in {room} with {want}"
    finally:
        for s in sessions:
            s.disconnect()


def main() -> int:
    cfg = json.load(sys.stdin)
    try:
        detail = asyncio.run(check(cfg))
        ok = True
    except Exception as e:  # the reason goes to the operator, as one line
        detail, ok = f"{type(e).__name__}: {e}", False
    print(json.dumps({"ok": ok, "detail": detail}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
