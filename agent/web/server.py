"""The HTTP server: one port for the page, every API, images, ``/metrics`` and ``/healthz``.

aiohttp serves on the agent's own event loop: it does the framing (Content-Length, chunked
bodies, keep-alive, a body left unread by an early answer), bounds request lines and headers,
and closes a connection that sends no complete request within the idle timeout. Every request
is then matched against the route table on its raw, undecoded path; the token, the origin of
a browser's write and the body's type and size are checked before the body is read. Image
paths are matched against the exact names the agent writes, before any decoding, and opened
without following links: nothing else is reachable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import socket
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qs, urlsplit

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.images import CONTENT_TYPES, FILE_NAME
from agent.settings import SettingsError
from agent.web.bodies import BadFormError, TooLargeError, read_form, read_within
from agent.web.connections import ConnectionGate
from agent.web.origin import cross_site_write, is_form_data, is_json
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
    from agent.web.connections import ConnectionLimits
    from agent.web.origin import HostAllowlist
    from agent.web.routing import Route

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 3.0
"""On stop, answers in progress (an event stream, a long download) get this long to end."""
LISTEN_BACKLOG = 128
PUBLIC_HEALTH = ("status", "state", "mqtt_connected")
"""What ``/healthz`` tells a request without the token."""
HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Server": "edgeai-agent",
}
"""Every answer: nothing cached along the way (results and tokens change), no type sniffing, and
no server library's name and version for a scanner to match."""
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors {ancestors}"
)
"""The page's Content-Security-Policy: its own files only; framed by its own origin (Home
Assistant's ingress frames it from Home Assistant's origin, which is the page's origin there)
and by the origins ``http_frame_ancestors`` adds."""


@dataclass(frozen=True)
class HttpConfig:
    """Where the server listens, what it accepts and how long it waits."""

    host: str
    port: int
    """0 picks a free port."""
    max_body_bytes: int
    """Largest request body read; a larger one is refused (413) unread."""
    max_picture_body_bytes: int
    """The same, on the routes that take a picture to start from."""
    idle_timeout_s: float
    """A connection with no complete request head within this (since it opened, or since its
    last answer) is closed; a body still arriving after this is refused (408)."""
    limits: ConnectionLimits
    """How many connections and event streams at once (:mod:`agent.web.connections`)."""
    frame_ancestors: tuple[str, ...] = ()
    """Origins besides the page's own that may frame it."""
    hosts: HostAllowlist | None = None
    """The names requests must address the agent by; None: any (the token guards the API)."""


class AgentHttpServer:
    """Serves the page, the APIs, images, metrics and health on one port."""

    def __init__(
        self,
        config: HttpConfig,
        image_dir: Path,
        registry: CollectorRegistry,
        on_refusal: Callable[[str], None] = lambda _reason: None,
    ) -> None:
        """Bind the socket now, so that the port is known; :meth:`start` serves.

        Args:
            config: Address, body size, idle timeout and who may frame the page.
            image_dir: Folder of the images served under ``/images/``.
            registry: Metrics served under ``/metrics``.
            on_refusal: Called with the reason of each request refused before its handler
                (one of :data:`agent.metrics.HTTP_REFUSALS`), for the metric.
        """
        self._image_dir = image_dir
        self._registry = registry
        self._config = config
        self._on_refusal = on_refusal
        self._health: Callable[[], tuple[bool, dict[str, Any]]] = lambda: (False, {})
        self._gate: TokenGate | None = None
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self.connections = ConnectionGate(config.limits, on_refusal)
        ancestors = " ".join(("'self'", *config.frame_ancestors))
        self._page_policy = PAGE_POLICY.format(ancestors=ancestors)
        self.routes = Routes()
        plain = ContractErrors()
        self.routes.add("GET", "/metrics", self.metrics, access=Access.OPEN, shape=plain)
        self.routes.add("GET", "/healthz", self.healthz, access=Access.OPEN, shape=plain)
        image = "/images/(?P<name>[^/]*)"
        self.routes.add("GET", image, self.image, access=Access.IMAGE, shape=plain)
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        address = (config.host, config.port)
        try:
            self._socket = socket.create_server(address, family=family, backlog=LISTEN_BACKLOG)
        except OSError as exc:  # a port taken, an address not here: one line, no traceback
            message = f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
            raise SettingsError(message) from exc
        self.port: int = self._socket.getsockname()[1]

    async def start(
        self, health: Callable[[], tuple[bool, dict[str, Any]]], gate: TokenGate
    ) -> None:
        """Serve on the running loop, once the APIs have added their routes.

        Args:
            health: Returns (healthy, details) for ``/healthz``.
            gate: Decides who may use which route.
        """
        self._health = health
        self._gate = gate
        # Bodies are read by read_within, each within its route's own bound.
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            logger=MalformedRequestLog(log, self._on_refusal),
            keepalive_timeout=self._config.idle_timeout_s,
            shutdown_timeout=SHUTDOWN_GRACE_S,
        )
        await self._runner.setup()
        server = self._runner.server
        if server is None:  # setup() makes it; never None here
            raise RuntimeError("the HTTP server was not set up")
        # Every accepted connection is counted before aiohttp serves it (over a cap: 503).
        self._listener = await asyncio.get_running_loop().create_server(
            self.connections.protocol_factory(cast("Callable[[], asyncio.Protocol]", server)),
            sock=self._socket,
            backlog=LISTEN_BACKLOG,
        )

    async def stop(self) -> None:
        """Stop taking connections, give answers in progress a moment, close the socket."""
        if self._listener is not None:
            self._listener.close()
        if self._runner is not None:
            await self._runner.cleanup()
        self._socket.close()

    async def _handle(self, raw: web.Request) -> web.StreamResponse:
        """Answer one request: route, token, origin, body, then the route's handler."""
        # The raw target: routes and image names are matched before any decoding.
        split = urlsplit(raw.raw_path)
        found = self.routes.find(raw.method, split.path)
        if found is None:
            return self._send(NOT_FOUND)
        route, params = found
        headers = {name.lower(): value for name, value in raw.headers.items()}
        query = parse_qs(split.query)
        refusal = self._misdirected(raw, route, headers.get("host")) or self._refusal(
            raw, route, headers, query, params
        )
        if refusal is not None:
            return self._send(refusal, close=raw.body_exists)
        read = await self._read_body(raw, route, headers) if route.method == "POST" else None
        if isinstance(read, Response):
            return self._send(read, close=True)
        body, form = read or (b"", None)
        request = Request(
            raw.method, split.path, query, headers, body, params, remote=raw.remote, form=form
        )
        try:
            answer = await route.handler(request)
        except Exception as exc:  # a request must never go unanswered, even on a bug
            log.exception("unexpected error while serving %s %s", raw.method, split.path)
            answer = route.shape.error(500, "internal_error", f"internal error: {exc}")
        if isinstance(answer, Stream):
            if not self.connections.open_stream(raw.remote or ""):
                await answer.chunks.aclose()
                message = "too many event streams are open; try again later"
                return self._send(route.shape.error(503, "too_many_streams", message))
            try:
                return await self._stream(raw, answer)
            finally:
                self.connections.close_stream()
        # A GET's body is never read: close rather than drain it.
        return self._send(answer, close=raw.body_exists and read is None)

    async def _read_body(
        self, raw: web.Request, route: Route, headers: dict[str, str]
    ) -> tuple[bytes, dict[str, list[bytes]] | None] | Response | None:
        """Read a POST's body within its route's bound and the idle timeout.

        Returns:
            The body (a form's fields too, for a form), None when there is none, or the answer
            to a body refused while it was read (the connection is then closed).
        """
        if not raw.body_exists:
            return None
        try:
            async with asyncio.timeout(self._config.idle_timeout_s):
                if is_form_data(headers.get("content-type", "")):
                    return b"", await read_form(raw, self._limit(route))
                return await read_within(raw, self._limit(route)), None
        except BadFormError as exc:
            self._on_refusal("malformed")
            return route.shape.error(400, "invalid_request", str(exc))
        except TooLargeError:
            return self._too_large(route)
        except TimeoutError:
            self._on_refusal("body_timeout")
            message = f"the body did not arrive within {self._config.idle_timeout_s:g} s"
            return route.shape.error(408, "timeout", message)

    def _misdirected(self, raw: web.Request, route: Route, host: str | None) -> Response | None:
        """Return the answer to a request that names another host (DNS rebinding), or None."""
        hosts = self._config.hosts
        from_ingress = self._gate is not None and self._gate.from_ingress(raw.remote)
        if hosts is None or from_ingress or hosts.allows(host):
            return None
        self._on_refusal("unknown_host")
        message = (
            "this agent is not known by that name; add it to EDGEAI_HTTP_ALLOWED_HOSTS "
            "(authentication is off, so requests must name the agent)"
        )
        return route.shape.error(421, "unknown_host", message)

    def _refusal(
        self,
        raw: web.Request,
        route: Route,
        headers: dict[str, str],
        query: dict[str, list[str]],
        params: dict[str, str],
    ) -> Response | None:
        """Return the answer to a request refused before its body is read, or None."""
        allowed = self._gate is not None and self._gate.allows(
            route.access, headers, query, params, raw.remote
        )
        if not allowed:
            self._on_refusal("unauthorized")
            refused = route.shape.error(401, "unauthorized", "this needs the API token")
            return dataclasses.replace(
                refused, headers={"WWW-Authenticate": 'Bearer realm="edgeai-agent"'}
            )
        if raw.content_length is not None and raw.content_length > self._limit(route):
            return self._too_large(route)
        if route.method != "POST":
            return None
        if cross_site_write(headers):
            self._on_refusal("cross_site")
            message = "a request from another site's page may not change anything here"
            return route.shape.error(403, "cross_site", message)
        content_type = headers.get("content-type", "")
        if raw.body_exists and not (
            is_json(content_type) or (route.body.multipart and is_form_data(content_type))
        ):
            self._on_refusal("unsupported_media_type")
            message = "send the body as JSON, with Content-Type: application/json"
            if route.body.multipart:
                message = "send the body as multipart/form-data (or JSON)"
            return route.shape.error(415, "unsupported_media_type", message)
        return None

    def _limit(self, route: Route) -> int:
        """Return the largest body a route reads."""
        if route.body.pictures:
            return self._config.max_picture_body_bytes
        return self._config.max_body_bytes

    def _too_large(self, route: Route) -> Response:
        self._on_refusal("payload_too_large")
        message = f"the body is over {self._limit(route)} bytes"
        return route.shape.error(413, "payload_too_large", message)

    def _send(self, answer: Response, *, close: bool = False) -> web.StreamResponse:
        headers = {**HEADERS, "Content-Type": answer.content_type, **answer.headers}
        if answer.content_type.startswith("text/html"):
            headers["Content-Security-Policy"] = self._page_policy
            headers["Referrer-Policy"] = "no-referrer"
        response = web.Response(status=answer.status, body=answer.body, headers=headers)
        if close:
            # The body was left unread: aiohttp would drain it; closing costs the client less.
            response.force_close()
        return response

    async def _stream(self, raw: web.Request, stream: Stream) -> web.StreamResponse:
        response = web.StreamResponse(
            status=200, headers={**HEADERS, "Content-Type": stream.content_type}
        )
        try:
            await response.prepare(raw)
            async for chunk in stream.chunks:
                await response.write(chunk)
        except ConnectionError:
            log.debug("a stream was closed by the client")
        finally:
            await stream.chunks.aclose()
        return response

    # --- the server's own routes
    async def metrics(self, _request: Request) -> Response:
        """``/metrics`` (collected off the loop: collectors read files and run vcgencmd)."""
        text = await asyncio.to_thread(generate_latest, self._registry)
        return Response(200, CONTENT_TYPE_LATEST, text)

    async def healthz(self, request: Request) -> Response:
        """``/healthz``: 200 when healthy, else 503.

        Anyone (a watchdog, a load balancer) reads whether and why in a word; the details (the
        worker's pid, an error naming the model's folder, a disk's free space) go to token
        holders only.
        """
        healthy, details = self._health()
        gate = self._gate
        if gate is None or not gate.allows(
            Access.TOKEN, request.headers, request.query, request.params, request.remote
        ):
            details = {key: value for key, value in details.items() if key in PUBLIC_HEALTH}
        return Response(200 if healthy else 503, "application/json", json.dumps(details).encode())

    async def image(self, request: Request) -> Response:
        """``/images/<name>``, for names the agent writes only; never through a link."""
        name = request.params["name"]
        # The raw, undecoded name must be one the agent writes: %2e, %2f, %00 and ../ fail here.
        if not FILE_NAME.match(name):
            return NOT_FOUND
        data = await asyncio.to_thread(self._read_image, name)
        if data is None:
            return NOT_FOUND
        return Response(200, CONTENT_TYPES[name.rsplit(".", 1)[1]], data)

    def _read_image(self, name: str) -> bytes | None:
        try:
            descriptor = os.open(self._image_dir / name, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        with os.fdopen(descriptor, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                return None
            return file.read()


class MalformedRequestLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server log, with requests too malformed to parse as one counted debug line.

    aiohttp answers them 400 itself and logs each with a traceback at ERROR: any client could
    fill the log that way. Every other error keeps its traceback.
    """

    def __init__(self, logger: logging.Logger, on_refusal: Callable[[str], None]) -> None:
        """Log to ``logger``; count each malformed request through ``on_refusal``."""
        super().__init__(logger)
        self._on_refusal = on_refusal

    def exception(self, msg: object, *args: object, **kwargs: Any) -> None:  # noqa: ANN401 - logging's signature
        """Log an error; a malformed request is counted and logged at debug, without traceback."""
        error = kwargs.get("exc_info")
        if isinstance(error, HttpProcessingError):
            self._on_refusal("malformed")
            self.logger.debug("refused a malformed request (%s)", error.message)
            return
        super().exception(msg, *args, **kwargs)
