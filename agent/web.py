"""The web page's side of the HTTP server: static files, the JSON API, event streams, the token.

The HTTP server runs in its own threads; every call into the agent crosses to the event loop
with ``run_coroutine_threadsafe``, so the page uses the very same validation, journal, queue and
metrics as MQTT clients.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import queue
import re
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol

from agent.messages import JOB_ID_PATTERN, ErrorCode, RequestError, error_body

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Generator

    from agent.events import JobEvents

STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
JOB_PATH = re.compile(r"^/api/jobs/(?P<id>[A-Za-z0-9_-]{1,64})(?P<rest>/events|/cancel)?$")
CALL_TIMEOUT_S = 30.0
STREAM_KEEPALIVE_S = 15.0
STREAM_MAX_S = 3600.0
"""An event stream ends after an hour even if its job never does; the page then reloads it."""
GALLERY_SIZE = 24
TERMINAL_EVENTS = ("done", "failed", "cancelled")
ERROR_STATUS = {
    ErrorCode.BUSY: 503,
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.DUPLICATE_ID: 409,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
}

assert JOB_ID_PATTERN == r"^[A-Za-z0-9_-]{1,64}$"  # noqa: S101 - JOB_PATH repeats it


class AgentApi(Protocol):
    """What the web API needs of the agent (coroutines run on the agent's loop)."""

    def submit_web(self, payload: bytes) -> Coroutine[Any, Any, dict[str, Any]]:
        """Take a job."""

    def job_status(self, job_id: str) -> Coroutine[Any, Any, dict[str, Any] | None]:
        """Read a job."""

    def cancel_web(self, job_id: str) -> Coroutine[Any, Any, bool]:
        """Cancel a job."""

    def gallery(self, limit: int) -> Coroutine[Any, Any, list[dict[str, Any]]]:
        """List recent images."""


@dataclass(frozen=True)
class Response:
    """A complete HTTP response."""

    status: int
    content_type: str
    body: bytes

    @classmethod
    def json(cls, status: int, data: object) -> Response:
        """Return a JSON response."""
        return cls(status, "application/json", json.dumps(data).encode())


class WebApi:
    """Answers the page's requests; one instance, shared by the HTTP server's threads."""

    def __init__(  # noqa: PLR0913 - the page's whole configuration
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        agent: AgentApi,
        events: JobEvents,
        token: str | None,
        public_images: bool,
        max_payload_bytes: int,
    ) -> None:
        """Create the API.

        Args:
            loop: The agent's event loop.
            agent: The agent.
            events: Where job events are fanned out.
            token: The API token, or None for none.
            public_images: Let image reads skip the token.
            max_payload_bytes: Largest request body.
        """
        self._loop = loop
        self._agent = agent
        self.events = events
        self._token = token
        self._public_images = public_images
        self.max_payload_bytes = max_payload_bytes

    def _call(self, coroutine: Coroutine[Any, Any, Any]) -> Any:  # noqa: ANN401 - the coroutine's value
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(CALL_TIMEOUT_S)

    # --- access
    def _has_token(self, authorization: str | None, query_token: str | None) -> bool:
        if self._token is None:
            return True
        offered = query_token or ""
        if authorization and authorization.startswith("Bearer "):
            offered = authorization.removeprefix("Bearer ")
        return hmac.compare_digest(offered.encode(), self._token.encode())

    def may_write(self, authorization: str | None, query_token: str | None) -> bool:
        """Return whether a request may create or cancel jobs."""
        return self._has_token(authorization, query_token)

    def may_read(self, authorization: str | None, query_token: str | None) -> bool:
        """Return whether a request may read images and the gallery."""
        return self._public_images or self._has_token(authorization, query_token)

    # --- routes
    @staticmethod
    def static(path: str) -> Response | None:
        """Return a file of the page, or None when the path is not one."""
        if path not in STATIC_FILES:
            return None
        name, content_type = STATIC_FILES[path]
        return Response(
            200, content_type, resources.files("agent.page").joinpath(name).read_bytes()
        )

    def create(self, body: bytes) -> Response:
        """``POST /api/jobs``: a request as JSON, the same fields as over MQTT."""
        try:
            return Response.json(202, self._call(self._agent.submit_web(body)))
        except RequestError as exc:
            return Response.json(
                ERROR_STATUS.get(exc.code, 400), error_body(exc.job_id, exc.code, exc.message)
            )

    def status(self, job_id: str) -> Response:
        """``GET /api/jobs/<id>``: where a job stands, and its reply once it has one."""
        found = self._call(self._agent.job_status(job_id))
        return Response.json(200, found) if found is not None else not_found_json(job_id)

    def cancel(self, job_id: str) -> Response:
        """``POST /api/jobs/<id>/cancel``."""
        if self._call(self._agent.cancel_web(job_id)):
            return Response.json(202, {"id": job_id, "cancelling": True})
        return not_found_json(job_id)

    def gallery(self) -> Response:
        """``GET /api/images``: the newest images, newest first."""
        return Response.json(200, {"images": self._call(self._agent.gallery(GALLERY_SIZE))})

    def stream(self, job_id: str, start: Callable[[], None]) -> Generator[bytes, None, None] | None:
        """``GET /api/jobs/<id>/events``: server-sent events until the job ends.

        Args:
            job_id: The job.
            start: Called once the job is known, to send the stream's headers.

        Returns:
            The stream's chunks, or None when the job is unknown.
        """
        listened = self.events.listen(job_id)
        snapshot = self._call(self._agent.job_status(job_id))
        if snapshot is None:
            self.events.stop(job_id, listened)
            return None
        start()
        return self._chunks(job_id, listened, snapshot)

    def _chunks(
        self, job_id: str, listened: queue.Queue[dict[str, Any]], snapshot: dict[str, Any]
    ) -> Generator[bytes, None, None]:
        try:
            yield sse("status", snapshot)
            if snapshot["status"] == "done":
                return
            waited = 0.0
            while waited < STREAM_MAX_S:
                try:
                    event = listened.get(timeout=STREAM_KEEPALIVE_S)
                except queue.Empty:
                    waited += STREAM_KEEPALIVE_S
                    yield b": keepalive\n\n"
                    continue
                yield sse("job", event)
                if event["event"] in TERMINAL_EVENTS:
                    yield sse("status", self._call(self._agent.job_status(job_id)))
                    return
        finally:
            self.events.stop(job_id, listened)


def sse(event: str, data: object) -> bytes:
    """Return one server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def not_found_json(job_id: str) -> Response:
    """Return the API's 404."""
    return Response.json(
        404, error_body(job_id, ErrorCode.UNKNOWN_JOB, f"no job has the id {job_id}")
    )
