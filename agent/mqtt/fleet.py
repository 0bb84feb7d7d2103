"""The fleet: jobs shared by every agent of a group through an MQTT 5 shared subscription.

A fleet request is admitted like any other; its result also goes to the fleet's result topic
(``edgeai/fleet/result/<node_id>/<job_id>``), so a fleet client subscribes to
``edgeai/fleet/result/+/<job_id>`` without knowing which agent will run it, and learns which did
from a topic level only that agent may write. The broker hands shared-subscription messages
round robin, busy or not (mosquitto does). An agent that is free takes the job. An agent that is
busy holds it, unacknowledged, in memory: the fleet connection's Receive Maximum of 1 makes the
broker keep the rest of this agent's share queued, in order, in its session. The held job is
passed back to the fleet (published again, then acknowledged) only when a peer of the group
says, in its retained state, that it is idle with an empty queue; otherwise it waits until this
agent is free. So when every agent is busy no job circles; a job moves at most once to an idle
agent; a faster agent, idle sooner, takes more; and a job is never journaled before it is taken,
so a kill -9 at any moment leaves it with the broker, delivered again after the restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.jobs.errors import error_body
from agent.mqtt.link import Acknowledgement, MqttError, MqttLink

if TYPE_CHECKING:
    from collections.abc import Callable

    from agent.jobs.errors import RequestError
    from agent.jobs.requests import JobSpec
    from agent.metrics import AgentMetrics
    from agent.mqtt.link import Inbound
    from agent.mqtt.routes import Background, Requests
    from agent.mqtt.topics import Topics
    from agent.settings import Settings

log = logging.getLogger(__name__)

PASS_BACK_DELAY_S = 0.25
"""A held job is passed back this long after a peer was seen idle, if the peer still is: its
state may have been a moment old, and another agent may have passed it a job meanwhile."""


@dataclass
class Peer:
    """Another agent, as its retained state and availability describe it."""

    state: str = "loading"
    queue_depth: int = 0
    fleet: str | None = None
    online: bool = False
    seen: float = 0.0


class Fleet:
    """Takes fleet jobs when free, holds one when busy, passes it back only to an idle peer."""

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
            settings: The fleet topic and group, this agent's node id.
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
        self._held: tuple[Inbound, Acknowledgement] | None = None
        self._passing = False
        self._pending = False
        self.peers: dict[str, Peer] = {}
        self.link: MqttLink | None = None

    @property
    def subscription(self) -> str:
        """Return the shared subscription: ``$share/<group>/<fleet topic>``."""
        return f"$share/{self._settings.fleet_group}/{self._settings.fleet_topic}"

    @property
    def peer_topics(self) -> list[str]:
        """Return the filters of every agent's retained state and availability."""
        prefix = self._settings.topic_prefix
        return [f"{prefix}/+/state", f"{prefix}/+/availability"]

    def open_link(self, topics: Topics) -> MqttLink:
        """Make and subscribe the fleet's own connection (Receive Maximum 1) for fleet jobs.

        The agent starts and stops it with its own.
        """
        settings = self._settings
        link = MqttLink(
            settings,
            topics,
            on_connection=lambda _connected: None,
            client_id=f"{settings.client_id}-fleet",
            receive_maximum=1,  # one fleet job in flight to this agent at a time
            announces=False,
        )
        link.subscribe([self.subscription], self.on_message)
        self.link = link
        return link

    def result_topic(self, job_id: str) -> str:
        """Return where a fleet job's result is published besides the agent's own topic.

        ``<fleet>/result/<node_id>/<job_id>``: the node in the topic is the one that ran it, and
        the broker's ACL lets only that node write there, so no other node can answer as it.
        """
        return f"{self._settings.fleet_results}/result/{self._settings.node_id}/{job_id}"

    # --- fleet jobs
    def on_message(self, message: Inbound) -> None:
        """A request from the fleet topic: take it, or hold it while busy."""
        link = self.link
        if link is None:
            return
        ack = Acknowledgement(link, message)
        if message.retain:
            self._requests.refuse_retained(message, "fleet")
            ack()
            return
        if self._held is not None:  # Receive Maximum 1 prevents it; never lose one regardless
            log.warning("a second fleet job arrived while one is held; taking it")
            self._take(message, ack)
            return
        if not self._busy():
            self._take(message, ack)
            return
        self._held = (message, ack)
        self.reconsider()

    def reconsider(self) -> None:
        """Look again at a held job, soon: this agent or a peer may have become free."""
        if self._held is not None and not self._pending:
            self._pending = True
            asyncio.get_running_loop().call_soon(self._decide)

    def _decide(self) -> None:
        self._pending = False
        if self._held is None or self._passing:
            return
        if not self._busy():
            message, ack = self._held
            self._held = None
            self._take(message, ack)
        elif self.idle_peer() is not None:
            self._passing = True
            self._background.spawn(self._pass_back(), "fleet-pass-back")

    def _take(self, message: Inbound, ack: Acknowledgement) -> None:
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

    async def _pass_back(self) -> None:
        """Publish the held job to the fleet again, then acknowledge it (it is never lost)."""
        try:
            await asyncio.sleep(PASS_BACK_DELAY_S)
            held, link = self._held, self.link
            if held is None or link is None or self.idle_peer() is None:
                return
            message, ack = held
            try:
                await link.publish_confirmed(
                    self._settings.fleet_topic,
                    message.payload,
                    response_topic=message.response_topic,
                    correlation_data=message.correlation_data,
                )
            except MqttError:
                log.exception("cannot pass a fleet job back; it stays here")
                return
            ack()
            self._held = None
            self._metrics.fleet_passed_back.inc()
        finally:
            self._passing = False
            self.reconsider()

    # --- peers
    def on_peer(self, message: Inbound) -> None:
        """Another agent's retained state or availability."""
        parts = message.topic.split("/")
        node, kind = parts[-2], parts[-1]
        if node == self._settings.node_id:
            return
        peer = self.peers.setdefault(node, Peer())
        peer.seen = time.monotonic()
        if kind == "availability":
            peer.online = message.payload == b"online"
        else:
            try:
                body: Any = json.loads(message.payload)
                peer.state = str(body["state"])
                peer.queue_depth = int(body["queue_depth"])
                peer.fleet = body.get("fleet")
            except (ValueError, KeyError, TypeError):
                return
        self.reconsider()

    def idle_peer(self) -> str | None:
        """Return a peer of this fleet that is online, idle and has an empty queue, if any."""
        for node, peer in self.peers.items():
            fleet = peer.fleet == self._settings.fleet_group
            if fleet and peer.online and peer.state == "idle" and peer.queue_depth == 0:
                return node
        return None
