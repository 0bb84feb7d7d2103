"""Wiring: builds the parts, routes inbound messages, keeps the state topic, shuts down in order."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import secrets
import signal
import time
import uuid
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from agent import discovery, thermal
from agent.images import ImageStore
from agent.journal import JobStatus, Journal
from agent.memory import memory_limit
from agent.messages import (
    MAX_SEED,
    ErrorCode,
    JobSpec,
    RequestError,
    error_body,
    parse_cancel,
    parse_generate,
)
from agent.metrics import AgentMetrics
from agent.mqtt import Inbound, MqttError, MqttLink
from agent.outbox import Outbox
from agent.protocol import PipelineOptions, WorkerConfig
from agent.runner import Job, Runner
from agent.thermal import ThermalGuard
from agent.topics import Topics
from agent.web import WebApi
from agent.worker_link import Backoff, WorkerLink, WorkerStatus

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from agent.settings import Settings

log = logging.getLogger(__name__)

REQUEST_OUTCOMES = ["accepted", "redelivered", *(code.value for code in ErrorCode)]
JOURNAL_PRUNE_INTERVAL_S = 3600.0
FLEET_PASS_BACK_DELAY_S = 0.25
"""A busy agent waits this long before passing a fleet job on, so that while every agent is busy
jobs circle a few times a second rather than as fast as the network allows."""


class Agent:
    """The daemon: one asyncio loop owning MQTT, the queue and the worker."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        """Create the agent; :meth:`run` starts it.

        Args:
            settings: The settings.
            registry: Metrics registry; a fresh one when None.
        """
        self.settings = settings
        self.topics = Topics(settings.base_topic)
        self.metrics = AgentMetrics(
            registry or CollectorRegistry(), settings.thermal_glob, settings.vcgencmd
        )
        self.metrics.prime(REQUEST_OUTCOMES)
        self._stop = asyncio.Event()
        self._state_changed = asyncio.Event()
        self._connected = asyncio.Event()
        self._last_spec: JobSpec | None = None
        self._temperature_c: float | None = None
        self._throttled: bool | None = None
        self._state = "loading"
        # Accepted requests wait here, in order, for their journal row; counted as queued.
        self._intake: asyncio.Queue[Intake] = asyncio.Queue()
        self._accepting = True
        self._taking = 0  # requests taken in but not yet in the runner's queue
        self._background: set[asyncio.Task[None]] = set()

    # --- lifecycle
    async def run(self) -> int:
        """Run until SIGTERM or SIGINT, then shut down in order; return the exit code."""
        from agent.http import AgentHttpServer  # noqa: PLC0415 - keeps the CLI's --help light

        settings = self.settings
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        store = ImageStore(
            settings.images_path, settings.image_keep_count, settings.image_keep_bytes
        )
        self.http = AgentHttpServer(
            settings.http_host, settings.http_port, store.folder, self.metrics.registry, self.health
        )
        log.info("HTTP server on %s:%d", settings.http_host, self.http.port)
        self.link = MqttLink(
            settings,
            self.topics,
            [
                self.topics.generate,
                self.topics.cancel,
                self.topics.regenerate,
                self.ha_status_topic,
            ],
            self._on_message,
            self._on_connection,
        )
        self.fleet_link: MqttLink | None = None
        if settings.fleet_group is not None:
            self.fleet_link = MqttLink(
                settings,
                self.topics,
                [f"$share/{settings.fleet_group}/{settings.fleet_topic}"],
                self._on_fleet_message,
                lambda _connected: None,
                client_id=f"{settings.client_id}-fleet",
                receive_maximum=1,  # one fleet job in flight to this agent at a time
                announces=False,
            )
        outbox = Outbox(
            self.link, self.topics, store, self.metrics, settings.base_url(self.http.port)
        )
        self.outbox = outbox
        limit = memory_limit()
        log.info("memory limit: %s", limit.describe())
        self.metrics.memory_limit_bytes.set(limit.bytes)
        self.worker = WorkerLink(
            WorkerConfig(
                pipeline=PipelineOptions.from_settings(settings),
                jpeg_quality=settings.jpeg_quality,
                log_level=settings.log_level,
            ),
            backoff=Backoff(settings.worker_restart_delay_s, settings.worker_restart_max_delay_s),
            limit=limit,
            on_change=self._on_worker_change,
            on_restart=self.metrics.worker_restarts.inc,
            on_load_failure=self.metrics.model_load_failures.inc,
        )
        worker = self.worker
        self.metrics.worker_peak_bytes.set_function(lambda: float(worker.peak_bytes or 0))
        self.journal = Journal(settings.journal_path)
        token = settings.api_token.get_secret_value() if settings.api_token else None
        self.http.start(
            WebApi(
                loop=loop,
                agent=self,
                events=outbox.events,
                token=token,
                public_images=settings.public_images,
                max_payload_bytes=settings.max_payload_bytes,
            )
        )
        self.guard = ThermalGuard(
            settings.thermal_glob,
            settings.pause_c,
            settings.resume_c,
            settings.thermal_poll_s,
            self._state_changed.set,
        )
        self.runner = Runner(
            worker=self.worker,
            outbox=outbox,
            journal=self.journal,
            guard=self.guard,
            metrics=self.metrics,
            max_attempts=settings.max_attempts,
            on_change=self._state_changed.set,
        )
        self._last_spec = await self.journal.latest()
        self.link.start()
        if self.fleet_link is not None:
            self.fleet_link.start()
        self.worker.start()
        for entry in await self.journal.unfinished():
            await self.runner.resume(entry)
        tasks = [
            asyncio.create_task(self._redeliver(), name="redeliver"),
            asyncio.create_task(self.runner.run(), name="runner"),
            asyncio.create_task(self._keep_state(), name="state"),
            asyncio.create_task(self._take_requests(), name="intake"),
            asyncio.create_task(self._prune_journal(), name="journal-prune"),
        ]
        await self._stop.wait()
        log.info("stopping")
        await self._shutdown(tasks)
        return 0

    async def _redeliver(self) -> None:
        """Once connected, publish the stored replies the broker never acknowledged."""
        await self._connected.wait()
        for entry in await self.journal.undelivered():
            log.info("publishing the stored reply of %s again", entry.spec.id)
            await self.runner.redeliver(entry)

    async def _prune_journal(self) -> None:
        while True:
            removed = await self.journal.prune(
                self.settings.journal_keep_s, self.settings.journal_keep_rows
            )
            if removed:
                log.info("journal: removed %d delivered jobs", removed)
            await asyncio.sleep(JOURNAL_PRUNE_INTERVAL_S)

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        """Take no new job, let the running one finish within the grace period, then stop.

        Jobs still queued stay in the journal and run after the next start. A job still running
        when the grace period ends goes back to the journal's queue, its attempt not counted.
        """
        self._accepting = False
        running = self.runner.current
        if running is not None:
            log.info("waiting up to %.0f s for the running job", self.settings.shutdown_grace_s)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.shutdown_grace_s):
                    await self.runner.idle()
        interrupted = self.runner.current
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if interrupted is not None:
            log.warning(
                "job %s did not finish in time; it runs again after the restart",
                interrupted.spec.id,
            )
            await self.journal.requeue(interrupted.spec.id, refund=True)
        await self.worker.stop(at_once=interrupted is not None)
        if self.fleet_link is not None:
            await self.fleet_link.stop()
        await self.link.stop()
        await asyncio.to_thread(self.http.stop)
        self.journal.close()

    # --- inbound
    @property
    def ha_status_topic(self) -> str:
        """Home Assistant's birth and last-will topic."""
        return f"{self.settings.discovery_prefix}/status"

    def _on_message(self, message: Inbound) -> None:
        try:
            self._route(message)
        except Exception as exc:  # a message must never go unanswered, even on a bug
            log.exception("unexpected error while handling a message on %s", message.topic)
            self._refuse(RequestError(ErrorCode.INTERNAL_ERROR, f"internal error: {exc}"), message)
            self.link.ack(message)

    def _route(self, message: Inbound) -> None:
        topic = message.topic
        if topic in (self.topics.generate, self.topics.regenerate) and not message.retain:
            # Acknowledged once its journal row is committed.
            if topic == self.topics.generate:
                self._on_generate(message)
            else:
                self._on_regenerate(message)
            return
        try:
            if topic == self.ha_status_topic:
                if message.payload == b"online":
                    self._announce()  # Home Assistant restarted and forgot the entities
            elif message.retain:
                self._on_retained(message)
            elif topic == self.topics.cancel:
                self._on_cancel(message)
        finally:
            self.link.ack(message)

    def _on_fleet_message(self, message: Inbound) -> None:
        """A request from the fleet topic: like ``generate``, its result also on the fleet.

        The broker hands shared-subscription messages round robin, busy or not (mosquitto
        does), so a busy agent passes a fleet job back to the fleet instead of queueing it:
        the job then lands on an agent that is free, and faster agents take more jobs.
        """
        link = self.fleet_link
        assert link is not None  # noqa: S101 - only the fleet link calls this
        if message.retain:
            self._on_retained(message)
            link.ack(message)
            return
        if self.runner.current is not None or self.runner.depth or self._taking:
            self._spawn(self._pass_back(link, message), "fleet-pass-back")
            return
        try:
            spec = self._parse(message)
        except RequestError as exc:
            self._refuse(exc, message)
            if exc.job_id is not None:
                body = json.dumps(error_body(exc.job_id, exc.code, exc.message))
                with contextlib.suppress(MqttError):
                    self.link.publish(f"{self.settings.fleet_results}/result/{exc.job_id}", body)
            link.ack(message)
            return
        fleet_result = f"{self.settings.fleet_results}/result/{spec.id}"
        self._admit(message, dataclasses.replace(spec, fleet_result_topic=fleet_result), link)

    async def _pass_back(self, link: MqttLink, message: Inbound) -> None:
        """Publish a fleet job to the fleet again, then acknowledge it (so it is never lost)."""
        self.metrics.fleet_passed_back.inc()
        await asyncio.sleep(FLEET_PASS_BACK_DELAY_S)
        try:
            await link.publish_confirmed(
                self.settings.fleet_topic,
                message.payload,
                response_topic=message.response_topic,
                correlation_data=message.correlation_data,
            )
        except MqttError:
            log.exception("cannot pass a fleet job back; the broker will deliver it again")
            return
        link.ack(message)

    def _announce(self) -> None:
        """Publish every entity's discovery config, or empty configs to remove them."""
        settings = self.settings
        for announcement in discovery.announcements(
            prefix=settings.discovery_prefix,
            node_id=settings.node_id,
            topics=self.topics,
            model=settings.model,
            image_format=settings.default_format,
            configuration_url=self.outbox.base_url,
        ):
            payload = announcement.payload() if settings.discovery else ""
            try:
                self.link.publish(announcement.topic, payload, retain=True)
            except MqttError:
                log.exception("cannot publish discovery")

    def _on_regenerate(self, message: Inbound) -> None:
        """Run the last prompt again with a new seed (Home Assistant's button)."""
        last = self._last_spec
        if last is None:
            self._refuse(RequestError(ErrorCode.NO_PROMPT, "no prompt has been sent yet"), message)
            self.link.ack(message)
            return
        spec = dataclasses.replace(
            last,
            id=uuid.uuid4().hex,
            seed=secrets.randbelow(MAX_SEED + 1),
            reply_to=None,
            correlation_data=None,
        )
        self._admit(message, spec, self.link)

    def _on_generate(self, message: Inbound) -> None:
        try:
            spec = self._parse(message)
        except RequestError as exc:
            self._refuse(exc, message)
            self.link.ack(message)
            return
        self._admit(message, spec, self.link)

    def _parse(self, message: Inbound) -> JobSpec:
        return parse_generate(
            message.payload,
            self.settings,
            response_topic=message.response_topic,
            correlation_data=message.correlation_data,
        )

    def _admit(self, message: Inbound, spec: JobSpec, link: MqttLink) -> None:
        """Queue a parsed request for its journal row, or refuse it when there is no room."""
        try:
            self._check_room(spec)
        except RequestError as exc:
            self._refuse(exc, message)
            link.ack(message)
            return
        self._take(Intake(message, spec, link))

    def _check_room(self, spec: JobSpec) -> None:
        if not self._accepting:
            raise RequestError(
                ErrorCode.SHUTTING_DOWN,
                "the agent is shutting down",
                job_id=spec.id,
                reply_to=spec.reply_to,
            )
        if self.runner.depth + self._taking >= self.settings.max_queue:
            raise RequestError(
                ErrorCode.BUSY,
                f"the queue is full ({self.settings.max_queue} jobs); try again later",
                job_id=spec.id,
                reply_to=spec.reply_to,
            )

    def _take(self, intake: Intake) -> None:
        self._intake.put_nowait(intake)
        self._taking += 1

    async def _take_requests(self) -> None:
        """Journal each accepted request, in arrival order, then acknowledge it."""
        while True:
            intake = await self._intake.get()
            message, spec, link = intake.message, intake.spec, intake.link
            try:
                expires_at = time.time() + message.expiry_s if message.expiry_s else None
                await self._accept(spec, _request_hash(message), expires_at)
            except RequestError as exc:
                self._refuse(exc, message)
            except Exception as exc:  # a request must never go unanswered, even on a bug
                log.exception("unexpected error while taking a request")
                error = RequestError(
                    ErrorCode.INTERNAL_ERROR,
                    f"internal error: {exc}",
                    job_id=spec.id,
                    reply_to=spec.reply_to,
                )
                self._refuse(error, message)
            finally:
                self._taking -= 1
                link.ack(message)

    async def _accept(self, spec: JobSpec, request_hash: str, expires_at: float | None) -> None:
        """Journal a request as a job, or answer it from the journal if it was seen before."""
        entry = await self.journal.get(spec.id)
        if entry is not None and entry.request_hash == request_hash:
            # The same request again (a QoS 1 redelivery, a client resend): never run it twice.
            self.metrics.requests.labels(outcome="redelivered").inc()
            if entry.status in (JobStatus.DONE, JobStatus.DELIVERED):
                await self.runner.redeliver(entry)
            return
        if entry is not None and entry.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            raise RequestError(
                ErrorCode.DUPLICATE_ID,
                f"another request with id {spec.id} is in progress",
                job_id=spec.id,
                reply_to=spec.reply_to,
            )
        await self.journal.add(spec, request_hash, expires_at)
        self._last_spec = spec
        self.runner.submit(Job(spec, expires_at=expires_at))
        self.metrics.requests.labels(outcome="accepted").inc()

    # --- the web page's API (called from the HTTP server's threads through the loop)
    async def submit_web(self, payload: bytes) -> dict[str, Any]:
        """Take a job from the HTTP API: the same validation, journal, queue and metrics.

        Raises:
            RequestError: The request is refused; counted like an MQTT refusal.
        """
        try:
            spec = parse_generate(payload, self.settings)
            self._check_room(spec)
            self._taking += 1
            try:
                await self._accept(spec, hashlib.sha256(payload).hexdigest(), None)
            finally:
                self._taking -= 1
        except RequestError as exc:
            self.metrics.requests.labels(outcome=exc.code.value).inc()
            raise
        return {"id": spec.id, "position": self.runner.position(spec.id)}

    async def job_status(self, job_id: str) -> dict[str, Any] | None:
        """Return a job's status and, once finished, its reply (with the image URL)."""
        entry = await self.journal.get(job_id)
        if entry is None:
            return None
        body: dict[str, Any] = {"id": job_id, "status": entry.status.value}
        position = self.runner.position(job_id)
        if position is not None:
            body["position"] = position
        if entry.reply is not None:
            body["status"] = "done"
            reply = dict(entry.reply)
            if reply.get("status") == "ok":
                reply["image"] = {**reply["image"], "url": self.outbox.url(entry.spec)}
            body["reply"] = reply
        return body

    async def cancel_web(self, job_id: str) -> bool:
        """Cancel a job from the HTTP API; return whether it was queued or running."""
        return await self.runner.cancel(job_id)

    async def gallery(self, limit: int) -> list[dict[str, Any]]:
        """Return the newest images still on disk, newest first."""
        images = []
        for entry in await self.journal.recent(limit * 2):
            spec = entry.spec
            if not (self.outbox.store_path(spec)).exists():
                continue  # removed by retention
            images.append(
                {
                    "id": spec.id,
                    "prompt": spec.prompt,
                    "seed": spec.seed,
                    "width": spec.width,
                    "height": spec.height,
                    "format": spec.format,
                    "url": self.outbox.url(spec),
                    "created": entry.received_at,
                    "latency_s": (entry.reply or {}).get("latency_s"),
                }
            )
        return images[:limit]

    def _on_retained(self, message: Inbound) -> None:
        if not message.payload:
            return  # a client clearing a retained message: nothing to answer
        error = RequestError(
            ErrorCode.RETAINED_REQUEST,
            "requests must not be retained (they would run again at every reconnect)",
        )
        self._refuse(error, message)

    def _refuse(self, error: RequestError, message: Inbound) -> None:
        self.metrics.requests.labels(outcome=error.code.value).inc()
        log.info("refused a request: %s: %s", error.code.value, error.message)
        self.outbox.error(
            error.job_id, error.code, error.message, error.reply_to, message.correlation_data
        )

    def _on_cancel(self, message: Inbound) -> None:
        try:
            job_id = parse_cancel(message.payload, self.settings.max_payload_bytes)
        except RequestError as exc:
            self.outbox.error(None, exc.code, exc.message)
            return
        self._spawn(self._cancel(job_id), f"cancel-{job_id}")

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        """Run a coroutine in the background, keeping a reference until it is done."""
        task = asyncio.create_task(coroutine, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _cancel(self, job_id: str) -> None:
        if not await self.runner.cancel(job_id):
            self.outbox.error(
                None, ErrorCode.UNKNOWN_JOB, f"no queued or running job has the id {job_id}"
            )

    def _on_connection(self, connected: bool) -> None:
        self.metrics.mqtt_connected.set(1 if connected else 0)
        if connected:
            self._connected.set()
            self._announce()
            self._publish_state()

    def _on_worker_change(self) -> None:
        loaded = self.worker.loaded
        if self.worker.status is WorkerStatus.READY and loaded is not None:
            self.metrics.model_load_seconds.set(loaded.load_seconds)
            self.metrics.warmup_seconds.set(loaded.warmup_seconds)
            if loaded.warmup_seconds:
                self.metrics.warmups.inc()
            self.metrics.model.info(
                {
                    "model": loaded.model,
                    "device": loaded.device,
                    "dtype": loaded.dtype,
                    "pipeline": loaded.pipeline_class,
                    "levers": loaded.levers,
                }
            )
            self.metrics.weight_bytes.labels(residence="mapped").set(loaded.mapped_bytes)
            self.metrics.weight_bytes.labels(residence="copied").set(loaded.copied_bytes)
        self._state_changed.set()

    # --- state
    def current_state(self) -> str:
        """Return the state the contract names: loading, idle, generating or error."""
        status = self.worker.status
        if self.guard.cooling:
            return "cooling"
        if self.runner.current is not None and status is WorkerStatus.READY:
            return "generating"
        if status is WorkerStatus.ERROR:
            return "error"
        if status is WorkerStatus.LOADING:
            return "loading"
        return "idle"

    def state_body(self) -> dict[str, Any]:
        """Return the retained state message."""
        current = self.runner.current
        body: dict[str, Any] = {
            "state": self.current_state(),
            "queue_depth": self.runner.depth + self._taking,
            "job": current.spec.id if current is not None else None,
            "temperature_c": self._temperature_c,
            "throttled": self._throttled,
            "last_latency_s": self.runner.last_latency_s,
            "model": self.settings.model,
        }
        if self.worker.status is WorkerStatus.ERROR:
            body["error"] = self.worker.last_error
        return body

    def _publish_state(self) -> None:
        self._state = self.current_state()
        self.metrics.state.state(self._state)
        try:
            self.link.publish(self.topics.state, json.dumps(self.state_body()), retain=True)
        except MqttError:
            log.exception("cannot publish the state")

    async def _keep_state(self) -> None:
        """Publish the state on every change, and refresh temperature every interval."""
        loop = asyncio.get_running_loop()
        next_reading = loop.time()
        while True:
            if loop.time() >= next_reading:
                next_reading = loop.time() + self.settings.state_interval_s
                await self._read_hardware()
            self._publish_state()
            self._state_changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.state_interval_s):
                    await self._state_changed.wait()
                    # State changes come in bursts (queued, running, done): publish the last.
                    await asyncio.sleep(0.05)

    async def _read_hardware(self) -> None:
        self._temperature_c = await asyncio.to_thread(
            thermal.read_temperature_c, self.settings.thermal_glob
        )
        bits = await asyncio.to_thread(thermal.read_throttled, self.settings.vcgencmd)
        self._throttled = None if bits is None else any(thermal.flags_now(bits).values())

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Return whether the agent is healthy, and why (called from the HTTP thread)."""
        state = self._state
        connected = bool(getattr(self, "link", None) and self.link.connected)
        healthy = connected and state != "error"
        details = {
            "status": "ok" if healthy else "degraded",
            "state": state,
            "mqtt_connected": connected,
            "worker_pid": self.worker.pid if hasattr(self, "worker") else None,
        }
        if state == "error" and hasattr(self, "worker"):
            details["error"] = self.worker.last_error
        return healthy, details


@dataclasses.dataclass(frozen=True)
class Intake:
    """A parsed request waiting for its journal row, and how to acknowledge it."""

    message: Inbound
    spec: JobSpec
    link: MqttLink


def _request_hash(message: Inbound) -> str:
    """Return a fingerprint of a request: a redelivery or a resend has the same one."""
    digest = hashlib.sha256(message.payload)
    digest.update(b"\0" + (message.response_topic or "").encode("utf-8", "replace"))
    digest.update(b"\0" + (message.correlation_data or b""))
    return str(digest.hexdigest())
