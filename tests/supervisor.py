"""A stand-in for Home Assistant's Supervisor: the two calls an app makes, in their real shape.

``GET /services/mqtt`` answers the broker (supervisor/api/services.py), ``POST /discovery``
takes ``{service, config}`` from an app that lists the service and answers its message's
``uuid`` (supervisor/api/discovery.py); both need the app's ``SUPERVISOR_TOKEN`` as Bearer and
answer ``{"result": "ok", "data": ...}``. Every call is recorded with the Authorization it had.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.threaded_server import ThreadedServer

SUPERVISOR_TOKEN = "supervisor-test-token"
DISCOVERY_SERVICES = ("edgeai",)
"""What the app lists under ``discovery`` in config.yaml (tests compare the two)."""


@dataclass
class Call:
    """One request the stand-in answered."""

    method: str
    path: str
    authorization: str
    body: Any = None


@dataclass
class SupervisorStandIn:
    """The Supervisor's API on ``host:port`` (80: ``http://supervisor`` with a hosts entry)."""

    broker: dict[str, Any] | None
    port: int = 0
    refuse_discovery: bool = False
    calls: list[Call] = field(default_factory=list)
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Discovery messages by service, as the Supervisor keeps one per app and service."""

    def __post_init__(self) -> None:
        app = web.Application()
        app.router.add_get("/services/mqtt", self._mqtt)
        app.router.add_post("/discovery", self._discovery)
        self._server = ThreadedServer(app, port=self.port)
        self.port = self._server.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _authorized(self, request: web.Request, body: Any = None) -> bool:
        authorization = request.headers.get("Authorization", "")
        self.calls.append(Call(request.method, request.path, authorization, body))
        return authorization == f"Bearer {SUPERVISOR_TOKEN}"

    async def _mqtt(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"result": "error", "message": "unauthorized"}, status=401)
        if self.broker is None:
            return web.json_response({"result": "error", "message": "no service"}, status=400)
        return web.json_response({"result": "ok", "data": self.broker})

    async def _discovery(self, request: web.Request) -> web.Response:
        body = await request.json()
        if not self._authorized(request, body):
            return web.json_response({"result": "error", "message": "unauthorized"}, status=401)
        service = body.get("service")
        if self.refuse_discovery or service not in DISCOVERY_SERVICES:
            message = "Apps must list services they provide via discovery in their config!"
            return web.json_response({"result": "error", "message": message}, status=403)
        known = self.messages.setdefault(service, {"uuid": uuid.uuid4().hex})
        known["config"] = body["config"]
        return web.json_response({"result": "ok", "data": {"uuid": known["uuid"]}})

    def discovery_posts(self) -> list[Call]:
        return [call for call in self.calls if call.path == "/discovery"]

    def announcement(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait for the app's first discovery post; return its body, checked to carry the app's
        own token as Bearer (the Supervisor takes nothing else)."""
        deadline = time.monotonic() + timeout
        while not self.discovery_posts():
            assert time.monotonic() < deadline, "the app announced nothing"
            time.sleep(0.1)
        post = self.discovery_posts()[0]
        assert post.authorization == f"Bearer {SUPERVISOR_TOKEN}"
        return dict(post.body)

    def stop(self) -> None:
        self._server.stop()
