"""Requests, responses and the route table every HTTP API of the agent registers into.

Each route names who may use it (anyone, token holders for reads, token holders for writes)
and the error shape its API speaks (the MQTT error body, OpenAI's, AUTOMATIC1111's), so the
server refuses an unauthorized or oversized request in the words its client expects.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from agent.jobs.requests import decode_json

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Generator, Mapping

CALL_TIMEOUT_S = 30.0
"""A quick call into the agent's loop (a lookup, a cancel) answers within this, or fails."""


class Access(Enum):
    """Who may use a route when the agent has an API token."""

    OPEN = "open"
    READ = "read"
    """Token holders; anyone when images are public."""
    WRITE = "write"
    """Token holders only: creating and cancelling jobs."""


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

    @classmethod
    def text(cls, status: int, text: str) -> Response:
        """Return a plain text response."""
        return cls(status, "text/plain; charset=utf-8", text.encode())


@dataclass(frozen=True)
class Stream:
    """A response sent as it is produced (server-sent events)."""

    content_type: str
    chunks: Generator[bytes, None, None]


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


@dataclass(frozen=True)
class Route:
    """One method and path pattern, its handler, who may use it and how it words errors."""

    method: str
    pattern: re.Pattern[str]
    handler: Callable[[Request], Response | Stream]
    access: Access
    shape: ErrorShape


class Routes:
    """The route table of the agent's one HTTP server."""

    def __init__(self) -> None:
        """Start empty; each API adds its routes."""
        self._routes: list[Route] = []

    def add(
        self,
        method: str,
        path: str,
        handler: Callable[[Request], Response | Stream],
        *,
        access: Access,
        shape: ErrorShape,
    ) -> None:
        """Add a route; ``path`` is a regular expression matched against the whole path."""
        self._routes.append(Route(method, re.compile(f"^{path}$"), handler, access, shape))

    def find(self, method: str, path: str) -> tuple[Route, dict[str, str]] | None:
        """Return the route for a request and its path parameters, or None."""
        wanted = "GET" if method == "HEAD" else method
        for route in self._routes:
            match = route.pattern.match(path)
            if match and route.method == wanted:
                return route, match.groupdict()
        return None


class LoopCalls:
    """Runs coroutines on the agent's loop from the HTTP server's threads."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        """Call into ``loop``."""
        self._loop = loop

    def call(self, coroutine: Coroutine[Any, Any, Any], timeout: float = CALL_TIMEOUT_S) -> Any:  # noqa: ANN401 - the coroutine's value
        """Return the coroutine's value; raise what it raises, or TimeoutError after ``timeout``.

        On a timeout the coroutine is cancelled on the loop.
        """
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise


def json_body(request: Request) -> Any:  # noqa: ANN401 - any JSON value
    """Return the request's body parsed as strict JSON (no NaN, no repeated keys).

    Raises:
        RequestError: The body is not UTF-8 or not JSON.
    """
    return decode_json(request.body, len(request.body))
