"""The job runner: a bounded queue and one job at a time on the worker, every step journaled."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.jobs.errors import ErrorCode, RequestError, error_body
from agent.jobs.journal import JobStatus
from agent.machine.disk import StorageWatch, is_full
from agent.model.link import WorkerDiedError, WorkerUnavailableError
from agent.model.protocol import Cancelled, Failed, Finished

if TYPE_CHECKING:
    from collections.abc import Callable

    from agent.jobs.init_images import InitImages
    from agent.jobs.journal import Journal, JournalEntry
    from agent.jobs.outbox import Outbox
    from agent.jobs.requests import JobSpec
    from agent.jobs.switching import ModelSwitcher
    from agent.machine.thermal import ThermalGuard
    from agent.metrics import AgentMetrics
    from agent.model.link import WorkerLink
    from agent.model.lora_shelf import LoraShelf

log = logging.getLogger(__name__)


@dataclass
class Job:
    """A job in the agent: its request and its times."""

    spec: JobSpec
    received: float = field(default_factory=time.monotonic)
    expires_at: float | None = None
    """Wall-clock time after which the job is not run (from MQTT 5 message expiry)."""
    cancel_requested: bool = False
    started: float | None = None
    """``time.monotonic()`` when it started running."""
    step: int = 0
    """Denoising steps done so far."""
    source: str = "journal"
    """Where it came from: mqtt, fleet, web, openai, a1111; journal for a job resumed after a
    restart."""


class Runner:
    """Runs queued jobs one at a time on the worker; the journal records each step."""

    def __init__(  # noqa: PLR0913 - the runner is where these parts meet
        self,
        *,
        worker: WorkerLink,
        outbox: Outbox,
        journal: Journal,
        guard: ThermalGuard,
        metrics: AgentMetrics,
        max_attempts: int,
        on_change: Callable[[], None],
        init_images: InitImages,
        storage: StorageWatch | None = None,
        switcher: ModelSwitcher | None = None,
        loras: LoraShelf | None = None,
    ) -> None:
        """Create the runner; :meth:`run` serves the queue.

        Args:
            worker: The worker link.
            outbox: Where events and results go.
            journal: Where each job's progress is recorded.
            guard: Holds jobs back while the SoC is too hot.
            metrics: Queue and job metrics.
            max_attempts: Runs of a job whose worker died before the job fails.
            on_change: Called when the queue or the running job changes.
            init_images: Image-to-image jobs' pictures: handed to the worker, removed once
                their job is answered.
            storage: Where a failed write of the journal is recorded.
            switcher: Makes the model a job names resident before it runs.
            loras: Where the LoRA files jobs name are.
        """
        self._switcher = switcher
        self._loras = loras
        self._init_images = init_images
        self._worker = worker
        self._outbox = outbox
        self._journal = journal
        self._guard = guard
        self._metrics = metrics
        self._max_attempts = max_attempts
        self._on_change = on_change
        self._storage = storage or StorageWatch({})
        self._queue: deque[Job] = deque()
        self._wakeup = asyncio.Event()
        self._finished = asyncio.Event()
        self._confirmations: set[asyncio.Task[None]] = set()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self.current: Job | None = None
        self.last_latency_s: float | None = None

    def wake(self) -> None:
        """Look again at what to do while idle (the default model changed, say)."""
        self._wakeup.set()

    @property
    def depth(self) -> int:
        """Return how many jobs wait (the running one excluded)."""
        return len(self._queue)

    def position(self, job_id: str) -> int | None:
        """Return a queued job's place in the queue (1 runs next), or None."""
        for index, job in enumerate(self._queue):
            if job.spec.id == job_id:
                return index + 1
        return None

    def finished(self, job_id: str) -> asyncio.Future[None]:
        """Return a future that resolves once the job has its reply in the journal."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, []).append(future)
        return future

    def _wake_waiters(self, job_id: str) -> None:
        for future in self._waiters.pop(job_id, []):
            if not future.done():
                future.set_result(None)

    def submit(self, job: Job, *, first: bool = False) -> None:
        """Queue a job (already journaled) and announce its place.

        Args:
            job: The job.
            first: Put it at the head of the queue (a retry after a worker crash).
        """
        if first:
            self._queue.appendleft(job)
        else:
            self._queue.append(job)
        self._outbox.job_event(job.spec.id, "queued", position=self._queue.index(job) + 1)
        self._changed()
        self._wakeup.set()

    async def resume_all(self, entries: list[JournalEntry]) -> None:
        """Take back the jobs the journal had waiting; other jobs' pictures are removed."""
        self._init_images.sweep({entry.spec.init_image for entry in entries})
        for entry in entries:
            await self.resume(entry)

    async def resume(self, entry: JournalEntry) -> None:
        """Take back a job the journal had queued or running when the agent stopped."""
        job = Job(entry.spec, expires_at=entry.expires_at)
        if entry.status is JobStatus.RUNNING and entry.attempts >= self._max_attempts:
            await self._fail(
                job,
                ErrorCode.WORKER_CRASHED,
                f"the agent stopped during this job {entry.attempts} times; not trying again",
            )
            return
        log.info("resuming job %s (%s before the restart)", entry.spec.id, entry.status.value)
        self.submit(job)

    async def redeliver(self, entry: JournalEntry) -> None:
        """Publish a stored reply again (done, but the broker had not acknowledged it)."""
        if entry.reply is None:
            return
        body = await self._outbox.restored(entry.spec, entry.reply)
        self._confirm(entry.spec, self._outbox.reply(entry.spec, body))

    async def cancel(self, job_id: str) -> bool:
        """Cancel a queued job now, or the running one at its next step.

        Returns:
            Whether a job with this id was queued or running.
        """
        if self.current is not None and self.current.spec.id == job_id:
            self.current.cancel_requested = True
            self._worker.cancel()
            return True
        for job in self._queue:
            if job.spec.id == job_id:
                self._queue.remove(job)
                self._changed()
                await self._fail(job, ErrorCode.CANCELLED, "cancelled before it started")
                return True
        return False

    async def idle(self) -> None:
        """Wait until no job is running."""
        while self.current is not None:
            self._finished.clear()
            await self._finished.wait()

    async def run(self) -> None:
        """Serve the queue forever (cancel the task to stop)."""
        while True:
            job = await self._next_job()
            self.current = job
            job.started = time.monotonic()
            self._changed()
            try:
                await self._run_one(job)
            except Exception as exc:  # noqa: BLE001 - a job must never go unanswered, even on a bug
                await self._answer_after_error(job, exc)
            finally:
                self.current = None
                self._finished.set()
                self._changed()

    async def _next_job(self) -> Job:
        """Wait for a queued job and a cool SoC; return the job at the head, off the queue."""
        while True:
            while not self._queue:
                if self._switcher is not None and self._switcher.ahead() is not None:
                    await self._switcher.load_ahead()
                    continue
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._guard.wait_until_cool()
            # The guard awaits (a temperature read, a cool-down): a cancel can empty the queue
            # meanwhile, and then there is nothing to run yet.
            if self._queue:
                return self._queue.popleft()

    async def _run_one(self, job: Job) -> bool:
        """Run one job; return whether it has its reply (False: it went back in the queue)."""
        spec = job.spec
        try:
            # Before the model: an expired job or a LoRA gone is answered without a switch.
            loras = self._startable(job)
        except RequestError as exc:
            await self._fail(job, exc.code, exc.message)
            return True
        if not await self._model_ready(job):
            return True
        attempt = await self._journal.start(spec.id)
        queue_wait = time.monotonic() - job.received
        self._metrics.queue_wait_seconds.observe(queue_wait)
        self._metrics.stage_seconds.labels(stage="queue_wait").observe(queue_wait)
        self._outbox.job_event(spec.id, "running", step=0, steps=spec.steps_run)

        def progress(step: int, steps: int) -> None:
            job.step = step
            self._outbox.job_event(spec.id, "running", step=step, steps=steps)

        if job.cancel_requested:
            # Checked with no await before the job reaches the worker: a cancel that came
            # earlier is seen here, a later one reaches the worker's cancel event.
            await self._fail(job, ErrorCode.CANCELLED, "cancelled before it started")
            return True
        try:
            init_image = str(self._init_images.path(spec)) if spec.init_image else None
            outcome = await self._worker.run(spec.worker_job(init_image, loras), progress)
        except WorkerDiedError as exc:
            if attempt < self._max_attempts:
                log.warning(
                    "worker died during %s (attempt %d); running it again", spec.id, attempt
                )
                await self._journal.requeue(spec.id, refund=False)
                self.submit(job, first=True)
                return False
            await self._fail(job, ErrorCode.WORKER_CRASHED, f"{exc}, {attempt} times")
            return True
        if isinstance(outcome, Finished):
            await self._succeed(job, outcome, queue_wait)
        elif isinstance(outcome, Cancelled):
            await self._fail(job, ErrorCode.CANCELLED, "cancelled while it ran")
        elif isinstance(outcome, Failed):
            code = ErrorCode(outcome.code) if outcome.code in set(ErrorCode) else None
            await self._fail(job, code or ErrorCode.GENERATION_FAILED, outcome.message)
        return True

    async def _model_ready(self, job: Job) -> bool:
        """Make the job's model the resident one; False: it cannot be loaded (job answered)."""
        try:
            if self._switcher is not None:
                await self._switcher.ensure(job.spec.model)
            loaded = await self._worker.wait_ready()
        except WorkerUnavailableError as exc:
            await self._fail(job, ErrorCode.MODEL_UNAVAILABLE, f"the model is not loaded: {exc}")
            return False
        self._outbox.model = loaded.model
        return True

    def _startable(self, job: Job) -> tuple[tuple[str, str, float], ...]:
        """Return the job's LoRA styles with their files, once it is known the job may start.

        Raises:
            RequestError: It expired, or one of its LoRA files was removed from the folder since
                it was admitted.
        """
        spec = job.spec
        if job.expires_at is not None and time.time() > job.expires_at:
            raise RequestError(ErrorCode.EXPIRED, "the request expired before it could run")
        loras = []
        for name, weight in spec.loras:
            found = self._loras.find(name) if self._loras is not None else None
            if found is None:
                raise RequestError(ErrorCode.UNKNOWN_LORA, f"the LoRA {name} is gone")
            loras.append((name, str(found.path), weight))
        return tuple(loras)

    async def _succeed(self, job: Job, finished: Finished, queue_wait: float) -> None:
        spec = job.spec
        begun = time.monotonic()
        source = await self._init_images.thumbnail(spec)
        body, encoded = await self._outbox.result(spec, finished, job.received, queue_wait, source)
        await self._record(spec.id, self._outbox.stored(body))
        await self._init_images.discard(spec)
        self._wake_waiters(spec.id)
        # The latest-image topics first: a client that gets the result finds them updated.
        self._outbox.latest(spec, body, encoded)
        self._confirm(spec, self._outbox.reply(spec, body))
        self._outbox.job_event(spec.id, "done", latency_s=body["latency_s"])
        self._outbox.observe_publishing(time.monotonic() - begun)
        self._metrics.jobs.labels(status="done").inc()
        self.last_latency_s = body["latency_s"]
        self._log_end(job, "done", f"{body['latency_s']:.2f} s (queue {queue_wait:.2f} s)")

    async def _answer_after_error(self, job: Job, error: Exception) -> None:
        """Answer a job whose path raised: its own refusal, a full disk, or a bug (logged)."""
        if isinstance(error, RequestError):
            await self._fail(job, error.code, error.message)
            return
        if is_full(error) or isinstance(error, (OSError, sqlite3.Error)):
            sentence = self._storage.failed("the journal", self._journal.path.parent, error)
            code = ErrorCode.STORAGE_FULL if is_full(error) else ErrorCode.STORAGE_ERROR
            await self._fail(job, code, sentence)
            return
        log.error("job %s failed in the agent", job.spec.id, exc_info=error)
        await self._fail(job, ErrorCode.INTERNAL_ERROR, f"internal error: {error}")

    async def _record(self, job_id: str, body: dict[str, Any]) -> None:
        """Journal a job's reply; a journal that cannot be written is said, not fatal."""
        try:
            await self._journal.finish(job_id, body)
        except (OSError, sqlite3.Error) as exc:
            self._storage.failed("the journal", self._journal.path.parent, exc)
        else:
            self._storage.succeeded("the journal")

    async def _fail(self, job: Job, code: ErrorCode, message: str) -> None:
        status = "cancelled" if code is ErrorCode.CANCELLED else "failed"
        self._metrics.jobs.labels(status=status).inc()
        self._log_end(job, status, f"{time.monotonic() - job.received:.2f} s: {message}")
        body: dict[str, Any] = error_body(job.spec.id, code, message)
        await self._record(job.spec.id, body)
        await self._init_images.discard(job.spec)
        self._wake_waiters(job.spec.id)
        self._outbox.job_event(job.spec.id, status, error=body["error"])
        self._confirm(job.spec, self._outbox.reply(job.spec, body))

    @staticmethod
    def _log_end(job: Job, outcome: str, detail: str) -> None:
        """Log the one line a job gets: id, outcome, where from, size, steps, time."""
        spec = job.spec
        steps = f"{spec.steps_run} step{'s' if spec.steps_run != 1 else ''}"
        if spec.strength is not None:
            steps += f" from a picture at strength {spec.strength:g}"
        log.info(
            "job %s %s: from %s, %dx%d, %s, %s",
            spec.id,
            outcome,
            job.source,
            spec.width,
            spec.height,
            steps,
            detail,
        )

    def _confirm(self, spec: JobSpec, acknowledged: asyncio.Future[None] | None) -> None:
        """Mark the job delivered in the journal once the broker acknowledges its reply."""
        if acknowledged is None:
            return

        async def confirm() -> None:
            await acknowledged
            try:
                await self._journal.delivered(spec.id)
            except (OSError, sqlite3.Error) as exc:
                self._storage.failed("the journal", self._journal.path.parent, exc)

        task = asyncio.create_task(confirm(), name=f"confirm-{spec.id}")
        self._confirmations.add(task)
        task.add_done_callback(self._confirmations.discard)

    def _changed(self) -> None:
        self._on_change()
