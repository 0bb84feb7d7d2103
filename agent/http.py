"""The HTTP server: ``/images/<file>``, ``/metrics`` and ``/healthz``.

It runs the standard library's threading server in its own thread, so a slow client or a large
image never holds up the event loop. Image paths are matched against the exact names the agent
writes, before any decoding, and opened without following links: nothing else is reachable.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.images import CONTENT_TYPES, FILE_NAME

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

IMAGES_PREFIX = "/images/"


class AgentHttpServer:
    """Serves images, metrics and health on one port."""

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
        handler = _handler_class(image_dir, registry, health)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket (blocks briefly: call it off the loop)."""
        self._server.shutdown()
        self._server.server_close()


def _handler_class(  # noqa: C901 - one small method per route, nested for the closure
    image_dir: Path,
    registry: CollectorRegistry,
    health: Callable[[], tuple[bool, dict[str, Any]]],
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "edgeai-agent"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002, ANN401 - stdlib signature
            log.debug("%s %s", self.address_string(), format % args)

        def do_HEAD(self) -> None:
            self._route(head=True)

        def do_GET(self) -> None:
            self._route(head=False)

        def _route(self, *, head: bool) -> None:
            path = urlsplit(self.path).path
            if path == "/metrics":
                self._send(HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(registry), head)
            elif path == "/healthz":
                healthy, details = health()
                status = HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE
                body = json.dumps(details).encode()
                self._send(status, "application/json", body, head)
            elif path.startswith(IMAGES_PREFIX):
                self._image(path.removeprefix(IMAGES_PREFIX), head)
            else:
                self._not_found(head)

        def _image(self, name: str, head: bool) -> None:
            # The raw, undecoded name must be one the agent writes: %2e, %2f, %00 and ../ fail here.
            if not FILE_NAME.match(name):
                self._not_found(head)
                return
            try:
                descriptor = os.open(image_dir / name, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                self._not_found(head)
                return
            with os.fdopen(descriptor, "rb") as file:
                if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                    self._not_found(head)
                    return
                data = file.read()
            content_type = CONTENT_TYPES[name.rsplit(".", 1)[1]]
            self._send(HTTPStatus.OK, content_type, data, head, cache="max-age=3600")

        def _not_found(self, head: bool) -> None:
            self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n", head)

        def _send(
            self,
            status: HTTPStatus,
            content_type: str,
            body: bytes,
            head: bool,
            cache: str = "no-store",
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", cache)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            if not head:
                self.wfile.write(body)

    return Handler
