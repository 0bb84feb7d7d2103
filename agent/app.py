"""The composition root: builds every part in one place, starts them in order, stops them in order.

Like uvicorn's ``Server``: signal handlers only set a flag; startup and shutdown are each one
ordered list of phases, and shutdown gives the running job a grace period before cancelling.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from agent.home_assistant_app import announce_agent
from agent.images import ImageStore
from agent.jobs.admission import REQUEST_OUTCOMES, Admission
from agent.jobs.init_images import InitImages
from agent.jobs.journal import Journal
from agent.jobs.journal_backup import keep_backup_copy, start_from_backup
from agent.jobs.model_choice import model_choice
from agent.jobs.outbox import Outbox
from agent.jobs.runner import Runner
from agent.jobs.service import JobService
from agent.jobs.switching import ModelSwitcher
from agent.machine.disk import StorageWatch
from agent.machine.memory import memory_limit
from agent.machine.state_folder import prepare_state_folders
from agent.machine.thermal import ThermalGuard
from agent.metrics import AgentMetrics
from agent.model.link import Backoff, WorkerLink
from agent.model.protocol import WorkerConfig
from agent.mqtt import discovery
from agent.mqtt.fleet import Fleet
from agent.mqtt.link import MqttLink
from agent.mqtt.routes import Background, MqttRoutes, Requests
from agent.mqtt.topics import Topics
from agent.settings import SettingsError
from agent.status import AgentStatus
from agent.web.apis import register_apis
from agent.web.auth import TokenGate, UrlSigner, agent_token
from agent.web.connections import connection_limits
from agent.web.origin import host_allowlist
from agent.web.server import AgentHttpServer, HttpConfig

if TYPE_CHECKING:
    from agent.settings import Settings
    from agent.supervisor import Supervisor

log = logging.getLogger(__name__)

EXIT_PART_FAILED = 1
"""Exit status when a part of the agent ended on its own (systemd restarts on non-zero)."""
EXIT_SETTINGS = 2
"""Exit status when a setting stops the start (as the command line's own errors)."""


@dataclass
class Parts:
    """Every part of a running agent."""

    journal: Journal
    http: AgentHttpServer
    link: MqttLink
    fleet: Fleet | None
    outbox: Outbox
    worker: WorkerLink
    guard: ThermalGuard
    runner: Runner
    admission: Admission
    routes: MqttRoutes
    status: AgentStatus
    service: JobService


class Agent:
    """The daemon: one asyncio loop owning MQTT, the journal, the queue and the worker."""

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        """Create the agent; :meth:`run` builds and starts it.

        Args:
            settings: The settings.
            registry: Metrics registry; a fresh one when None.
            supervisor: Home Assistant's Supervisor, when running as its app: told the agent's
                address and token at start (discovery).
        """
        self.settings = settings
        self.supervisor = supervisor
        self.metrics = AgentMetrics(
            registry or CollectorRegistry(), settings.thermal_glob, settings.vcgencmd
        )
        self.metrics.prime(list(REQUEST_OUTCOMES))
        self._stop = asyncio.Event()
        self._part_failed = False
        """A part that serves until shutdown ended on its own (a bug): exit non-zero."""
        self._changed = asyncio.Event()
        self._on_change = [self._changed.set]
        self._background = Background()

    def _changed_somewhere(self) -> None:
        """A part changed what the state shows (and what the fleet decides on)."""
        for listener in self._on_change:
            listener()

    def build(self) -> Parts:
        """Build every part and wire them together (on the running loop; nothing starts)."""
        settings, metrics, changed = self.settings, self.metrics, self._changed_somewhere
        self.token = agent_token(settings)  # first: a bad token stops the start before anything
        topics = Topics(settings.base_topic)
        start_from_backup(settings.journal_path)
        journal = Journal(settings.journal_path)
        store = ImageStore(
            settings.images_path,
            settings.image_keep_count,
            settings.image_keep_bytes,
            settings.image_keep_free_bytes,
        )
        storage = StorageWatch({"state": settings.state_dir, "images": store.folder})
        for folder in storage.folders:
            metrics.free_bytes.labels(folder=folder).set_function(
                functools.partial(storage.free, folder)
            )
        http = AgentHttpServer(
            HttpConfig(
                host=settings.http_host,
                port=settings.http_port,
                max_body_bytes=settings.max_payload_bytes,
                max_picture_body_bytes=settings.max_image_payload_bytes,
                idle_timeout_s=settings.http_idle_timeout_s,
                limits=connection_limits(settings),
                frame_ancestors=tuple(settings.http_frame_ancestors),
                hosts=host_allowlist(settings),
            ),
            store.folder,
            metrics.registry,
            on_refusal=lambda reason: metrics.http_refusals.labels(reason=reason).inc(),
        )
        link = MqttLink(settings, topics, on_connection=self._on_connection)
        signer = UrlSigner(None if settings.public_images else self.token)
        outbox = Outbox(
            link,
            topics,
            store,
            metrics,
            settings.base_url(http.port),
            sign=signer.signature,
            storage=storage,
        )
        self.gate = TokenGate(
            self.token,
            public_images=settings.public_images,
            signer=signer,
            ingress_peer=settings.ingress_peer,
        )
        limit = memory_limit()
        log.info("memory limit: %s", limit.describe())
        metrics.memory_limit_bytes.set(limit.bytes)
        choice = model_choice(settings)
        catalog = choice.catalog
        config = WorkerConfig(
            catalog.pipeline_options(catalog.default), settings.jpeg_quality, settings.log_level
        )
        worker = WorkerLink(
            config,
            backoff=Backoff(settings.worker_restart_delay_s, settings.worker_restart_max_delay_s),
            limit=limit,
            on_change=changed,
            on_restart=metrics.worker_restarts.inc,
            on_load_failure=metrics.model_load_failures.inc,
        )
        metrics.worker_peak_bytes.set_function(lambda: float(worker.peak_bytes or 0))
        guard = ThermalGuard(
            settings.thermal_glob,
            settings.pause_c,
            settings.resume_c,
            settings.thermal_poll_s,
            changed,
        )
        init_images = InitImages(settings.init_images_path, settings, storage)
        runner = Runner(
            worker=worker,
            outbox=outbox,
            journal=journal,
            guard=guard,
            metrics=metrics,
            max_attempts=settings.max_attempts,
            on_change=changed,
            init_images=init_images,
            storage=storage,
            switcher=ModelSwitcher(worker, catalog, config, metrics),
            loras=choice.loras,
        )
        admission = Admission(
            journal=journal,
            runner=runner,
            metrics=metrics,
            max_queue=settings.max_queue,
            on_change=changed,
            init_images=init_images,
            storage=storage,
        )
        metrics.queue_depth.set_function(lambda: float(admission.queue_depth))
        requests = Requests(settings=settings, admission=admission, outbox=outbox, choice=choice)
        routes = MqttRoutes(
            settings=settings,
            topics=topics,
            link=link,
            requests=requests,
            announce=self._announce,
            background=self._background,
        )
        fleet = None
        if settings.fleet_group is not None:
            fleet = Fleet(
                settings=settings,
                requests=requests,
                results=link,
                busy=lambda: runner.current is not None or admission.queue_depth > 0,
                metrics=metrics,
                background=self._background,
            )
            fleet.open_link(topics)
            routes.watch(fleet.peer_topics, fleet.on_peer)
            self._on_change.append(fleet.reconsider)
        link.subscribe(routes.table, routes.on_message, with_retained=routes.watched)
        status = AgentStatus(
            settings=settings,
            topics=topics,
            link=link,
            worker=worker,
            runner=runner,
            admission=admission,
            guard=guard,
            metrics=metrics,
            changed=self._changed,
            storage=storage,
            choice=choice,
        )
        catalog.on_choose += [runner.wake, changed]
        service = JobService(
            settings=settings,
            admission=admission,
            journal=journal,
            runner=runner,
            outbox=outbox,
            choice=choice,
        )
        self.parts = Parts(
            journal=journal,
            http=http,
            link=link,
            fleet=fleet,
            outbox=outbox,
            worker=worker,
            guard=guard,
            runner=runner,
            admission=admission,
            routes=routes,
            status=status,
            service=service,
        )
        return self.parts

    async def run(self) -> int:
        """Build, start, run until SIGTERM or SIGINT, then stop in order; return the exit code."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        try:
            prepare_state_folders(self.settings)
            parts = self.build()
        except SettingsError as exc:
            log.error("cannot start: %s", exc)  # noqa: TRY400 - the message says it all
            return EXIT_SETTINGS
        tasks = await self.startup(parts)
        await self._stop.wait()
        log.info("stopping")
        parts.link.closing()
        if parts.fleet is not None and parts.fleet.link is not None:
            parts.fleet.link.closing()
        await self.shutdown(parts, tasks)
        return EXIT_PART_FAILED if self._part_failed else 0

    async def startup(self, parts: Parts) -> list[asyncio.Task[None]]:
        """Start every part, in order: HTTP, MQTT, the worker, the journal's unfinished jobs."""
        settings = self.settings
        register_apis(parts.http.routes, parts.service, parts.outbox.events)
        await parts.http.start(parts.status.health, self.gate)
        log.info("HTTP server on %s:%d", settings.http_host, parts.http.port)
        if self.supervisor is not None:
            self._background.spawn(
                announce_agent(self.supervisor, settings, self.token, parts.http.port),
                name="supervisor-discovery",
            )
        parts.admission.last_spec = await parts.journal.latest()
        parts.link.start()
        if parts.fleet is not None and parts.fleet.link is not None:
            parts.fleet.link.start()
        parts.worker.start()
        self._background.spawn(
            asyncio.to_thread(parts.service.choice.catalog.read_families), name="model-families"
        )
        await parts.runner.resume_all(await parts.journal.unfinished())
        tasks = [
            asyncio.create_task(parts.admission.run(), name="admission"),
            asyncio.create_task(parts.runner.run(), name="runner"),
            asyncio.create_task(parts.status.keep(), name="state"),
            asyncio.create_task(
                parts.journal.keep_pruned(
                    self.settings.journal_keep_s, self.settings.journal_keep_rows
                ),
                name="journal-prune",
            ),
        ]
        for task in tasks:
            task.add_done_callback(self._part_ended)
        return [asyncio.create_task(self._redeliver(parts), name="redeliver"), *tasks]

    def _part_ended(self, task: asyncio.Task[None]) -> None:
        """Stop the agent when a part that serves until shutdown ends: it would never recover.

        A runner that died on a bug would leave an agent that answers /healthz and takes
        requests but runs none. Stopping with a non-zero exit lets systemd restart it
        (``Restart=on-failure``); queued jobs are in the journal and run after the restart.
        """
        if task.cancelled() or self._stop.is_set():
            return
        log.critical(
            "the agent's %s task ended; stopping so that the service restarts",
            task.get_name(),
            exc_info=task.exception(),
        )
        self._part_failed = True
        self._stop.set()

    async def shutdown(self, parts: Parts, tasks: list[asyncio.Task[None]]) -> None:
        """Take no new job, let the running one finish within the grace period, then stop.

        Jobs still queued stay in the journal and run after the next start. A job still running
        when the grace period ends goes back to the journal's queue, its attempt not counted.
        """
        parts.admission.close()
        if parts.runner.current is not None:
            log.info("waiting up to %.0f s for the running job", self.settings.shutdown_grace_s)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.shutdown_grace_s):
                    await parts.runner.idle()
        interrupted = parts.runner.current
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if interrupted is not None:
            log.warning(
                "job %s did not finish in time; it runs again after the restart",
                interrupted.spec.id,
            )
            await parts.journal.requeue(interrupted.spec.id, refund=True)
        await parts.worker.stop(at_once=interrupted is not None)
        if parts.fleet is not None and parts.fleet.link is not None:
            await parts.fleet.link.stop()
        await parts.link.stop()
        await parts.http.stop()
        parts.journal.close()
        await asyncio.to_thread(keep_backup_copy, parts.journal.path)

    async def _redeliver(self, parts: Parts) -> None:
        """Once connected, publish the stored replies the broker never acknowledged."""
        await parts.link.wait_connected()
        for entry in await parts.journal.undelivered():
            log.info("publishing the stored reply of %s again", entry.spec.id)
            await parts.runner.redeliver(entry)

    def _announce(self) -> None:
        """Publish every entity's discovery config, or empty configs to remove them."""
        discovery.publish_all(
            self.parts.link,
            self.settings,
            models=self.parts.service.choice.catalog.names,
            configuration_url=self.parts.outbox.base_url,
        )

    def _on_connection(self, connected: bool) -> None:
        self.metrics.mqtt_connected.set(1 if connected else 0)
        if connected:
            self._announce()
            self.parts.status.connected()
