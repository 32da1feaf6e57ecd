"""A real HTTP receiver for webhook tests: an aiohttp server on loopback that records requests."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def json(self) -> dict[str, object]:
        return json.loads(self.body)

    @property
    def event_id(self) -> str:
        return self.headers["Captions-Event-Id"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Receiver:
    """``status(n)`` gives the answer to the n-th request (1-based); default 200."""

    port: int = field(default_factory=free_port)
    status: Callable[[int], int] = lambda n: 200
    delay_s: float = 0.0
    requests: list[Received] = field(default_factory=list)
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    @property
    def accepted(self) -> list[Received]:
        return [r for r in self.requests if 200 <= r.status < 300]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        status = self.status(len(self.requests) + 1)
        self.requests.append(Received(dict(request.headers), body, status))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return web.Response(status=status, text="ok" if status < 300 else "nope")

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
