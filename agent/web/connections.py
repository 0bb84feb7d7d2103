"""How many HTTP connections the agent holds: in all, from one address, and as event streams.

A connection costs the daemon a file descriptor from the moment it is accepted, before it has
sent a byte. Without a cap, a thousand bare connections from one host took every descriptor
the daemon had: ``/healthz`` went unanswered, the journal could not open its file, and asyncio
logged a traceback for each refused accept. Here each accepted connection is counted; one over
the total or its address's share is answered ``503`` and closed at once, and the refusals are
told in one log line a minute. The server asks :meth:`ConnectionGate.open_stream` before it
starts an event stream, which may last as long as a job.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from agent.settings import Settings

log = logging.getLogger(__name__)

REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 33\r\n"
    b"Connection: close\r\n\r\ntoo many connections; try again\n"
)
"""What a connection over a cap hears before it is closed: an answer, not a silent reset."""
REFUSAL_LOG_INTERVAL_S = 60.0
"""Refused connections are told in one log line at most this often."""
DESCRIPTORS_KEPT = 128
"""File descriptors kept for everything but connections: the journal, images, the broker,
the worker's pipes, the model's files."""
OPEN_FILES_CEILING = 1 << 20
"""The most the soft open-files limit is raised to, where the hard one is unlimited."""


@dataclass(frozen=True)
class ConnectionLimits:
    """The caps on open connections."""

    total: int
    per_peer: int
    streams: int
    trusted_peer: str | None = None
    """An address held only to the total (Home Assistant's ingress gateway, which carries every
    user's requests)."""


def connection_limits(settings: Settings) -> ConnectionLimits:
    """Return the caps the settings ask for, fitted to the open-files limit (raised first)."""
    asked = ConnectionLimits(
        total=settings.http_max_connections,
        per_peer=settings.http_max_connections_per_address,
        streams=settings.http_max_event_streams,
        trusted_peer=str(settings.ingress_peer) if settings.ingress_peer else None,
    )
    return fitted_limits(asked, raise_open_files_limit())


def raise_open_files_limit() -> int:
    """Raise this process's soft open-files limit to its hard one; return the soft limit now.

    The soft limit is often 1,024 where the hard one is far higher: the daemon is allowed more
    than it is given.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, wanted, exc)
    return OPEN_FILES_CEILING if soft == resource.RLIM_INFINITY else soft


def fitted_limits(limits: ConnectionLimits, open_files: int) -> ConnectionLimits:
    """Return the caps lowered, where needed, to half the descriptors left for connections."""
    room = max(16, (open_files - DESCRIPTORS_KEPT) // 2)
    if limits.total <= room:
        return limits
    log.warning(
        "HTTP connections capped at %d, not %d: the open-files limit is %d",
        room,
        limits.total,
        open_files,
    )
    return ConnectionLimits(
        room, min(limits.per_peer, room), min(limits.streams, room), limits.trusted_peer
    )


class ConnectionGate:
    """Counts open connections and event streams, and refuses those over the caps."""

    def __init__(self, limits: ConnectionLimits, on_refusal: Callable[[str], None]) -> None:
        """Hold connections to ``limits``.

        Args:
            limits: The caps.
            on_refusal: Called with ``too_many_connections`` for each connection refused, or
                ``too_many_streams`` for each event stream refused (the refusals metric).
        """
        self.limits = limits
        self._on_refusal = on_refusal
        self._by_peer: Counter[str] = Counter()
        self.open = 0
        self.streams = 0
        self._refused = 0
        self._told_at = -REFUSAL_LOG_INTERVAL_S

    def protocol_factory(
        self, server: Callable[[], asyncio.Protocol]
    ) -> Callable[[], asyncio.Protocol]:
        """Return a factory of ``server``'s protocols, each counted while its connection lasts."""
        return lambda: CountedConnection(self, server)

    def admit(self, peer: str) -> bool:
        """Count a new connection from ``peer``; return False (uncounted) when over a cap."""
        share = self._by_peer[peer]
        over_share = peer != self.limits.trusted_peer and share >= self.limits.per_peer
        if self.open >= self.limits.total or over_share:
            self._refuse("too_many_connections", peer)
            return False
        self._by_peer[peer] = share + 1
        self.open += 1
        return True

    def release(self, peer: str) -> None:
        """Uncount a connection from ``peer`` that has closed."""
        self.open -= 1
        self._by_peer[peer] -= 1
        if self._by_peer[peer] <= 0:
            del self._by_peer[peer]

    def open_stream(self, peer: str) -> bool:
        """Count an event stream about to start; return False when at the cap."""
        if self.streams >= self.limits.streams:
            self._refuse("too_many_streams", peer)
            return False
        self.streams += 1
        return True

    def close_stream(self) -> None:
        """Uncount an event stream that has ended."""
        self.streams -= 1

    def _refuse(self, reason: str, peer: str) -> None:
        self._on_refusal(reason)
        self._refused += 1
        now = time.monotonic()
        if now - self._told_at >= REFUSAL_LOG_INTERVAL_S:
            log.warning(
                "refusing HTTP connections over the caps: %d refused in the last minute, the "
                "latest from %s (%d open, cap %d; %d from that address, cap %d; %d event "
                "streams, cap %d)",
                self._refused,
                peer,
                self.open,
                self.limits.total,
                self._by_peer[peer],
                self.limits.per_peer,
                self.streams,
                self.limits.streams,
            )
            self._told_at, self._refused = now, 0


class CountedConnection(asyncio.Protocol):
    """One accepted connection: counted, then served by the HTTP server's own protocol."""

    def __init__(self, gate: ConnectionGate, server: Callable[[], asyncio.Protocol]) -> None:
        """Serve with a protocol from ``server`` once ``gate`` admits the connection."""
        self._gate = gate
        self._server = server
        self._inner: asyncio.Protocol | None = None
        self._peer = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admit the connection and hand it to the server, or answer 503 and close it."""
        peername = transport.get_extra_info("peername")
        self._peer = str(peername[0]) if peername else ""
        if not self._gate.admit(self._peer):
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(REFUSED)
            transport.close()
            return
        self._inner = self._server()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        """Uncount the connection and tell the server's protocol."""
        if self._inner is not None:
            self._gate.release(self._peer)
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Pass the bytes on (none are read from a refused connection)."""
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        """Pass the end of the client's side on."""
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        """Pass flow control on."""
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        """Pass flow control on."""
        if self._inner is not None:
            self._inner.resume_writing()
