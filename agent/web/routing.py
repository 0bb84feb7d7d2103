"""Requests, responses and the route table every HTTP API of the agent registers into.

Each route names who may use it (anyone, holders of an image's signature, token holders) and
the error shape its API speaks (the MQTT error body, OpenAI's, AUTOMATIC1111's), so the server
refuses an unauthorized, cross-site or oversized request in the words its client expects.
Handlers are coroutines on the agent's own event loop.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from agent.jobs.payloads import decode_json

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping


class Access(Enum):
    """Who may use a route when the agent has an API token."""

    OPEN = "open"
    IMAGE = "image"
    """An image file: its URL's signature opens it; so does the token; anyone when images are
    public."""
    GALLERY = "gallery"
    """The list of recent images: token holders; anyone when images are public."""
    TOKEN = "token"  # noqa: S105 - a level of access, not a secret
    """Token holders only: jobs, their status and events, every API."""


@dataclass(frozen=True)
class Request:
    """One HTTP request, read whole (bodies are bounded before they are read)."""

    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]
    """Names in lower case (HTTP header names are not case-sensitive; clients differ)."""
    body: bytes = b""
    params: Mapping[str, str] = field(default_factory=dict)
    """Named groups of the route's path pattern."""
    remote: str | None = None
    """The peer's address."""
    form: Mapping[str, list[bytes]] | None = None
    """A ``multipart/form-data`` body's fields (text or a file's bytes) by name, in order; None
    for any other body."""


@dataclass(frozen=True)
class Response:
    """A complete HTTP response."""

    status: int
    content_type: str
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    """Headers beyond the ones every answer carries."""

    @classmethod
    def json(cls, status: int, data: object) -> Response:
        """Return a JSON response."""
        return cls(status, "application/json", json.dumps(data).encode())

    @classmethod
    def text(cls, status: int, text: str) -> Response:
        """Return a plain text response."""
        return cls(status, "text/plain; charset=utf-8", text.encode())


@dataclass(frozen=True)
class Stream:
    """A response sent as it is produced (server-sent events)."""

    content_type: str
    chunks: AsyncGenerator[bytes, None]


NOT_FOUND = Response.text(404, "not found\n")


class ErrorShape(Protocol):
    """How an API words its errors."""

    def error(self, status: int, code: str, message: str, param: str | None = None) -> Response:
        """Return the response of an error."""


class ContractErrors:
    """The agent's own error body, as on MQTT: ``{"status": "error", "error": {...}}``."""

    def error(self, status: int, code: str, message: str, param: str | None = None) -> Response:
        """Return the error body with its stable code."""
        del param
        body = {"status": "error", "error": {"code": code, "message": message}}
        return Response.json(status, body)


Handler: TypeAlias = "Callable[[Request], Awaitable[Response | Stream]]"


@dataclass(frozen=True)
class Body:
    """What a route's request body may be."""

    pictures: bool = False
    """It may carry a picture: bounded by the picture bound, not the text one."""
    multipart: bool = False
    """``multipart/form-data`` is accepted besides JSON (a file upload)."""


JSON_BODY = Body()


@dataclass(frozen=True)
class Route:
    """One method and path pattern, its handler, who may use it and how it words errors."""

    method: str
    pattern: re.Pattern[str]
    handler: Handler
    access: Access
    shape: ErrorShape
    body: Body = JSON_BODY


class Routes:
    """The route table of the agent's one HTTP server."""

    def __init__(self) -> None:
        """Start empty; each API adds its routes."""
        self._routes: list[Route] = []

    def add(  # noqa: PLR0913 - a route's parts, each named at the call
        self,
        method: str,
        path: str,
        handler: Handler,
        *,
        access: Access,
        shape: ErrorShape,
        body: Body = JSON_BODY,
    ) -> None:
        """Add a route; ``path`` is a regular expression matched against the whole path."""
        self._routes.append(Route(method, re.compile(f"^{path}$"), handler, access, shape, body))

    def find(self, method: str, path: str) -> tuple[Route, dict[str, str]] | None:
        """Return the route for a request and its path parameters, or None."""
        wanted = "GET" if method == "HEAD" else method
        for route in self._routes:
            match = route.pattern.match(path)
            if match and route.method == wanted:
                return route, match.groupdict()
        return None


def json_body(request: Request) -> Any:  # noqa: ANN401 - any JSON value
    """Return the request's body parsed as strict JSON (no NaN, no repeated keys).

    Raises:
        RequestError: The body is not UTF-8 or not JSON.
    """
    return decode_json(request.body, len(request.body))
