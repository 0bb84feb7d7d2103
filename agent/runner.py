"""The job runner: a bounded queue and one job at a time on the worker."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.messages import ErrorCode, RequestError
from agent.worker import Cancelled, Failed, Finished
from agent.worker_link import WorkerDiedError, WorkerUnavailableError

if TYPE_CHECKING:
    from collections.abc import Callable

    from agent.messages import JobSpec
    from agent.metrics import AgentMetrics
    from agent.outbox import Outbox
    from agent.worker_link import WorkerLink

log = logging.getLogger(__name__)


@dataclass
class Job:
    """A job in the agent: its request and its times."""

    spec: JobSpec
    received: float = field(default_factory=time.monotonic)
    cancel_requested: bool = False


class Runner:
    """Queues jobs (up to ``max_queue``) and runs them one at a time on the worker."""

    def __init__(
        self,
        worker: WorkerLink,
        outbox: Outbox,
        metrics: AgentMetrics,
        max_queue: int,
        on_change: Callable[[], None],
    ) -> None:
        """Create the runner; :meth:`run` serves the queue.

        Args:
            worker: The worker link.
            outbox: Where events and results go.
            metrics: Queue and job metrics.
            max_queue: Most jobs waiting; one more is refused as busy.
            on_change: Called when the queue or the running job changes.
        """
        self._worker = worker
        self._outbox = outbox
        self._metrics = metrics
        self._max_queue = max_queue
        self._on_change = on_change
        self._queue: deque[Job] = deque()
        self._wakeup = asyncio.Event()
        self._finished = asyncio.Event()
        self._accepting = True
        self.current: Job | None = None
        self.last_latency_s: float | None = None

    @property
    def depth(self) -> int:
        """Return how many jobs wait (the running one excluded)."""
        return len(self._queue)

    def knows(self, job_id: str) -> bool:
        """Return whether a job with this id is queued or running."""
        running = self.current is not None and self.current.spec.id == job_id
        return running or any(job.spec.id == job_id for job in self._queue)

    def submit(self, spec: JobSpec) -> int:
        """Queue a job and announce it; return its place in the queue (1 runs next).

        Raises:
            RequestError: The agent is shutting down, the id is in use, or the queue is full.
        """
        if not self._accepting:
            raise RequestError(ErrorCode.SHUTTING_DOWN, "the agent is shutting down")
        if self.knows(spec.id):
            raise RequestError(ErrorCode.DUPLICATE_ID, f"a job with id {spec.id} is in progress")
        if len(self._queue) >= self._max_queue:
            raise RequestError(
                ErrorCode.BUSY, f"the queue is full ({self._max_queue} jobs); try again later"
            )
        self._queue.append(Job(spec))
        position = len(self._queue)
        self._outbox.job_event(spec.id, "queued", position=position)
        self._changed()
        self._wakeup.set()
        return position

    def cancel(self, job_id: str) -> bool:
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
                self._finish_error(job, ErrorCode.CANCELLED, "cancelled before it started")
                self._changed()
                return True
        return False

    async def idle(self) -> None:
        """Wait until no job is running."""
        while self.current is not None:
            self._finished.clear()
            await self._finished.wait()

    def stop_accepting(self) -> None:
        """Refuse new jobs from now on (shutdown)."""
        self._accepting = False

    async def run(self) -> None:
        """Serve the queue forever (cancel the task to stop)."""
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            job = self._queue.popleft()
            self.current = job
            self._changed()
            try:
                await self._run_one(job)
            finally:
                self.current = None
                self._finished.set()
                self._changed()

    async def _run_one(self, job: Job) -> None:
        spec = job.spec
        try:
            loaded = await self._worker.wait_ready()
        except WorkerUnavailableError as exc:
            self._finish_error(job, ErrorCode.MODEL_UNAVAILABLE, f"the model is not loaded: {exc}")
            return
        self._outbox.model = loaded.model
        if job.cancel_requested:
            self._finish_error(job, ErrorCode.CANCELLED, "cancelled before it started")
            return
        queue_wait = time.monotonic() - job.received
        self._metrics.queue_wait_seconds.observe(queue_wait)
        self._metrics.stage_seconds.labels(stage="queue_wait").observe(queue_wait)
        self._outbox.job_event(spec.id, "running", step=0, steps=spec.steps)

        def progress(step: int, steps: int) -> None:
            self._outbox.job_event(spec.id, "running", step=step, steps=steps)

        try:
            outcome = await self._worker.run(spec.worker_fields(), progress)
        except WorkerDiedError as exc:
            self._finish_error(job, ErrorCode.WORKER_CRASHED, str(exc))
            return
        if isinstance(outcome, Finished):
            self.last_latency_s = await self._outbox.deliver(
                spec, outcome, job.received, queue_wait
            )
            self._metrics.jobs.labels(status="done").inc()
        elif isinstance(outcome, Cancelled):
            self._finish_error(job, ErrorCode.CANCELLED, "cancelled while it ran")
        elif isinstance(outcome, Failed):
            self._finish_error(job, ErrorCode.GENERATION_FAILED, outcome.message)

    def _finish_error(self, job: Job, code: ErrorCode, message: str) -> None:
        status = "cancelled" if code is ErrorCode.CANCELLED else "failed"
        self._metrics.jobs.labels(status=status).inc()
        log.info("job %s %s: %s", job.spec.id, status, message)
        self._outbox.job_error(job.spec, code, message)

    def _changed(self) -> None:
        self._metrics.queue_depth.set(len(self._queue))
        self._on_change()
