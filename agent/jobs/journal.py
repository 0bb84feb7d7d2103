"""The job journal: SQLite in WAL mode, the source of truth for every accepted job.

A job's row is committed before its request is acknowledged to the broker, so an accepted job
survives a crash of the agent, the worker or the machine. Rows move from ``queued`` to
``running`` to ``done`` (its reply is stored) to ``delivered`` (the broker acknowledged the
reply). On start, the agent runs again what was queued or running and publishes what was done
but not delivered.

SQLite calls block, so they run on one dedicated thread; the event loop only awaits them. One
thread also keeps every write in order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

from agent.jobs.requests import JobSpec

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

T = TypeVar("T")

log = logging.getLogger(__name__)

PRUNE_INTERVAL_S = 3600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    request_hash TEXT NOT NULL,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    reply TEXT,
    received_at REAL NOT NULL,
    expires_at REAL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, received_at);
"""


class JobStatus(StrEnum):
    """Where a job stands in the journal."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    DELIVERED = "delivered"


@dataclass(frozen=True)
class JournalEntry:
    """One job's row."""

    spec: JobSpec
    request_hash: str
    status: JobStatus
    attempts: int
    reply: dict[str, Any] | None
    received_at: float
    expires_at: float | None


def _spec_to_json(spec: JobSpec) -> str:
    # The picture as sent is not kept: its stored file (init_image) is.
    fields = asdict(dataclasses.replace(spec, init_source=None))
    del fields["init_source"]
    data = fields.pop("correlation_data")
    fields["correlation_data"] = data.hex() if data is not None else None
    return json.dumps(fields)


def _spec_from_json(text: str) -> JobSpec:
    fields = json.loads(text)
    data = fields.pop("correlation_data")
    fields["loras"] = tuple((name, weight) for name, weight in fields.get("loras", ()))
    return JobSpec(**fields, correlation_data=bytes.fromhex(data) if data is not None else None)


def _entry(row: sqlite3.Row) -> JournalEntry:
    return JournalEntry(
        spec=_spec_from_json(row["spec"]),
        request_hash=row["request_hash"],
        status=JobStatus(row["status"]),
        attempts=row["attempts"],
        reply=json.loads(row["reply"]) if row["reply"] is not None else None,
        received_at=row["received_at"],
        expires_at=row["expires_at"],
    )


class Journal:
    """Durable job records; every method but :meth:`open` and :meth:`close` is awaited."""

    def __init__(self, path: Path) -> None:
        """Open (and create) the journal; commits are durable (WAL, ``synchronous=FULL``).

        Args:
            path: The SQLite file.
        """
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal")
        self._connection = self._executor.submit(self._connect, path).result()

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        connection = sqlite3.connect(
            path, isolation_level=None
        )  # autocommit: one write, one commit
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.executescript(_SCHEMA)
        return connection

    async def _run(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def close(self) -> None:
        """Close the database (after the loop's last journal call)."""
        self._executor.submit(self._connection.close).result()
        self._executor.shutdown()

    async def get(self, job_id: str) -> JournalEntry | None:
        """Return a job's row, if the journal has one."""

        def read() -> JournalEntry | None:
            row = self._connection.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return _entry(row) if row is not None else None

        return await self._run(read)

    async def add(self, spec: JobSpec, request_hash: str, expires_at: float | None) -> None:
        """Record an accepted job as queued, replacing an earlier finished job of the same id."""
        now = time.time()

        def write() -> None:
            self._connection.execute(
                "INSERT OR REPLACE INTO jobs (id, request_hash, spec, status, attempts,"
                " received_at, expires_at, updated_at) VALUES (?, ?, ?, 'queued', 0, ?, ?, ?)",
                (spec.id, request_hash, _spec_to_json(spec), now, expires_at, now),
            )

        await self._run(write)

    async def start(self, job_id: str) -> int:
        """Mark a job running and return its attempt number (1 for the first run)."""

        def write() -> int:
            row = self._connection.execute(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, updated_at = ?"
                " WHERE id = ? RETURNING attempts",
                (time.time(), job_id),
            ).fetchone()
            return int(row[0]) if row is not None else 1

        return await self._run(write)

    async def requeue(self, job_id: str, *, refund: bool) -> None:
        """Put a running job back in the queue; ``refund`` does not count the interrupted run."""
        refunded = 1 if refund else 0

        def write() -> None:
            self._connection.execute(
                "UPDATE jobs SET status = 'queued', attempts = MAX(attempts - ?, 0), updated_at = ?"
                " WHERE id = ?",
                (refunded, time.time(), job_id),
            )

        await self._run(write)

    async def finish(self, job_id: str, reply: dict[str, Any]) -> None:
        """Store a job's reply (a result or an error): it is done, not yet delivered."""

        def write() -> None:
            self._connection.execute(
                "UPDATE jobs SET status = 'done', reply = ?, updated_at = ? WHERE id = ?",
                (json.dumps(reply), time.time(), job_id),
            )

        await self._run(write)

    async def delivered(self, job_id: str) -> None:
        """Record that the broker acknowledged a job's reply."""

        def write() -> None:
            self._connection.execute(
                "UPDATE jobs SET status = 'delivered', updated_at = ?"
                " WHERE id = ? AND status = 'done'",
                (time.time(), job_id),
            )

        await self._run(write)

    async def latest(self) -> JobSpec | None:
        """Return the most recently received job's request, if any."""

        def read() -> JobSpec | None:
            row = self._connection.execute(
                "SELECT spec FROM jobs ORDER BY received_at DESC LIMIT 1"
            ).fetchone()
            return _spec_from_json(row["spec"]) if row is not None else None

        return await self._run(read)

    async def recent(self, limit: int) -> list[JournalEntry]:
        """Return the newest finished jobs that produced an image, newest first."""

        def read() -> list[JournalEntry]:
            rows = self._connection.execute(
                "SELECT * FROM jobs WHERE status IN ('done', 'delivered')"
                " AND json_extract(reply, '$.status') = 'ok' ORDER BY received_at DESC LIMIT ?",
                (limit,),
            ).fetchall()
            return [_entry(row) for row in rows]

        return await self._run(read)

    async def unfinished(self) -> list[JournalEntry]:
        """Return queued and running jobs, oldest first."""
        return await self._select("status IN ('queued', 'running')")

    async def undelivered(self) -> list[JournalEntry]:
        """Return done jobs whose reply the broker has not acknowledged, oldest first."""
        return await self._select("status = 'done'")

    async def _select(self, where: str) -> list[JournalEntry]:
        def read() -> list[JournalEntry]:
            rows = self._connection.execute(
                f"SELECT * FROM jobs WHERE {where} ORDER BY received_at"  # noqa: S608 - fixed clauses
            ).fetchall()
            return [_entry(row) for row in rows]

        return await self._run(read)

    async def keep_pruned(self, keep_s: float, keep_rows: int) -> None:
        """Prune every hour, for as long as the agent runs (see :meth:`prune`)."""
        while True:
            try:
                removed = await self.prune(keep_s, keep_rows)
            except (OSError, sqlite3.Error) as exc:
                # A full or failing disk: jobs report it; pruning tries again next interval.
                log.warning("journal: pruning failed (%s); trying again later", exc)
            else:
                if removed:
                    log.info("journal: removed %d delivered jobs", removed)
            await asyncio.sleep(PRUNE_INTERVAL_S)

    async def prune(self, keep_s: float, keep_rows: int) -> int:
        """Delete delivered jobs older than ``keep_s`` or beyond the newest ``keep_rows``.

        Returns:
            How many rows were deleted.
        """
        cutoff = time.time() - keep_s

        def write() -> int:
            cursor = self._connection.execute(
                "DELETE FROM jobs WHERE status = 'delivered' AND (updated_at < ? OR id NOT IN"
                " (SELECT id FROM jobs ORDER BY received_at DESC LIMIT ?))",
                (cutoff, keep_rows),
            )
            return cursor.rowcount

        return await self._run(write)
