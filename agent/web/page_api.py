"""The web page and its JSON API: static files, jobs, event streams, the gallery.

The handlers run on the agent's loop and call the jobs directly, so the page uses the very same
admission, journal, queue and metrics as MQTT clients.
"""

from __future__ import annotations

import asyncio
import functools
import json
from importlib import resources
from typing import TYPE_CHECKING, Any

from agent.jobs.errors import ErrorCode, RequestError, error_body
from agent.jobs.requests import JOB_ID_PATTERN
from agent.web.routing import (
    NOT_FOUND,
    Access,
    Body,
    ContractErrors,
    Request,
    Response,
    Routes,
    Stream,
)

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator

    from agent.jobs.events import JobEvents
    from agent.jobs.service import JobService

STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
JOB = "/api/jobs/(?P<id>" + JOB_ID_PATTERN.strip("^$") + ")"
STREAM_KEEPALIVE_S = 15.0
STREAM_MAX_S = 3600.0
"""An event stream ends after an hour even if its job never does; the page then reloads it."""
GALLERY_SIZE = 24
TERMINAL_EVENTS = ("done", "failed", "cancelled")
ERROR_STATUS = {
    ErrorCode.STORAGE_FULL: 507,
    ErrorCode.BUSY: 503,
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.DUPLICATE_ID: 409,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
}


class PageApi:
    """Answers the page's requests."""

    def __init__(self, *, jobs: JobService, events: JobEvents) -> None:
        """Create the API over the agent's jobs and their event fan-out."""
        self._jobs = jobs
        self._events = events

    def register(self, routes: Routes) -> None:
        """Add the page's routes."""
        shape = ContractErrors()
        for path in STATIC_FILES:
            routes.add("GET", path, self.static, access=Access.OPEN, shape=shape)
        # A job may carry a picture to start from.
        pictures = Body(pictures=True)
        routes.add(
            "POST", "/api/jobs", self.create, access=Access.TOKEN, shape=shape, body=pictures
        )
        routes.add("GET", "/api/images", self.gallery, access=Access.GALLERY, shape=shape)
        routes.add("GET", "/api/choices", self.choices, access=Access.TOKEN, shape=shape)
        routes.add("GET", JOB, self.status, access=Access.TOKEN, shape=shape)
        routes.add("GET", JOB + "/events", self.stream, access=Access.TOKEN, shape=shape)
        routes.add("POST", JOB + "/cancel", self.cancel, access=Access.TOKEN, shape=shape)

    @staticmethod
    async def static(request: Request) -> Response:
        """A file of the page (read once per start: the package does not change under it)."""
        name, content_type = STATIC_FILES[request.path]
        return Response(200, content_type, _page_file(name))

    async def create(self, request: Request) -> Response:
        """``POST /api/jobs``: a request as JSON, the same fields as over MQTT."""
        try:
            return Response.json(202, await self._jobs.submit_page(request.body))
        except RequestError as exc:
            return Response.json(
                ERROR_STATUS.get(exc.code, 400), error_body(exc.job_id, exc.code, exc.message)
            )

    async def status(self, request: Request) -> Response:
        """``GET /api/jobs/<id>``: where a job stands, and its reply once it has one."""
        job_id = request.params["id"]
        found = await self._jobs.status(job_id)
        return Response.json(200, found) if found is not None else not_found_json(job_id)

    async def cancel(self, request: Request) -> Response:
        """``POST /api/jobs/<id>/cancel``."""
        job_id = request.params["id"]
        if await self._jobs.cancel(job_id):
            return Response.json(202, {"id": job_id, "cancelling": True})
        return not_found_json(job_id)

    async def choices(self, _request: Request) -> Response:
        """``GET /api/choices``: the installed models (the default first) and the LoRA styles."""
        choice = self._jobs.choice
        return Response.json(
            200,
            {
                "default": choice.catalog.default,
                "models": choice.catalog.names,
                "loras": [lora.name for lora in choice.loras.files()],
            },
        )

    async def gallery(self, _request: Request) -> Response:
        """``GET /api/images``: the newest images, newest first."""
        return Response.json(200, {"images": await self._jobs.gallery(GALLERY_SIZE)})

    async def stream(self, request: Request) -> Response | Stream:
        """``GET /api/jobs/<id>/events``: server-sent events until the job ends."""
        job_id = request.params["id"]
        listened = self._events.listen(job_id)
        snapshot = await self._jobs.status(job_id)
        if snapshot is None:
            self._events.stop(job_id, listened)
            return NOT_FOUND
        return Stream("text/event-stream", self._chunks(job_id, listened, snapshot))

    async def _chunks(
        self, job_id: str, listened: asyncio.Queue[dict[str, Any]], snapshot: dict[str, Any]
    ) -> AsyncGenerator[bytes, None]:
        try:
            yield sse("status", snapshot)
            if snapshot["status"] == "done":
                return
            waited = 0.0
            while waited < STREAM_MAX_S:
                try:
                    async with asyncio.timeout(STREAM_KEEPALIVE_S):
                        event = await listened.get()
                except TimeoutError:
                    waited += STREAM_KEEPALIVE_S
                    yield b": keepalive\n\n"
                    continue
                yield sse("job", event)
                if event["event"] in TERMINAL_EVENTS:
                    yield sse("status", await self._jobs.status(job_id))
                    return
        finally:
            self._events.stop(job_id, listened)


@functools.cache
def _page_file(name: str) -> bytes:
    return resources.files("agent.web.page").joinpath(name).read_bytes()


def sse(event: str, data: object) -> bytes:
    """Return one server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def not_found_json(job_id: str) -> Response:
    """Return the API's 404."""
    return Response.json(
        404, error_body(job_id, ErrorCode.UNKNOWN_JOB, f"no job has the id {job_id}")
    )
