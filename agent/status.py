"""What the agent is doing, in one voice: the state topic, ``/healthz``, ``edgeai_state``.

The retained state carries the hardware readings (temperature, throttling) taken here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from agent.machine import thermal
from agent.model.link import WorkerStatus
from agent.mqtt.link import MqttError

if TYPE_CHECKING:
    from agent.jobs.admission import Admission
    from agent.jobs.model_choice import ModelChoice
    from agent.jobs.runner import Runner
    from agent.machine.disk import StorageWatch
    from agent.machine.thermal import ThermalGuard
    from agent.metrics import AgentMetrics
    from agent.model.link import WorkerLink
    from agent.model.protocol import Ready
    from agent.mqtt.link import MqttLink
    from agent.mqtt.topics import Topics
    from agent.settings import Settings

log = logging.getLogger(__name__)

BURST_S = 0.05
"""State changes come in bursts (queued, running, done): the last of a burst is published."""


class AgentStatus:
    """The agent's state as the contract names it, published on every change."""

    def __init__(  # noqa: PLR0913 - the parts whose state it reports
        self,
        *,
        settings: Settings,
        topics: Topics,
        link: MqttLink,
        worker: WorkerLink,
        runner: Runner,
        admission: Admission,
        guard: ThermalGuard,
        metrics: AgentMetrics,
        changed: asyncio.Event,
        storage: StorageWatch,
        choice: ModelChoice | None = None,
    ) -> None:
        """Create the status over the agent's parts.

        Args:
            settings: The model name and the refresh interval.
            topics: Where the state goes.
            link: The MQTT link.
            worker: The worker's status and last error.
            runner: The running job.
            admission: The queue depth.
            guard: Whether the SoC is cooling down.
            metrics: ``edgeai_state`` and the model's metrics.
            changed: Set by any part whose change the state shows.
            storage: A write that failed (a full disk), told in the state and health.
            choice: The installed models and LoRA styles, whose lists are published retained
                (each when it changes: a LoRA file dropped in the folder, a new default).
        """
        self._choice = choice
        self._lists_published: dict[str, str] = {}
        self._settings = settings
        self._topics = topics
        self._link = link
        self._worker = worker
        self._runner = runner
        self._admission = admission
        self._guard = guard
        self._metrics = metrics
        self._changed = changed
        self._storage = storage
        self._temperature_c: float | None = None
        self._throttled: bool | None = None
        self._recorded: Ready | None = None
        self.state = "loading"

    def current(self) -> str:
        """Return the state: loading, idle, generating, cooling or error."""
        status = self._worker.status
        if self._guard.cooling:
            return "cooling"
        if self._runner.current is not None and status is WorkerStatus.READY:
            return "generating"
        if status is WorkerStatus.ERROR:
            return "error"
        if status is WorkerStatus.LOADING:
            return "loading"
        return "idle"

    def body(self) -> dict[str, Any]:
        """Return the retained state message."""
        current = self._runner.current
        body: dict[str, Any] = {
            "state": self.current(),
            "queue_depth": self._admission.queue_depth,
            "job": current.spec.id if current is not None else None,
            "temperature_c": self._temperature_c,
            "throttled": self._throttled,
            "last_latency_s": self._runner.last_latency_s,
            "model": self._worker.model_source,
            "model_name": self._worker.model_name,
        }
        if self._choice is not None:
            body["default_model"] = self._choice.catalog.default
        if self._settings.fleet_group is not None:
            body["fleet"] = self._settings.fleet_group  # peers of the group read it
        if self._worker.status is WorkerStatus.ERROR:
            body["error"] = self._worker.last_error
        if self._storage.problem is not None:
            body["storage"] = self._storage.problem
        return body

    def publish(self) -> None:
        """Publish the retained state now (after recording a newly loaded model)."""
        self._record_model()
        self.state = self.current()
        self._metrics.state.state(self.state)
        try:
            self._link.publish(self._topics.state, json.dumps(self.body()), retain=True)
        except MqttError:
            log.exception("cannot publish the state")
        self._publish_lists()

    def _publish_lists(self) -> None:
        """Publish the models and LoRA lists, retained, where they changed since last time."""
        if self._choice is None or not self._link.connected:
            return
        catalog = self._choice.catalog
        lists = {
            self._topics.models: {"default": catalog.default, "models": catalog.listing()},
            self._topics.loras: {"loras": self._choice.loras.listing()},
        }
        for topic, content in lists.items():
            payload = json.dumps(content)
            if self._lists_published.get(topic) == payload:
                continue
            try:
                self._link.publish(topic, payload, retain=True)
            except MqttError:
                log.exception("cannot publish %s", topic)
                continue
            self._lists_published[topic] = payload

    def connected(self) -> None:
        """The broker link is (again) up: publish the state and every list."""
        self._lists_published.clear()
        self.publish()

    async def keep(self) -> None:
        """Publish the state on every change, and the hardware readings every interval."""
        loop = asyncio.get_running_loop()
        next_reading = loop.time()
        while True:
            if loop.time() >= next_reading:
                next_reading = loop.time() + self._settings.state_interval_s
                await self._read_hardware()
            self.publish()
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.state_interval_s):
                    await self._changed.wait()
                    await asyncio.sleep(BURST_S)

    async def _read_hardware(self) -> None:
        settings = self._settings
        self._temperature_c = await asyncio.to_thread(
            thermal.read_temperature_c, settings.thermal_glob
        )
        bits = await asyncio.to_thread(thermal.read_throttled, settings.vcgencmd)
        self._throttled = None if bits is None else any(thermal.flags_now(bits).values())

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Return whether the agent is healthy, and why.

        A broker link lost for less than ``health_broker_grace_s`` still counts as healthy: the
        link reconnects by itself, and a supervisor should not restart the agent over a blip.
        """
        state = self.state
        connected = self._link.connected
        lost_at = self._link.disconnected_at
        grace = self._settings.health_broker_grace_s
        link_ok = connected or (lost_at is not None and time.monotonic() - lost_at < grace)
        storage = self._storage.problem
        healthy = link_ok and state != "error" and storage is None
        details: dict[str, Any] = {
            "status": "ok" if healthy else "degraded",
            "state": state,
            "mqtt_connected": connected,
            "worker_pid": self._worker.pid,
        }
        if state == "error":
            details["error"] = self._worker.last_error
        if storage is not None:
            details["storage"] = storage
        return healthy, details

    def _record_model(self) -> None:
        """Put a newly loaded model's figures in the metrics, once per load."""
        loaded = self._worker.loaded
        ready = self._worker.status is WorkerStatus.READY
        if ready and loaded is not None and loaded is not self._recorded:
            self._recorded = loaded
            metrics = self._metrics
            metrics.model_load_seconds.set(loaded.load_seconds)
            metrics.warmup_seconds.set(loaded.warmup_seconds)
            if loaded.warmup_seconds:
                metrics.warmups.inc()
            metrics.model.info(
                {
                    "model": loaded.model,
                    "device": loaded.device,
                    "dtype": loaded.dtype,
                    "pipeline": loaded.pipeline_class,
                    "levers": loaded.levers,
                }
            )
            metrics.weight_bytes.labels(residence="mapped").set(loaded.mapped_bytes)
            metrics.weight_bytes.labels(residence="copied").set(loaded.copied_bytes)
