"""The daemon's side of the generation worker: starts it, talks to it, restarts it when it dies.

A reader thread blocks on the pipe and hands every message to the event loop with
``call_soon_threadsafe``, so the loop never waits on the worker. A worker that dies during a job
(an out-of-memory kill, a crash inside torch) fails that job's attempt and is started again. A
model that cannot be loaded, because the load raised or because the worker died while loading
(the usual out-of-memory kill on a small board), puts the link in ``error`` with a reason a person
understands, and the load is tried again after a delay that doubles up to a cap: never a silent
crash loop, and requests meanwhile get ``model_unavailable`` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
import threading
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from agent.machine.memory import GIB, MemoryLimit, peak_rss_bytes
from agent.model.protocol import (
    Cancelled,
    Failed,
    Finished,
    GenerateJob,
    LoadFailed,
    Progress,
    Ready,
    Stop,
    WorkerConfig,
    WorkerEvent,
)
from agent.model.worker import worker_main

if TYPE_CHECKING:
    from collections.abc import Callable
    from multiprocessing.connection import Connection
    from multiprocessing.context import SpawnProcess

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0
PEAK_SAMPLE_S = 0.5
"""How often the worker's peak memory is read while it runs (a /proc read, microseconds)."""


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


@dataclass(frozen=True)
class Backoff:
    """Delays between load attempts: ``first``, doubling each failure, at most ``cap``."""

    first: float
    cap: float

    def delay(self, failures: int) -> float:
        """Return the wait after the ``failures``-th failure in a row (1 for the first)."""
        return float(min(self.first * 2 ** max(failures - 1, 0), self.cap))


def death_reason(
    exit_code: int | None, peak: int | None, limit: MemoryLimit, oom_kill: bool
) -> str:
    """Say why a worker died while loading the model, in words a person understands.

    Args:
        exit_code: The process's exit code (negative: the signal that ended it).
        peak: Its peak resident memory in bytes, as last read, if known.
        limit: The memory limit that applies.
        oom_kill: The cgroup's OOM kill counter went up meanwhile.
    """
    memory = f"peak {peak / GIB:.1f} GiB, " if peak else ""
    memory += f"memory limit {limit.describe()}"
    if exit_code == -signal.SIGKILL:
        how = "out of memory (the kernel's OOM killer)" if oom_kill else "probably out of memory"
        return f"the worker was killed while loading the model, {how}: {memory}"
    if exit_code is not None and exit_code < 0:
        name = signal.Signals(-exit_code).name
        return f"the worker died while loading the model ({name}): {memory}"
    return f"the worker exited while loading the model (exit code {exit_code}): {memory}"


JobOutcome = Finished | Failed | Cancelled


class WorkerLink:
    """Owns the worker process and its pipe; one job at a time."""

    def __init__(  # noqa: PLR0913 - the link's whole configuration
        self,
        config: WorkerConfig,
        *,
        backoff: Backoff,
        limit: MemoryLimit,
        on_change: Callable[[], None],
        on_restart: Callable[[], None],
        on_load_failure: Callable[[], None],
    ) -> None:
        """Create the link; :meth:`start` starts the process.

        Args:
            config: What the worker loads.
            backoff: Waits before starting a worker again: after a death during a job, the
                first; after failed loads in a row, doubling up to the cap.
            limit: The memory limit that applies, named when a worker is killed while loading.
            on_change: Called on the event loop whenever :attr:`status` changes.
            on_restart: Called when a worker died and is being replaced.
            on_load_failure: Called when a load failed (raised, or the worker died loading).
        """
        self._config = config
        self._backoff = backoff
        self._limit = limit
        self._on_change = on_change
        self._on_restart = on_restart
        self._on_load_failure = on_load_failure
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
        self._sampler: asyncio.TimerHandle | None = None
        self._oom_kills_at_start: int | None = None
        self._load_reported = False
        self.status = WorkerStatus.STOPPED
        self.loaded: Ready | None = None
        self.last_error: str | None = None
        self.peak_bytes: int | None = None
        """The current (or last) worker's peak resident memory, as last read."""

    @property
    def model_name(self) -> str:
        """Return the short name of the model this link loads (or has loaded)."""
        return self._config.pipeline.name

    @property
    def model_source(self) -> str:
        """Return the hub id or folder of the model this link loads (or has loaded)."""
        return self._config.pipeline.model

    async def switch(self, config: WorkerConfig) -> None:
        """Stop the worker, then start one that loads ``config``'s model.

        The old worker is killed, and its memory freed with it, before the new one starts: a
        small board never holds two models. Between jobs it holds nothing to save (its weight
        forms were written at its load), and a kill spares the interpreter's teardown of torch
        (a second here, more on a Pi). :meth:`wait_ready` says how the load went.
        """
        await self.stop(at_once=True)
        self._config = config
        self._load_failures = 0
        self.last_error = None
        self.start()

    @property
    def pid(self) -> int | None:
        """Return the worker's process id, while one runs."""
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start a worker process; it loads the model and reports :class:`Ready`.

        While earlier loads have failed, the status stays ``error`` during this attempt: jobs are
        answered at once rather than held for a load that may fail again.
        """
        self._restart = None
        self._generation += 1
        self.peak_bytes = None
        self.loaded = None
        self._load_reported = False
        self._oom_kills_at_start = self._limit.oom_kills()
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
        if self.status is not WorkerStatus.ERROR:
            self._set_status(WorkerStatus.LOADING)
        self._sample_peak(process.pid, self._generation)
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
            WorkerUnavailableError: The last load failed (a retry may be under way).
        """
        while True:
            if self.status is WorkerStatus.READY and self.loaded is not None:
                return self.loaded
            if self.status in (WorkerStatus.ERROR, WorkerStatus.STOPPED):
                raise WorkerUnavailableError(self.last_error or "the worker is not running")
            self._ready.clear()
            await self._ready.wait()

    async def run(self, job: GenerateJob, on_progress: Callable[[int, int], None]) -> JobOutcome:
        """Run one job on the worker and return how it ended.

        Args:
            job: The job (:meth:`agent.messages.JobSpec.worker_job`).
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
        if self._sampler is not None:
            self._sampler.cancel()
        process, connection = self._process, self._connection
        if process is None or connection is None:
            return
        if at_once:
            process.kill()
        with contextlib.suppress(OSError, ValueError):
            connection.send(Stop())
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
            self._load_reported = True
            self.loaded, self.last_error, self._load_failures = event, None, 0
            self._log_ready(event)
            self._set_status(WorkerStatus.READY)
        elif isinstance(event, LoadFailed):
            self._load_reported = True
            self._load_failed(event.message)
        elif isinstance(event, Progress):
            if self._on_progress is not None:
                self._on_progress(event.step, event.steps)
        elif self._job is not None and not self._job.done():
            self._job.set_result(event)

    def _on_exit(self, generation: int, code: int | None) -> None:
        if generation != self._generation or self.status is WorkerStatus.STOPPED:
            return
        self._process = None
        if self._job is not None and not self._job.done():
            self._job.set_exception(
                WorkerDiedError(f"the worker process died during the job (exit code {code})")
            )
        if not self._load_reported:
            # Died before it could say Ready or LoadFailed: the load itself was killed.
            oom_before, oom_now = self._oom_kills_at_start, self._limit.oom_kills()
            oom_kill = oom_before is not None and oom_now is not None and oom_now > oom_before
            self._on_restart()
            self._load_failed(death_reason(code, self.peak_bytes, self._limit, oom_kill=oom_kill))
        if self.status is WorkerStatus.ERROR:
            delay = self._backoff.delay(self._load_failures)
            log.error("model load failed: %s; retrying in %.1f s", self.last_error, delay)
        else:
            delay = self._backoff.first
            log.error("worker process died (exit code %s); restarting in %.1f s", code, delay)
            self.last_error = f"the worker process died (exit code {code})"
            self._on_restart()
            self._set_status(WorkerStatus.LOADING)
        self._restart = self._loop.call_later(delay, self.start)

    def _load_failed(self, reason: str) -> None:
        """Record a failed load: state ``error`` with its reason, counted once."""
        self._load_failures += 1
        self.last_error = reason
        self._on_load_failure()
        self._set_status(WorkerStatus.ERROR)

    def _log_ready(self, ready: Ready) -> None:
        """The model's one line: what, where, in which precision, and the memory it takes."""
        pid = self._process.pid if self._process is not None else None
        if pid is not None:  # read now: the sampler's last reading may be older
            self.peak_bytes = peak_rss_bytes(pid) or self.peak_bytes
        peak = self.peak_bytes
        memory = f"{peak / GIB:.2f} GiB at peak" if peak is not None else "unknown"
        log.info(
            "model ready: %s on %s in %s (%s), loaded in %.1f s, warm-up %.1f s; worker memory %s",
            ready.model,
            ready.device,
            ready.dtype,
            ready.levers,
            ready.load_seconds,
            ready.warmup_seconds,
            memory,
        )

    def _sample_peak(self, pid: int | None, generation: int) -> None:
        """Keep :attr:`peak_bytes` current while this worker lives (named if it is killed)."""
        if pid is None or generation != self._generation:
            return
        peak = peak_rss_bytes(pid)
        if peak is None:
            return  # gone: the last reading stands
        self.peak_bytes = peak
        self._sampler = self._loop.call_later(PEAK_SAMPLE_S, self._sample_peak, pid, generation)

    def _set_status(self, status: WorkerStatus) -> None:
        if status is not self.status:
            self.status = status
            self._ready.set()
            self._on_change()
