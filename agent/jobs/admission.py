"""The one way a request becomes a job: parse, bound, deduplicate, journal, acknowledge, queue.

Every entry point (MQTT generate, regenerate and fleet, the web page, the HTTP APIs) hands its
request here. :meth:`Admission.offer` does at once what needs no waiting: it parses, refuses
what is out of bounds, and takes a place in the queue, so the next request already sees it.
Then one task journals each admitted request, in arrival order (an image-to-image request once
its picture is fetched and stored: a slow picture delays only its own job), and only then
queues it and settles it: an MQTT request is acknowledged to the broker there, an HTTP request
answered. The queue depth is one number, counted here: requests admitted but not yet
journaled, plus jobs waiting in the runner.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.images import IMAGE_KEY_BYTES
from agent.jobs.errors import ErrorCode, RequestError
from agent.jobs.journal import JobStatus
from agent.jobs.runner import Job
from agent.machine.disk import StorageWatch, is_full

if TYPE_CHECKING:
    from collections.abc import Callable

    from agent.jobs.init_images import InitImages
    from agent.jobs.journal import Journal
    from agent.jobs.requests import JobSpec
    from agent.jobs.runner import Runner
    from agent.metrics import AgentMetrics

log = logging.getLogger(__name__)

REQUEST_OUTCOMES = ("accepted", "redelivered", *(code.value for code in ErrorCode))
"""Every value of the ``outcome`` label of the request counters."""


@dataclass(frozen=True)
class Admitted:
    """A request that was admitted: its job, and whether it had been seen before."""

    spec: JobSpec
    redelivered: bool = False
    """The same request again (a QoS 1 redelivery, a resend): answered from the journal, never
    run twice."""


@dataclass
class Ticket:
    """A request between its admission and its journal row."""

    spec: JobSpec
    fingerprint: str
    expires_at: float | None
    api: str
    settled: asyncio.Future[Admitted]
    cancel_requested: bool = False
    """A cancel came before the request was journaled: the job is cancelled once it is."""
    prepared: asyncio.Task[JobSpec] | None = None
    """An image-to-image request's picture being fetched, checked and stored (begun at once;
    the request joins the journal's line once it is done)."""


class Admission:
    """Admits requests from every entry point into the journal and the runner's queue."""

    def __init__(  # noqa: PLR0913 - the parts admission ties together
        self,
        *,
        journal: Journal,
        runner: Runner,
        metrics: AgentMetrics,
        max_queue: int,
        on_change: Callable[[], None],
        init_images: InitImages,
        storage: StorageWatch | None = None,
    ) -> None:
        """Create the admission; :meth:`run` journals what is offered.

        Args:
            journal: Where admitted jobs are recorded before they are acknowledged.
            runner: Where journaled jobs are queued.
            metrics: Request outcomes (per API) and the queue depth.
            max_queue: Jobs waiting at most; one more is refused as busy.
            on_change: Called when the queue depth changes.
            init_images: Where image-to-image requests' pictures are checked and stored.
            storage: Where a journal that cannot be written is recorded.
        """
        self._init_images = init_images
        self._journal = journal
        self._runner = runner
        self._metrics = metrics
        self._max_queue = max_queue
        self._on_change = on_change
        self._storage = storage or StorageWatch({})
        self._intake: asyncio.Queue[Ticket] = asyncio.Queue()
        self._pending: list[Ticket] = []
        """Tickets offered and not yet settled, in arrival order: they count in the queue
        depth, and a cancel must find them."""
        self._open = True
        self.last_spec: JobSpec | None = None
        """The most recent request admitted (the regenerate button runs it again)."""

    @property
    def queue_depth(self) -> int:
        """Return how many jobs wait: admitted and not yet journaled, or queued in the runner."""
        return len(self._pending) + self._runner.depth

    def close(self) -> None:
        """Refuse every request from now on (shutting down)."""
        self._open = False

    def offer(
        self,
        parse: Callable[[], JobSpec],
        *,
        fingerprint: str,
        api: str,
        expires_at: float | None = None,
    ) -> asyncio.Future[Admitted]:
        """Admit a request: parse and bound it now, journal and queue it in arrival order.

        Never raises: a refusal settles the returned future with its :class:`RequestError`,
        already counted in ``edgeai_requests_total``. The entry point answers it (an MQTT error
        reply, an HTTP status) and acknowledges the request once the future is settled.

        Args:
            parse: Returns the request's job, or raises the RequestError its reply carries.
            fingerprint: Identifies the request: the same request again has the same one.
            api: The entry point, for ``edgeai_api_requests_total`` (``mqtt``, ``web``...).
            expires_at: Wall-clock time after which the job is not run.
        """
        settled: asyncio.Future[Admitted] = asyncio.get_running_loop().create_future()
        try:
            spec = dataclasses.replace(parse(), image_key=secrets.token_hex(IMAGE_KEY_BYTES))
            self._check_room(spec)
        except RequestError as exc:
            self._count(exc.code.value, api, exc.mode)
            settled.set_exception(exc)
            return settled
        ticket = Ticket(spec, fingerprint, expires_at, api, settled)
        self._pending.append(ticket)
        if spec.init_source is None:
            self._intake.put_nowait(ticket)
        else:
            # Fetched and decoded beside the line, not in it: a picture that trickles in from a
            # slow camera must not hold up the requests behind it.
            ticket.prepared = asyncio.create_task(
                self._init_images.prepare(spec), name=f"init-image-{spec.id}"
            )
            ticket.prepared.add_done_callback(lambda _task: self._intake.put_nowait(ticket))
        self._changed()
        return settled

    async def cancel(self, job_id: str) -> bool:
        """Cancel a job: queued or running, or offered and not yet journaled.

        A request is journaled a moment after it is offered; a cancel sent right behind it
        (the next MQTT message from the same client) comes in that moment, and is kept for it.

        Returns:
            Whether a job with this id was pending, queued or running.
        """
        found = await self._runner.cancel(job_id)
        for ticket in self._pending:
            if ticket.spec.id == job_id:
                ticket.cancel_requested = True
                found = True
        return found

    def refuse(self, error: RequestError, api: str) -> None:
        """Count a request an entry point refused before it could be offered (a retained one)."""
        self._count(error.code.value, api, error.mode)

    async def run(self) -> None:
        """Journal each admitted request in arrival order, then queue it (cancel to stop)."""
        while True:
            ticket = await self._intake.get()
            mode = ticket.spec.mode
            admitted: Admitted | None = None
            try:
                if ticket.prepared is not None:
                    ticket.spec = self._prepared_spec(ticket.prepared)
                admitted = await self._accept(ticket)
                if ticket.cancel_requested:
                    await self._runner.cancel(admitted.spec.id)
            except RequestError as exc:
                exc.job_id, exc.reply_to = ticket.spec.id, ticket.spec.reply_to
                self._count(exc.code.value, ticket.api, mode)
                ticket.settled.set_exception(exc)
            except Exception as exc:  # noqa: BLE001 - a request must never go unanswered
                error = self._error_of(exc, ticket.spec)
                self._count(error.code.value, ticket.api, mode)
                ticket.settled.set_exception(error)
            else:
                self._storage.succeeded("the journal")
                ticket.settled.set_result(admitted)
            finally:
                self._pending.remove(ticket)
                if admitted is None or admitted.redelivered:
                    # Stored for a request that never became a job of its own.
                    await self._init_images.discard(ticket.spec)
                self._changed()

    def _prepared_spec(self, prepared: asyncio.Task[JobSpec]) -> JobSpec:
        """Return the job of a request whose picture is stored (its task is done).

        Raises:
            RequestError: The picture's own error, or shutting down where its task was cancelled.
        """
        if prepared.cancelled():
            raise RequestError(ErrorCode.SHUTTING_DOWN, "the agent is shutting down")
        return prepared.result()

    async def _accept(self, ticket: Ticket) -> Admitted:
        spec = ticket.spec
        entry = await self._journal.get(spec.id)
        if entry is not None and entry.request_hash == ticket.fingerprint:
            # The same request again: never run it twice; a finished one is answered again.
            self._count("redelivered", ticket.api, spec.mode)
            if entry.status in (JobStatus.DONE, JobStatus.DELIVERED):
                await self._runner.redeliver(entry)
            return Admitted(entry.spec, redelivered=True)
        if entry is not None and entry.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            raise RequestError(
                ErrorCode.DUPLICATE_ID,
                f"another request with id {spec.id} is in progress",
                job_id=spec.id,
                reply_to=spec.reply_to,
            )
        await self._journal.add(spec, ticket.fingerprint, ticket.expires_at)
        self.last_spec = spec
        self._runner.submit(Job(spec, expires_at=ticket.expires_at, source=ticket.api))
        self._count("accepted", ticket.api, spec.mode)
        return Admitted(spec)

    def _error_of(self, exc: Exception, spec: JobSpec) -> RequestError:
        """Return the reply of a request whose journal row could not be written, or of a bug."""
        if isinstance(exc, (OSError, sqlite3.Error)):
            sentence = self._storage.failed("the journal", self._journal.path.parent, exc)
            code = ErrorCode.STORAGE_FULL if is_full(exc) else ErrorCode.STORAGE_ERROR
            return RequestError(code, sentence, job_id=spec.id, reply_to=spec.reply_to)
        log.error("unexpected error while admitting %s", spec.id, exc_info=exc)
        return RequestError(
            ErrorCode.INTERNAL_ERROR,
            f"internal error: {exc}",
            job_id=spec.id,
            reply_to=spec.reply_to,
        )

    def _check_room(self, spec: JobSpec) -> None:
        if not self._open:
            raise RequestError(
                ErrorCode.SHUTTING_DOWN,
                "the agent is shutting down",
                job_id=spec.id,
                reply_to=spec.reply_to,
                mode=spec.mode,
            )
        if self.queue_depth >= self._max_queue:
            raise RequestError(
                ErrorCode.BUSY,
                f"the queue is full ({self._max_queue} jobs); try again later",
                job_id=spec.id,
                reply_to=spec.reply_to,
                mode=spec.mode,
            )

    def _count(self, outcome: str, api: str, mode: str) -> None:
        self._metrics.requests.labels(outcome=outcome, mode=mode).inc()
        self._metrics.api_requests.labels(api=api, outcome=outcome).inc()

    def _changed(self) -> None:
        self._on_change()
