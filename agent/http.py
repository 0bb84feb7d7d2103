"""The HTTP server: the web page and its API, ``/images/<file>``, ``/metrics`` and ``/healthz``.

It runs the standard library's threading server in its own thread, so a slow client, a large
image or a long event stream never holds up the event loop. Image paths are matched against the
exact names the agent writes, before any decoding, and opened without following links: nothing
else is reachable.
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
from agent.web import JOB_PATH, Response

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from prometheus_client import CollectorRegistry

    from agent.web import WebApi

log = logging.getLogger(__name__)

IMAGES_PREFIX = "/images/"
UNAUTHORIZED = Response.json(
    401,
    {"status": "error", "error": {"code": "unauthorized", "message": "this needs the API token"}},
)
NOT_FOUND = Response(404, "text/plain; charset=utf-8", b"not found\n")


class AgentHttpServer:
    """Serves the page, its API, images, metrics and health on one port."""

    def __init__(
        self,
        host: str,
        port: int,
        image_dir: Path,
        registry: CollectorRegistry,
        health: Callable[[], tuple[bool, dict[str, Any]]],
    ) -> None:
        """Bind the server (port 0 picks a free port); :meth:`start` serves.

        Args:
            host: Address to bind.
            port: Port to bind.
            image_dir: Folder of the images served under ``/images/``.
            registry: Metrics served under ``/metrics``.
            health: Returns (healthy, details) for ``/healthz``.
        """
        self._image_dir = image_dir
        self._registry = registry
        self._health = health
        self.api: WebApi | None = None
        self._server = ThreadingHTTPServer((host, port), _handler_class(self))
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    def start(self, api: WebApi) -> None:
        """Serve in a background thread, with the page's API."""
        self.api = api
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket (blocks briefly: call it off the loop)."""
        self._server.shutdown()
        self._server.server_close()

    # --- routes that need no agent call
    def metrics(self) -> Response:
        """``/metrics``."""
        return Response(200, CONTENT_TYPE_LATEST, generate_latest(self._registry))

    def healthz(self) -> Response:
        """``/healthz``: 200 when healthy, else 503."""
        healthy, details = self._health()
        return Response(200 if healthy else 503, "application/json", json.dumps(details).encode())

    def image(self, name: str) -> Response:
        """``/images/<name>``, for names the agent writes only; never through a link."""
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


def _handler_class(server: AgentHttpServer) -> type[BaseHTTPRequestHandler]:  # noqa: C901 - every route in one place
    class Handler(BaseHTTPRequestHandler):
        server_version = "edgeai-agent"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002, ANN401 - stdlib signature
            log.debug("%s %s", self.address_string(), format % args)

        def do_HEAD(self) -> None:
            self._send(self._get(), head=True)

        def do_GET(self) -> None:
            split = urlsplit(self.path)
            api = server.api
            match = JOB_PATH.match(split.path)
            if api is not None and match and match["rest"] == "/events":
                self._stream(api, match["id"])
                return
            self._send(self._get())

        def do_POST(self) -> None:
            self._send(self._post())

        def _token(self) -> tuple[str | None, str | None]:
            query = parse_qs(urlsplit(self.path).query)
            return self.headers.get("Authorization"), query.get("token", [""])[0] or None

        def _get(self) -> Response:  # noqa: PLR0911 - one return per route
            path = urlsplit(self.path).path
            api = server.api
            if path == "/metrics":
                return server.metrics()
            if path == "/healthz":
                return server.healthz()
            if api is None:
                return NOT_FOUND
            if path.startswith(IMAGES_PREFIX) or path == "/api/images":
                if not api.may_read(*self._token()):
                    return UNAUTHORIZED
                if path == "/api/images":
                    return api.gallery()
                return server.image(path.removeprefix(IMAGES_PREFIX))
            match = JOB_PATH.match(path)
            if match and match["rest"] is None:
                return api.status(match["id"])
            return api.static(path) or NOT_FOUND

        def _post(self) -> Response:
            path = urlsplit(self.path).path
            api = server.api
            match = JOB_PATH.match(path)
            if api is None or not (path == "/api/jobs" or (match and match["rest"] == "/cancel")):
                return NOT_FOUND
            if not api.may_write(*self._token()):
                return UNAUTHORIZED
            length = int(self.headers.get("Content-Length") or 0)
            if length > api.max_payload_bytes:
                self.close_connection = True  # the body is left unread
                return Response.json(
                    413,
                    {
                        "status": "error",
                        "error": {
                            "code": "payload_too_large",
                            "message": f"the body is over {api.max_payload_bytes} bytes",
                        },
                    },
                )
            body = self.rfile.read(length)
            if path == "/api/jobs":
                return api.create(body)
            assert match is not None  # noqa: S101 - checked above
            return api.cancel(match["id"])

        def _stream(self, api: WebApi, job_id: str) -> None:
            def start() -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-store")
                self.send_header("Connection", "close")
                self.end_headers()

            if not api.may_read(*self._token()):
                self._send(UNAUTHORIZED)
                return
            chunks = api.stream(job_id, start)
            if chunks is None:
                self._send(NOT_FOUND)
                return
            self.close_connection = True
            try:
                for chunk in chunks:
                    self.wfile.write(chunk)
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                log.debug("event stream of %s closed by the client", job_id)
            finally:
                chunks.close()

        def _send(self, response: Response, *, head: bool = False) -> None:
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            if not head:
                self.wfile.write(response.body)

    return Handler
