"""Signed links and the transcript HTTP routes over a real loopback listener."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest

from sidecar.outputs.links import LinkCheck, LinkSigner
from sidecar.store import FORMATS
from tests.transcript_site import KEY, TOKEN, LiveMeeting, finished_meeting, start_site

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_links_verify_expire_and_are_revoked_by_a_new_key() -> None:
    now = [1_000_000.0]
    signer = LinkSigner(KEY, ttl_s=60, clock=lambda: now[0])
    q = dict(p.split("=") for p in signer.query("20261201T190000Z-x-00aa11bb").split("&"))
    tid = "20261201T190000Z-x-00aa11bb"
    assert signer.check(tid, q["exp"], q["sig"]) is LinkCheck.OK
    assert signer.check(tid + "c", q["exp"], q["sig"]) is LinkCheck.INVALID  # another transcript
    assert signer.check(tid, str(int(q["exp"]) + 1), q["sig"]) is LinkCheck.INVALID  # extended
    flipped = q["sig"][:-1] + ("A" if q["sig"][-1] != "A" else "B")
    assert signer.check(tid, q["exp"], flipped) is LinkCheck.INVALID
    assert signer.check(tid, q["exp"], None) is LinkCheck.INVALID
    assert signer.check(tid, "-1", q["sig"]) is LinkCheck.INVALID
    assert signer.check("../etc", q["exp"], q["sig"]) is LinkCheck.INVALID
    now[0] += 61
    assert signer.check(tid, q["exp"], q["sig"]) is LinkCheck.EXPIRED
    rotated = LinkSigner(b"n" * 40, ttl_s=60, clock=lambda: 1_000_000.0)
    assert rotated.check(tid, q["exp"], q["sig"]) is LinkCheck.INVALID
    with pytest.raises(ValueError):
        LinkSigner(b"short")


async def test_every_format_downloads_through_the_link_as_stored(tmp_path: Path) -> None:
    site = await start_site(tmp_path)
    tid = finished_meeting(site)
    link = site.link(tid)
    q = link.split("?", 1)[1]
    async with aiohttp.ClientSession() as http:
        async with http.get(link) as r:
            assert r.status == 200
            page = await r.text()
            assert "<title>planning-call · Transcript</title>" in page
            assert r.headers["Referrer-Policy"] == "no-referrer"
            assert "default-src 'none'" in r.headers["Content-Security-Policy"]
        async with http.get(f"{site.base}/t/{tid}/data.json?{q}") as r:
            data = await r.json()
        assert data["title"] == "planning-call" and data["live"] is False
        assert [e["speaker_name"] for e in data["entries"]][:3] == [
            "Alice Martin",
            "Bob Okafor",
            "Carol Nguyen",
        ]
        assert {d["format"] for d in data["downloads"]} == set(FORMATS)
        for d in data["downloads"]:
            async with http.get(f"{site.base}/t/{d['href']}") as r:
                assert r.status == 200, d
                assert await r.read() == site.store.get(tid, d["format"])
                assert r.headers["Content-Disposition"] == (
                    f'attachment; filename="{tid}.{d["format"]}"'
                )
        async with http.get(f"{site.base}/t/{tid}/download/pdf?{q}") as r:
            assert r.status == 404
        # the operator token opens the same routes without a link
        async with http.get(f"{site.base}/t/{tid}/download/srt", headers=AUTH) as r:
            assert await r.read() == site.store.get(tid, "srt")
    await site.close()


async def test_expired_tampered_and_revoked_links_are_refused_with_a_page(
    tmp_path: Path,
) -> None:
    now = [time.time()]
    site = await start_site(tmp_path, clock=lambda: now[0])
    tid = finished_meeting(site)
    good = site.link(tid)
    async with aiohttp.ClientSession() as http:
        tampered = good[:-2] + ("xx" if not good.endswith("xx") else "yy")
        other_id = tid[:-1] + ("0" if tid[-1] != "0" else "1")
        for url in (tampered, good.replace(tid, other_id), f"{site.base}/t/{tid}"):
            async with http.get(url) as r:
                assert r.status == 403, url
                body = await r.text()
                assert "This link is not valid" in body
                assert "Alice" not in body
        async with http.get(good.replace("?", "/download/txt?")) as r:
            assert r.status == 200
        now[0] += 3601
        for url in (good, good.replace("?", "/download/txt?"), good.replace("?", "/data.json?")):
            async with http.get(url) as r:
                assert r.status == 410, url
                assert "This link has expired" in await r.text()
        # rotating the key revokes every link made before
        from sidecar.outputs.links import LinkSigner

        site.routes.signer = LinkSigner(b"z" * 40, ttl_s=3600, clock=lambda: now[0])
        now[0] -= 3601
        async with http.get(good) as r:
            assert r.status == 403
    await site.close()


async def test_operator_api_lists_reads_and_deletes(tmp_path: Path) -> None:
    site = await start_site(tmp_path)
    a = finished_meeting(site)
    b = finished_meeting(site, room="other@conference.meet.example")
    link_a = site.link(a)
    async with aiohttp.ClientSession() as http:
        for method, path in (
            ("GET", "/api/v1/transcripts"),
            ("GET", f"/api/v1/transcripts/{a}"),
            ("GET", f"/api/v1/transcripts/{a}/txt"),
            ("DELETE", f"/api/v1/transcripts/{a}"),
        ):
            async with http.request(method, site.base + path) as r:
                assert r.status == 401, path
            async with http.request(
                method, site.base + path, headers={"Authorization": "Bearer wrong"}
            ) as r:
                assert r.status == 401, path
        async with http.get(f"{site.base}/api/v1/transcripts", headers=AUTH) as r:
            listed = (await r.json())["transcripts"]
        assert {t["id"] for t in listed} == {a, b}
        assert all("/t/" in t["url"] and "sig=" in t["url"] for t in listed)
        async with http.get(
            f"{site.base}/api/v1/transcripts?room=other@conference.meet.example", headers=AUTH
        ) as r:
            assert [t["id"] for t in (await r.json())["transcripts"]] == [b]
        async with http.get(f"{site.base}/api/v1/transcripts/{a}/md", headers=AUTH) as r:
            assert await r.read() == site.store.get(a, "md")
        async with http.delete(f"{site.base}/api/v1/transcripts/{a}", headers=AUTH) as r:
            assert r.status == 204
        async with http.delete(f"{site.base}/api/v1/transcripts/{a}", headers=AUTH) as r:
            assert r.status == 404
        async with http.get(link_a) as r:
            assert r.status == 404
            assert "No such transcript" in await r.text()
    await site.close()


async def _events(resp: aiohttp.ClientResponse):  # type: ignore[no-untyped-def]
    name = None
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            yield name, json.loads(line[6:])


async def test_live_stream_replays_then_follows_then_ends(tmp_path: Path) -> None:
    site = await start_site(tmp_path)
    m = LiveMeeting(site, "standup@conference.meet.example")
    m.final("alice01", "Alice", "Before anyone connected.", 1)
    async with (
        aiohttp.ClientSession() as http,
        http.get(site.link(m.id).replace("?", "/events?")) as r,
    ):
        assert r.headers["Content-Type"] == "text/event-stream"
        got = _events(r)
        # the handler subscribed before replaying, so nothing after this is missed
        assert (await anext(got))[1]["text"] == "Before anyone connected."
        m.interim("bob0002", "Bob", "Now I", 3)
        m.final("bob0002", "Bob", "Now I am here.", 3)
        ev, data = await asyncio.wait_for(anext(got), 10)
        assert (ev, data["text"], data["is_interim"]) == ("caption", "Now I", True)
        ev, data = await asyncio.wait_for(anext(got), 10)
        assert (data["text"], data["is_interim"], data["speaker_name"]) == (
            "Now I am here.",
            False,
            "Bob",
        )
        # another room's captions do not leak into this page
        other = LiveMeeting(site, "secret@conference.meet.example")
        other.final("eve", "Eve", "Private words.", 1)
        m.end()
        ev, data = await asyncio.wait_for(anext(got), 10)
        assert ev == "ended"
    await site.close()
