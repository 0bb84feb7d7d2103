"""Job events fanned out to whoever follows a job (the web page's event streams)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

MAX_PENDING_EVENTS = 1000
"""A stream that stops reading loses events past this many rather than growing without bound."""


class JobEvents:
    """Fan-out of each job's events to its listeners, on the agent's loop."""

    def __init__(self) -> None:
        """Create an empty hub."""
        self._listeners: dict[str, list[asyncio.Queue[dict[str, Any]]]] = {}

    def listen(self, job_id: str) -> asyncio.Queue[dict[str, Any]]:
        """Return a queue that receives the job's events from now on."""
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue(MAX_PENDING_EVENTS)
        self._listeners.setdefault(job_id, []).append(events)
        return events

    def stop(self, job_id: str, events: asyncio.Queue[dict[str, Any]]) -> None:
        """Stop delivering to a queue from :meth:`listen`."""
        listeners = self._listeners.get(job_id, [])
        if events in listeners:
            listeners.remove(events)
        if not listeners:
            self._listeners.pop(job_id, None)

    def publish(self, job_id: str, event: dict[str, Any]) -> None:
        """Hand an event to every listener of the job (never blocks)."""
        for events in self._listeners.get(job_id, []):
            with contextlib.suppress(asyncio.QueueFull):
                events.put_nowait(event)
