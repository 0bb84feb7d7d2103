"""The HTTP server: one port for the page, every API, images, ``/metrics`` and ``/healthz``.

It runs the standard library's threading server in its own thread, so a slow client, a large
image or a long event stream never holds up the event loop. Every request is matched against the
route table first; the token and the body's size are checked before the body is read. Image
paths are matched against the exact names the agent writes, before any decoding, and opened
without following links: nothing else is reachable.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.images import CONTENT_TYPES, FILE_NAME
from agent.web.routing import (
    NOT_FOUND,
    Access,
    ContractErrors,
    Request,
    Response,
    Routes,
    Stream,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from prometheus_client import CollectorRegistry

    from agent.web.auth import TokenGate

log = logging.getLogger(__name__)


class AgentHttpServer:
    """Serves the page, the APIs, images, metrics and health on one port."""

    def __init__(self, host: str, port: int, image_dir: Path, registry: CollectorRegistry) -> None:
        """Bind the server (port 0 picks a free port); :meth:`start` serves.

        Args:
            host: Address to bind.
            port: Port to bind.
            image_dir: Folder of the images served under ``/images/``.
            registry: Metrics served under ``/metrics``.
        """
        self._image_dir = image_dir
        self._registry = registry
        self._health: Callable[[], tuple[bool, dict[str, Any]]] = lambda: (False, {})
        self.routes = Routes()
        self.max_body_bytes = 0
        self._gate: TokenGate | None = None
        plain = ContractErrors()
        self.routes.add("GET", "/metrics", self.metrics, access=Access.OPEN, shape=plain)
        self.routes.add("GET", "/healthz", self.healthz, access=Access.OPEN, shape=plain)
        image = "/images/(?P<name>[^/]*)"
        self.routes.add("GET", image, self.image, access=Access.READ, shape=plain)
        handler = type("Handler", (RequestHandler,), {"agent_server": self})
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    def start(
        self,
        health: Callable[[], tuple[bool, dict[str, Any]]],
        gate: TokenGate,
        max_body_bytes: int,
    ) -> None:
        """Serve in a background thread, once the APIs have added their routes.

        Args:
            health: Returns (healthy, details) for ``/healthz``.
            gate: Decides who may use which route.
            max_body_bytes: Largest request body read; a larger one is refused unread.
        """
        self._health = health
        self._gate = gate
        self.max_body_bytes = max_body_bytes
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket (blocks briefly: call it off the loop)."""
        self._server.shutdown()
        self._server.server_close()

    def dispatch(
        self, method: str, target: str, headers: dict[str, str], read: Callable[[int], bytes]
    ) -> Response | Stream:
        """Answer one request: route, token, body size, then the route's handler.

        Args:
            method: GET, HEAD or POST.
            target: The request target (path and query), undecoded.
            headers: The request's headers, names in lower case.
            read: Reads that many bytes of the body.
        """
        split = urlsplit(target)
        found = self.routes.find(method, split.path)
        if found is None:
            return NOT_FOUND
        route, params = found
        query = parse_qs(split.query)
        if self._gate is None or not self._gate.allows(route.access, headers, query, params):
            return route.shape.error(401, "unauthorized", "this needs the API token")
        length = int(headers.get("content-length") or 0)
        if length > self.max_body_bytes:
            message = f"the body is over {self.max_body_bytes} bytes"
            return route.shape.error(413, "payload_too_large", message)
        request = Request(
            method, split.path, query, headers, read(length) if length else b"", params
        )
        try:
            return route.handler(request)
        except Exception as exc:  # a request must never go unanswered, even on a bug
            log.exception("unexpected error while serving %s %s", method, split.path)
            return route.shape.error(500, "internal_error", f"internal error: {exc}")

    # --- the server's own routes
    def metrics(self, _request: Request) -> Response:
        """``/metrics``."""
        return Response(200, CONTENT_TYPE_LATEST, generate_latest(self._registry))

    def healthz(self, _request: Request) -> Response:
        """``/healthz``: 200 when healthy, else 503."""
        healthy, details = self._health()
        return Response(200 if healthy else 503, "application/json", json.dumps(details).encode())

    def image(self, request: Request) -> Response:
        """``/images/<name>``, for names the agent writes only; never through a link."""
        name = request.params["name"]
        # The raw, undecoded name must be one the agent writes: %2e, %2f, %00 and ../ fail here.
        if not FILE_NAME.match(name):
            return NOT_FOUND
        try:
            descriptor = os.open(self._image_dir / name, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return NOT_FOUND
        with os.fdopen(descriptor, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                return NOT_FOUND
            data = file.read()
        return Response(200, CONTENT_TYPES[name.rsplit(".", 1)[1]], data)


class RequestHandler(BaseHTTPRequestHandler):
    """One connection's requests, each answered by :meth:`AgentHttpServer.dispatch`."""

    server_version = "edgeai-agent"
    protocol_version = "HTTP/1.1"
    agent_server: AgentHttpServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002, ANN401 - stdlib signature
        """Log each request at debug level (the stdlib writes them to stderr)."""
        log.debug("%s %s", self.address_string(), format % args)

    def do_HEAD(self) -> None:
        """A GET without its body."""
        self._serve(head=True)

    def do_GET(self) -> None:
        """Any GET route."""
        self._serve()

    def do_POST(self) -> None:
        """Any POST route."""
        self._serve()

    def _serve(self, *, head: bool = False) -> None:
        answer = self.agent_server.dispatch(
            self.command,
            self.path,
            {name.lower(): value for name, value in self.headers.items()},
            self.rfile.read,
        )
        if isinstance(answer, Stream):
            self._stream(answer)
            return
        if answer.status == 413:
            self.close_connection = True  # the body was left unread
        self._send(answer, head=head)

    def _stream(self, stream: Stream) -> None:
        self.send_response(200)
        self.send_header("Content-Type", stream.content_type)
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            for chunk in stream.chunks:
                self.wfile.write(chunk)
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            log.debug("a stream was closed by the client")
        finally:
            stream.chunks.close()

    def _send(self, response: Response, *, head: bool = False) -> None:
        try:
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            if not head:
                self.wfile.write(response.body)
        except (BrokenPipeError, ConnectionResetError):
            # The client hung up while waiting: its job ran and was journaled regardless.
            log.debug("the client closed the connection before its answer")
