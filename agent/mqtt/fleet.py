"""The fleet: jobs shared by every agent of a group through an MQTT 5 shared subscription.

A fleet request is admitted like any other; its result also goes to the fleet's result topic, so
a fleet client need not know which agent ran it. The broker hands shared-subscription messages
round robin, busy or not (mosquitto does), so a busy agent passes a fleet job back to the fleet
instead of queueing it: the job then lands on an agent that is free, and faster agents take more.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from typing import TYPE_CHECKING

from agent.jobs.requests import error_body
from agent.mqtt.link import Acknowledgement, MqttError

if TYPE_CHECKING:
    from collections.abc import Callable

    from agent.jobs.requests import JobSpec, RequestError
    from agent.metrics import AgentMetrics
    from agent.mqtt.link import Inbound, MqttLink
    from agent.mqtt.routes import Background, Requests
    from agent.settings import Settings

log = logging.getLogger(__name__)

PASS_BACK_DELAY_S = 0.25
"""A busy agent waits this long before passing a fleet job on, so that while every agent is busy
jobs circle a few times a second rather than as fast as the network allows."""


class Fleet:
    """Takes fleet jobs from the shared subscription, or passes them back when busy."""

    def __init__(  # noqa: PLR0913 - the parts a fleet job reaches
        self,
        *,
        settings: Settings,
        requests: Requests,
        results: MqttLink,
        busy: Callable[[], bool],
        metrics: AgentMetrics,
        background: Background,
    ) -> None:
        """Create the fleet side; :meth:`attach` gives it its own connection.

        Args:
            settings: The fleet topic and group.
            requests: Admission and refusal replies, shared with the agent's own topics.
            results: The agent's main link, where fleet results and refusals are published.
            busy: Whether this agent has a job running or waiting.
            metrics: Counts jobs passed back.
            background: Runs the pass-backs.
        """
        self._settings = settings
        self._requests = requests
        self._results = results
        self._busy = busy
        self._metrics = metrics
        self._background = background
        self.link: MqttLink | None = None

    @property
    def subscription(self) -> str:
        """Return the shared subscription: ``$share/<group>/<fleet topic>``."""
        return f"$share/{self._settings.fleet_group}/{self._settings.fleet_topic}"

    def attach(self, link: MqttLink) -> None:
        """Use ``link`` (the fleet's own connection, Receive Maximum 1) for fleet jobs."""
        self.link = link

    def result_topic(self, job_id: str) -> str:
        """Return where a fleet job's result is published besides the agent's own topic."""
        return f"{self._settings.fleet_results}/result/{job_id}"

    def on_message(self, message: Inbound) -> None:
        """A request from the fleet topic."""
        link = self.link
        if link is None:
            return
        ack = Acknowledgement(link, message)
        if message.retain:
            self._requests.refuse_retained(message, "fleet")
            ack()
            return
        if self._busy():
            self._background.spawn(self._pass_back(link, message, ack), "fleet-pass-back")
            return

        def parse() -> JobSpec:
            spec = self._requests.parse(message)
            return dataclasses.replace(spec, fleet_result_topic=self.result_topic(spec.id))

        self._requests.admit(message, ack, parse, api="fleet", on_refused=self._refused)

    def _refused(self, error: RequestError) -> None:
        """Tell fleet clients too, on the fleet's result topic, when the id could be read."""
        if error.job_id is None:
            return
        body = json.dumps(error_body(error.job_id, error.code, error.message))
        try:
            self._results.publish(self.result_topic(error.job_id), body)
        except MqttError:
            log.exception("cannot publish a fleet refusal")

    async def _pass_back(self, link: MqttLink, message: Inbound, ack: Acknowledgement) -> None:
        """Publish a fleet job to the fleet again, then acknowledge it (so it is never lost)."""
        self._metrics.fleet_passed_back.inc()
        await asyncio.sleep(PASS_BACK_DELAY_S)
        try:
            await link.publish_confirmed(
                self._settings.fleet_topic,
                message.payload,
                response_topic=message.response_topic,
                correlation_data=message.correlation_data,
            )
        except MqttError:
            log.exception("cannot pass a fleet job back; the broker will deliver it again")
            return
        ack()
