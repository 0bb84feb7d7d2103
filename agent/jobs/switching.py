"""Switching the resident model between jobs: unload, load, measure, say so."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import TYPE_CHECKING

from agent.machine.memory import GIB
from agent.model.link import WorkerUnavailableError

if TYPE_CHECKING:
    from agent.metrics import AgentMetrics
    from agent.model.catalog import Catalog
    from agent.model.link import WorkerLink
    from agent.model.protocol import WorkerConfig

log = logging.getLogger(__name__)


class ModelSwitcher:
    """Makes the model a job names the resident one before the job runs."""

    def __init__(
        self, worker: WorkerLink, catalog: Catalog, config: WorkerConfig, metrics: AgentMetrics
    ) -> None:
        """Switch ``worker`` among ``catalog``'s models, each loaded as ``config`` says."""
        self._worker = worker
        self._catalog = catalog
        self._config = config
        self._metrics = metrics
        self._ahead: str | None = None
        """A default just chosen, to load before its first job comes."""
        catalog.on_choose.append(self._chosen)

    def _chosen(self) -> None:
        self._ahead = self._catalog.default

    def ahead(self) -> str | None:
        """Return the model to load ahead of its jobs: a default chosen since, not resident.

        A model a job asked for stays resident after it: switching back to the default in every
        pause would cost a load (a minute on a Pi) each time the other model is asked for again.
        """
        if self._ahead == self._worker.model_name:
            self._ahead = None
        return self._ahead

    async def load_ahead(self) -> None:
        """Load the default just chosen while nothing waits, so its next job starts at once."""
        name, self._ahead = self.ahead(), None
        if name is not None:
            with contextlib.suppress(WorkerUnavailableError):  # said in the log; jobs say it
                await self.ensure(name)

    def config_for(self, name: str) -> WorkerConfig:
        """Return the worker's configuration for the model of that name."""
        return dataclasses.replace(self._config, pipeline=self._catalog.pipeline_options(name))

    async def ensure(self, name: str) -> None:
        """Make ``name`` (empty: the default model) the resident model; return once it is ready.

        Raises:
            WorkerUnavailableError: It could not be loaded (the model that was resident is
                loading again), or it is no longer installed.
        """
        name = name or self._catalog.default
        previous = self._worker.model_name
        if previous == name:
            return
        if self._catalog.get(name) is None:
            # A job journaled before a restart whose settings no longer install its model.
            raise WorkerUnavailableError(f"the model {name} is no longer installed")
        log.info("switching model: %s -> %s", previous, name)
        begun = time.monotonic()
        await self._worker.switch(self.config_for(name))
        try:
            await self._worker.wait_ready()
        except WorkerUnavailableError as exc:
            self._metrics.model_switches.labels(model=name, outcome="failed").inc()
            log.error(  # noqa: TRY400 - the reason says it all; the worker logged any trace
                "cannot switch to model %s: %s; loading %s again", name, exc, previous
            )
            await self._worker.switch(self.config_for(previous))
            raise
        seconds = time.monotonic() - begun
        self._metrics.model_switches.labels(model=name, outcome="ok").inc()
        self._metrics.model_switch_seconds.observe(seconds)
        peak = self._worker.peak_bytes
        log.info(
            "model switched: %s -> %s in %.1f s; worker memory %s at peak",
            previous,
            name,
            seconds,
            f"{peak / GIB:.2f} GiB" if peak else "unknown",
        )
        model = self._catalog.get(name)
        if model is not None and model.family is None:
            # Its config files came with the download: its defaults are known from now on.
            await asyncio.to_thread(self._catalog.read_families, [name])
