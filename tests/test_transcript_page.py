"""The transcript page in a real browser (Debian's chromium driven by selenium).

The sidecar's transcript routes run on a loopback listener in a thread of
their own; the browser opens signed links the way a participant would.
Screenshots go to the test's temporary directory, and to ``docs/`` with
``CAPTIONS_UPDATE_SCREENSHOTS=1``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.transcript_site import MEETING, LiveMeeting, Site, finished_meeting, start_site

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


class SiteThread:
    """The site's event loop in a thread; ``call`` runs a function on it and waits."""

    def __init__(self, root: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.site: Site = self.run(start_site(root))

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def call(self, fn: Callable[[], T]) -> T:
        fut: Future[T] = Future()

        def go() -> None:
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)

        self.loop.call_soon_threadsafe(go)
        return fut.result(30)

    def close(self) -> None:
        self.run(self.site.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("chromium and chromium-driver are not installed (scripts/bootstrap.sh)")
    return browser, driver


@pytest.fixture
def site(tmp_path: Path) -> Iterator[SiteThread]:
    s = SiteThread(tmp_path / "store")
    yield s
    s.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    binary, driver_path = _chromium()
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1200,900",
        "--lang=en-GB",
    ):
        opts.add_argument(arg)
    opts.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    d = webdriver.Chrome(service=Service(driver_path), options=opts)
    d.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    d.downloads = downloads  # type: ignore[attr-defined]
    d.shots = tmp_path  # type: ignore[attr-defined]
    yield d
    d.quit()


def wait(d: Any, cond: Callable[[Any], Any], timeout: float = 20, what: str = "") -> Any:
    try:
        return WebDriverWait(d, timeout).until(cond)
    except TimeoutException:
        raise AssertionError(f"timed out waiting for {what or cond}") from None


def shot(d: Any, name: str) -> Path:
    path = d.shots / name
    d.save_screenshot(str(path))
    if os.environ.get("CAPTIONS_UPDATE_SCREENSHOTS") == "1":
        shutil.copy(path, REPO / "docs" / name)
    return path


def rows(d: Any, visible_only: bool = True) -> list[Any]:
    items = d.find_elements(By.CSS_SELECTOR, "#transcript li")
    return [li for li in items if li.is_displayed()] if visible_only else items


def rgb(css: str) -> tuple[float, float, float]:
    parts = css[css.index("(") + 1 : css.index(")")].split(",")
    return tuple(float(p) for p in parts[:3])  # type: ignore[return-value]


def contrast(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    def lum(c: tuple[float, float, float]) -> float:
        def ch(v: float) -> float:
            v /= 255
            return v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4

        return 0.2126 * ch(c[0]) + 0.7152 * ch(c[1]) + 0.0722 * ch(c[2])

    hi, lo = sorted((lum(a), lum(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_a_signed_link_shows_speakers_text_search_and_downloads(
    site: SiteThread, browser: Any
) -> None:
    d = browser
    tid = site.call(lambda: finished_meeting(site.site))
    d.get(site.site.link(tid))
    wait(d, lambda d: len(rows(d)) == len(MEETING), what="the transcript entries")
    assert d.title == "planning-call · Transcript"
    assert d.find_element(By.ID, "title").text == "planning-call"
    assert "2026" in d.find_element(By.ID, "date").text
    assert d.find_element(By.ID, "status").text == "Complete"
    assert d.find_element(By.TAG_NAME, "html").get_attribute("lang") == "en"

    speakers = d.find_elements(By.CSS_SELECTOR, "#speakers li")
    assert [s.text for s in speakers] == ["Alice Martin", "Bob Okafor", "Carol Nguyen"]
    colours = [s.value_of_css_property("color") for s in speakers]
    assert len(set(colours)) == 3  # one colour each
    for c in colours:
        assert contrast(rgb(c), (255, 255, 255)) >= 4.5, c  # WCAG AA on the white page
    first = rows(d)[0]
    assert first.find_element(By.TAG_NAME, "time").text == "00:00:02"
    assert first.find_element(By.CSS_SELECTOR, ".who").text == "Alice Martin"
    assert first.find_element(By.CSS_SELECTOR, ".text").text == MEETING[0][2]
    # the same speaker has the same colour in the list and in the legend
    assert first.find_element(By.CSS_SELECTOR, ".who").value_of_css_property("color") == colours[0]
    shot(d, "transcript-page.png")

    # search from the keyboard: "/" jumps to the box
    d.find_element(By.TAG_NAME, "body").send_keys("/")
    box = d.switch_to.active_element
    assert box.get_attribute("id") == "search"
    box.send_keys("budget")
    wait(d, lambda d: len(rows(d)) == 3, what="three matches")
    assert d.find_element(By.ID, "search-count").text == "3 of 5 entries match"
    marks = d.find_elements(By.CSS_SELECTOR, "#transcript li mark")
    assert [m.text.lower() for m in marks if m.is_displayed()] == ["budget", "budget", "budget"]
    shot(d, "transcript-search.png")
    box.send_keys(Keys.ESCAPE)
    wait(d, lambda d: len(rows(d)) == 5, what="the search cleared")

    # every download button is labelled; the text one saves what the store holds
    links = d.find_elements(By.CSS_SELECTOR, "#downloads a")
    assert [a.text for a in links] == ["TXT", "SRT", "VTT", "MD", "JSONL"]
    for a in links:
        assert a.get_attribute("aria-label").startswith("Download as ")
    for fmt in ("txt", "srt"):
        d.find_element(By.CSS_SELECTOR, f'#downloads a[data-format="{fmt}"]').click()
        target = d.downloads / f"{tid}.{fmt}"
        deadline = time.monotonic() + 20
        while not target.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert target.exists(), sorted(p.name for p in d.downloads.iterdir())
        assert target.read_bytes() == site.site.store.get(tid, fmt)


def test_a_live_meeting_grows_on_the_page(site: SiteThread, browser: Any) -> None:
    d = browser
    meeting: LiveMeeting = site.call(
        lambda: LiveMeeting(site.site, "product-review@conference.meet.example")
    )
    site.call(lambda: meeting.final("alice01", "Alice Martin", "Welcome to the review.", 1))
    d.get(site.site.link(meeting.id))
    wait(d, lambda d: len(rows(d)) == 1, what="the first entry")
    wait(d, lambda d: d.find_element(By.ID, "status").text.startswith("Live"), what="live")
    # an interim appears in italics, then its final replaces it
    site.call(lambda: meeting.interim("bob0002", "Bob Okafor", "I have the new", 5))
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#transcript li.interim"), what="interim")
    assert d.find_element(By.CSS_SELECTOR, "li.interim .text").text == "I have the new"
    site.call(lambda: meeting.final("bob0002", "Bob Okafor", "I have the new designs ready.", 5))
    wait(d, lambda d: not d.find_elements(By.CSS_SELECTOR, "#transcript li.interim"), what="final")
    assert rows(d)[-1].find_element(By.CSS_SELECTOR, ".text").text == (
        "I have the new designs ready."
    )
    for i, (pid, name, text) in enumerate(
        [
            ("carol03", "Carol Nguyen", "They look great on mobile."),
            ("alice01", "Alice Martin", "Let us ship them next week."),
        ]
    ):
        site.call(lambda pid=pid, name=name, text=text, i=i: meeting.final(pid, name, text, 9 + i))
    wait(d, lambda d: len(rows(d)) == 4, what="four entries")
    assert [s.text for s in d.find_elements(By.CSS_SELECTOR, "#speakers li")] == [
        "Alice Martin",
        "Bob Okafor",
        "Carol Nguyen",
    ]
    # screen readers hear each new final through the polite live region
    assert "Let us ship them next week." in d.find_element(By.ID, "announce").get_attribute(
        "textContent"
    )
    shot(d, "transcript-live.png")
    site.call(meeting.end)
    wait(d, lambda d: d.find_element(By.ID, "status").text == "Complete", what="complete")
    assert len(rows(d)) == 4  # nothing doubled by the reload


def test_expired_or_tampered_links_are_refused_with_a_page(site: SiteThread, browser: Any) -> None:
    d = browser
    tid = site.call(lambda: finished_meeting(site.site))
    d.get(site.site.link(tid, expires=int(time.time()) - 60))
    assert d.find_element(By.TAG_NAME, "h1").text == "This link has expired"
    assert "Alice" not in d.page_source
    shot(d, "transcript-link-expired.png")
    good = site.site.link(tid)
    d.get(good[:-3] + ("abc" if not good.endswith("abc") else "xyz"))
    assert d.find_element(By.TAG_NAME, "h1").text == "This link is not valid"
    assert "Alice" not in d.page_source


@pytest.mark.slow
def test_a_live_meeting_from_the_simulator_grows_on_the_page(tmp_path: Path, browser: Any) -> None:
    """The real sidecar (Whisper) captioning the simulator's meeting, followed by the page."""
    from sidecar.config import load_config
    from sidecar.server import Sidecar
    from sidecar.sim.conference import SimConfig, SimParticipant, run_conference

    script = [
        ("Alice Liddell", "The quarterly budget review is on Monday morning."),
        ("Bob", "I will bring the sales report from last week."),
        ("Alice Liddell", "Thank you both, we will meet in the large room."),
        ("Bob", "Should we invite the marketing team as well?"),
    ]
    room = "budget-review@conference.example.org"
    token = "sim-secret-for-the-page"
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro: Any, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    env = {
        "CAPTIONS_SERVER_TOKEN": token,
        "CAPTIONS_SERVER_GRPC_LISTEN": "127.0.0.1:0",
        "CAPTIONS_SERVER_HTTP_LISTEN": "127.0.0.1:0",
        "CAPTIONS_STORE_STORE_DIR": str(tmp_path / "store"),
        "CAPTIONS_LINKS_KEY": "p" * 40,
    }

    async def make() -> Sidecar:
        s = Sidecar(load_config(None, env=env))
        await s.start()
        return s

    sidecar: Sidecar = run(make(), 300)
    try:
        cfg = SimConfig(
            participants=[
                SimParticipant("Alice Liddell", endpoint="a1b2c3d4"),
                SimParticipant("Bob"),
            ],
            url=f"ws://127.0.0.1:{sidecar.ports.http}/mediajson/meeting-page",
            room=room,
            token=token,
            grpc=f"127.0.0.1:{sidecar.ports.grpc}",
            script=script,
        )
        sim = asyncio.run_coroutine_threadsafe(run_conference(cfg), loop)

        async def transcript_id() -> str:
            while True:
                r = sidecar.rooms.rooms.get(room)
                if r is not None and r.transcript_id:
                    return r.transcript_id
                await asyncio.sleep(0.05)

        tid = run(transcript_id(), 60)
        base = f"http://127.0.0.1:{sidecar.ports.http}"
        assert sidecar.outputs.signer is not None
        browser.get(base + sidecar.outputs.signer.url(tid))
        wait(browser, lambda d: d.find_element(By.ID, "status").text.startswith("Live"), 30, "live")
        wait(browser, lambda d: len(rows(d)) >= 1, 60, "the first final")
        first = len(rows(browser))
        wait(browser, lambda d: len(rows(d)) >= first + 1, 60, "the meeting growing")
        shot(browser, "transcript-live-simulator.png")
        sim.result(180)  # the recognition itself is measured in test_simulator.py
        wait(browser, lambda d: d.find_element(By.ID, "status").text == "Complete", 60, "the end")
        finals = [li for li in rows(browser) if "interim" not in (li.get_attribute("class") or "")]
        # the page shows what the transcript holds, entry for entry (one utterance
        # per turn normally; a busy machine may cut a long one in two)
        import json as _json

        stored = [
            _json.loads(line) for line in sidecar.store.get(tid, "jsonl").decode().splitlines()
        ]
        stored.sort(key=lambda e: e["start_time"])
        assert len(stored) >= len(script)
        assert [li.find_element(By.CSS_SELECTOR, ".text").text for li in finals] == [
            e["text"] for e in stored
        ]
        names = [li.find_element(By.CSS_SELECTOR, ".who").text for li in finals]
        assert names == [e["speaker_name"] for e in stored]
        assert set(names) == {"Alice Liddell", "Bob"}
        assert "budget" in finals[0].find_element(By.CSS_SELECTOR, ".text").text.lower()
    finally:
        run(sidecar.stop(), 120)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
