"""The daemon's side of the generation worker: starts it, talks to it, restarts it when it dies.

A reader thread blocks on the pipe and hands every message to the event loop with
``call_soon_threadsafe``, so the loop never waits on the worker. A worker that dies (an
out-of-memory kill, a crash inside torch) fails the job it was running and is started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import threading
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from agent.worker import (
    Cancelled,
    Failed,
    Finished,
    LoadFailed,
    Progress,
    Ready,
    WorkerConfig,
    WorkerEvent,
    worker_main,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from multiprocessing.connection import Connection
    from multiprocessing.context import SpawnProcess

log = logging.getLogger(__name__)

MAX_LOAD_RETRY_DELAY_S = 300.0
"""A model that fails to load is retried with a doubling delay, capped here (5 minutes)."""
STOP_TIMEOUT_S = 10.0


class WorkerStatus(StrEnum):
    """Where the worker process stands."""

    LOADING = "loading"
    READY = "ready"
    ERROR = "error"
    STOPPED = "stopped"


class WorkerUnavailableError(Exception):
    """The model could not be loaded; the message says why."""


class WorkerDiedError(Exception):
    """The worker process died while it ran a job."""


JobOutcome = Finished | Failed | Cancelled


class WorkerLink:
    """Owns the worker process and its pipe; one job at a time."""

    def __init__(
        self,
        config: WorkerConfig,
        restart_delay_s: float,
        on_change: Callable[[], None],
        on_restart: Callable[[], None],
    ) -> None:
        """Create the link; :meth:`start` starts the process.

        Args:
            config: What the worker loads.
            restart_delay_s: Wait before starting a worker again after it died.
            on_change: Called on the event loop whenever :attr:`status` changes.
            on_restart: Called when a worker died and is being replaced.
        """
        self._config = config
        self._restart_delay_s = restart_delay_s
        self._on_change = on_change
        self._on_restart = on_restart
        self._loop = asyncio.get_running_loop()
        self._context = multiprocessing.get_context("spawn")
        self._cancel = self._context.Event()
        self._process: SpawnProcess | None = None
        self._connection: Connection | None = None
        self._generation = 0
        self._ready = asyncio.Event()
        self._job: asyncio.Future[JobOutcome] | None = None
        self._on_progress: Callable[[int, int], None] | None = None
        self._load_failures = 0
        self._restart: asyncio.TimerHandle | None = None
        self.status = WorkerStatus.STOPPED
        self.loaded: Ready | None = None
        self.last_error: str | None = None

    @property
    def pid(self) -> int | None:
        """Return the worker's process id, while one runs."""
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start a worker process; it loads the model and reports :class:`Ready`."""
        self._restart = None
        self._generation += 1
        parent, child = self._context.Pipe(duplex=True)
        self._cancel.clear()
        process = self._context.Process(
            target=worker_main,
            args=(child, self._cancel, self._config),
            name="edgeai-worker",
            daemon=True,
        )
        process.start()
        child.close()  # so that the worker's death reads as end-of-file here
        self._process, self._connection = process, parent
        self._set_status(WorkerStatus.LOADING)
        threading.Thread(
            target=self._read,
            args=(parent, process, self._generation),
            name="worker-reader",
            daemon=True,
        ).start()
        log.info("worker process %s started", process.pid)

    async def wait_ready(self) -> Ready:
        """Wait until the model is loaded.

        Raises:
            WorkerUnavailableError: The last load failed and no new one is under way.
        """
        while True:
            if self.status is WorkerStatus.READY and self.loaded is not None:
                return self.loaded
            if self.status in (WorkerStatus.ERROR, WorkerStatus.STOPPED):
                raise WorkerUnavailableError(self.last_error or "the worker is not running")
            self._ready.clear()
            await self._ready.wait()

    async def run(self, job: dict[str, Any], on_progress: Callable[[int, int], None]) -> JobOutcome:
        """Run one job on the worker and return how it ended.

        Args:
            job: The job's fields (:meth:`agent.messages.JobSpec.worker_fields`).
            on_progress: Called on the loop with (step, steps) after each denoising step.

        Raises:
            WorkerDiedError: The worker process died during the job.
        """
        if self._connection is None or self.status is not WorkerStatus.READY:
            raise WorkerDiedError("the worker is not ready")
        self._cancel.clear()
        self._job = self._loop.create_future()
        self._on_progress = on_progress
        try:
            self._connection.send(job)
            return await self._job
        except (OSError, ValueError) as exc:
            raise WorkerDiedError(f"cannot reach the worker: {exc}") from exc
        finally:
            self._job = None
            self._on_progress = None

    def cancel(self) -> None:
        """Ask the worker to stop the running job after its current step."""
        self._cancel.set()

    def kill(self) -> None:
        """Kill the worker process at once (it is restarted as after a crash)."""
        if self._process is not None and self._process.is_alive():
            self._process.kill()

    async def stop(self, *, at_once: bool = False) -> None:
        """Stop the worker: ask it to exit, then kill it if it does not.

        Args:
            at_once: Kill it without asking (it is in the middle of a job nobody waits for).
        """
        self._set_status(WorkerStatus.STOPPED)
        if self._restart is not None:
            self._restart.cancel()
        process, connection = self._process, self._connection
        if process is None or connection is None:
            return
        if at_once:
            process.kill()
        with contextlib.suppress(OSError, ValueError):
            connection.send(None)
        await asyncio.to_thread(process.join, STOP_TIMEOUT_S)
        if process.is_alive():
            process.kill()
            await asyncio.to_thread(process.join, STOP_TIMEOUT_S)
        connection.close()

    def _read(self, connection: Connection, process: SpawnProcess, generation: int) -> None:
        """Reader thread: forward each message to the loop; report end-of-file as an exit."""
        while True:
            try:
                event: WorkerEvent = connection.recv()
            except (EOFError, OSError):
                process.join(STOP_TIMEOUT_S)  # reaps it, so the exit code is known
                self._loop.call_soon_threadsafe(self._on_exit, generation, process.exitcode)
                return
            self._loop.call_soon_threadsafe(self._on_event, generation, event)

    def _on_event(self, generation: int, event: WorkerEvent) -> None:
        if generation != self._generation or self.status is WorkerStatus.STOPPED:
            return  # a message from a worker that was replaced, or is being stopped
        if isinstance(event, Ready):
            self.loaded, self.last_error, self._load_failures = event, None, 0
            self._set_status(WorkerStatus.READY)
        elif isinstance(event, LoadFailed):
            self.last_error = event.message
            self._set_status(WorkerStatus.ERROR)
        elif isinstance(event, Progress):
            if self._on_progress is not None:
                self._on_progress(event.step, event.steps)
        elif self._job is not None and not self._job.done():
            self._job.set_result(event)

    def _on_exit(self, generation: int, code: int | None) -> None:
        if generation != self._generation or self.status is WorkerStatus.STOPPED:
            return
        if self._job is not None and not self._job.done():
            self._job.set_exception(
                WorkerDiedError(f"the worker process died during the job (exit code {code})")
            )
        if self.status is WorkerStatus.ERROR:
            self._load_failures += 1
            delay = min(
                max(self._restart_delay_s, 1.0) * 2 ** (self._load_failures - 1),
                MAX_LOAD_RETRY_DELAY_S,
            )
            log.error("model load failed (%s); retrying in %.0f s", self.last_error, delay)
        else:
            delay = self._restart_delay_s
            log.error("worker process died (exit code %s); restarting in %.1f s", code, delay)
            self.last_error = f"the worker process died (exit code {code})"
            self._on_restart()
            self._set_status(WorkerStatus.LOADING)
        self._restart = self._loop.call_later(delay, self.start)

    def _set_status(self, status: WorkerStatus) -> None:
        if status is not self.status:
            self.status = status
            self._ready.set()
            self._on_change()
