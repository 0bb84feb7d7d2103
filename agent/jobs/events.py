"""Job events fanned out to listeners in other threads (the web page's event streams)."""

from __future__ import annotations

import queue
import threading
from typing import Any

MAX_PENDING_EVENTS = 1000
"""A stream that stops reading loses events past this many rather than growing without bound."""


class JobEvents:
    """Thread-safe fan-out of each job's events to whoever listens to that job."""

    def __init__(self) -> None:
        """Create an empty hub."""
        self._lock = threading.Lock()
        self._listeners: dict[str, list[queue.Queue[dict[str, Any]]]] = {}

    def listen(self, job_id: str) -> queue.Queue[dict[str, Any]]:
        """Return a queue that receives the job's events from now on."""
        events: queue.Queue[dict[str, Any]] = queue.Queue(MAX_PENDING_EVENTS)
        with self._lock:
            self._listeners.setdefault(job_id, []).append(events)
        return events

    def stop(self, job_id: str, events: queue.Queue[dict[str, Any]]) -> None:
        """Stop delivering to a queue from :meth:`listen`."""
        with self._lock:
            listeners = self._listeners.get(job_id, [])
            if events in listeners:
                listeners.remove(events)
            if not listeners:
                self._listeners.pop(job_id, None)

    def publish(self, job_id: str, event: dict[str, Any]) -> None:
        """Hand an event to every listener of the job (never blocks)."""
        with self._lock:
            listeners = list(self._listeners.get(job_id, []))
        for events in listeners:
            try:
                events.put_nowait(event)
            except queue.Full:
                continue
