"""The MQTT link: the one place that talks to paho-mqtt.

paho runs its network loop in its own thread (``loop_start``); every callback crosses to the
asyncio loop with ``call_soon_threadsafe``, and paho's errors become :class:`MqttError`. The
link connects with MQTT 5, a persistent session and manual acknowledgement, sets the last will
to ``offline`` and reconnects with backoff on its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from agent.mqtt.topics import Topics
    from agent.settings import Settings

log = logging.getLogger(__name__)

OFFLINE_PUBLISH_TIMEOUT_S = 5.0
PACKET_OVERHEAD = 64 * 1024
"""Bytes a request's packet may carry beyond its payload bound: its topic and properties."""


class MqttError(Exception):
    """A publish or subscribe could not be handed to the broker."""


@dataclass(frozen=True)
class Inbound:
    """A message received, with what the agent needs of its MQTT 5 properties."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    response_topic: str | None
    correlation_data: bytes | None
    expiry_s: int | None = None


class Acknowledgement:
    """Acknowledges one received message to the broker, once, whichever path calls it first.

    paho reuses message ids: a second PUBACK for an id could acknowledge a later message that the
    agent has not yet journaled, which the broker would then never deliver again.
    """

    def __init__(self, link: MqttLink, message: Inbound) -> None:
        """Acknowledge ``message`` on ``link`` when called."""
        self._link = link
        self._message = message
        self.done = False

    def __call__(self) -> None:
        """Acknowledge the message, unless that was done already."""
        if not self.done:
            self.done = True
            self._link.ack(self._message)


class MqttLink:
    """A connected (or reconnecting) MQTT client, driven from asyncio."""

    def __init__(  # noqa: PLR0913 - the fleet connection differs in three options
        self,
        settings: Settings,
        topics: Topics,
        *,
        on_connection: Callable[[bool], None],
        client_id: str | None = None,
        receive_maximum: int | None = None,
        announces: bool = True,
    ) -> None:
        """Create the link; :meth:`subscribe` says what to receive, :meth:`start` connects.

        Args:
            settings: Broker address, credentials and session settings.
            topics: The agent's topics (for the last will).
            on_connection: Called on the event loop with True on connect, False on disconnect.
            client_id: MQTT client id; the agent's own by default.
            receive_maximum: Unacknowledged requests the broker may send at once; by default
                one more than the queue holds.
            announces: Whether this connection carries availability (the last will, ``online``).
        """
        self._receive_maximum = receive_maximum or min(settings.max_queue + 1, 65535)
        self._announces = announces
        self._settings = settings
        self._topics = topics
        self._subscriptions: list[str] = []
        self._with_retained: list[str] = []
        self._on_message: Callable[[Inbound], None] = lambda _message: None
        self._on_connection = on_connection
        self._loop = asyncio.get_running_loop()
        self._connected_once = asyncio.Event()
        self._stopping = False
        self._unreachable_said = False
        """The broker's absence is said once, until it answers again (paho retries quietly)."""
        self.disconnected_at: float | None = None
        """``time.monotonic()`` when the link was lost; None while connected or never."""
        self.connected = False
        self.max_packet_size: int | None = None
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or settings.client_id,
            protocol=paho.MQTTv5,
            manual_ack=True,
        )
        if settings.mqtt_tls_ca is not None:
            client.tls_set(
                ca_certs=str(settings.mqtt_tls_ca),
                certfile=str(settings.mqtt_tls_cert) if settings.mqtt_tls_cert else None,
                keyfile=str(settings.mqtt_tls_key) if settings.mqtt_tls_key else None,
            )
        if settings.mqtt_username is not None:
            client.username_pw_set(settings.mqtt_username, settings.password())
        if announces:
            client.will_set(topics.availability, "offline", qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=settings.mqtt_reconnect_max_s)
        client.on_connect = self._paho_connect
        client.on_disconnect = self._paho_disconnect
        client.on_connect_fail = self._paho_connect_fail
        client.on_message = self._paho_message
        client.on_publish = self._paho_published
        self._client = client
        self._unacknowledged: dict[int, asyncio.Future[None]] = {}

    def subscribe(
        self,
        topics: Iterable[str],
        on_message: Callable[[Inbound], None],
        *,
        with_retained: Iterable[str] = (),
    ) -> None:
        """Subscribe to ``topics`` at QoS 1 on every connect; hand messages to ``on_message``.

        Args:
            topics: Topics (or filters) whose retained messages are never sent at subscribe
                time: requests, which would run again at every reconnect.
            on_message: Called on the event loop for each message.
            with_retained: Topics whose retained message is wanted at once (other agents'
                state, for the fleet).
        """
        self._subscriptions = list(topics)
        self._with_retained = list(with_retained)
        self._on_message = on_message

    async def wait_connected(self) -> None:
        """Return once the link has connected (at least once)."""
        await self._connected_once.wait()

    def start(self) -> None:
        """Connect in the background; paho retries until the broker answers."""
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self._settings.mqtt_session_expiry_s
        # Never more unacknowledged requests in flight than the agent will take.
        properties.ReceiveMaximum = self._receive_maximum
        # The broker drops anything larger before it reaches the agent: a 200 MB publish would
        # otherwise be read whole into the daemon's memory only to be refused.
        properties.MaximumPacketSize = self._settings.max_image_payload_bytes + PACKET_OVERHEAD
        self._client.connect_async(
            self._settings.mqtt_host,
            self._settings.mqtt_port,
            keepalive=self._settings.mqtt_keepalive_s,
            clean_start=False,
            properties=properties,
        )
        self._client.loop_start()

    @property
    def packet_limit(self) -> int:
        """Return the largest message this agent may publish: its setting or the broker's."""
        limit = self._settings.max_message_bytes
        return min(limit, self.max_packet_size) if self.max_packet_size else limit

    def publish_confirmed(
        self,
        topic: str,
        payload: str | bytes,
        *,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
    ) -> asyncio.Future[None]:
        """Publish at QoS 1 and return a future the broker's acknowledgement resolves.

        paho keeps the message across reconnects, so the future may resolve much later.

        Raises:
            MqttError: paho refused the message.
        """
        future: asyncio.Future[None] = self._loop.create_future()
        mid = self.publish(
            topic, payload, response_topic=response_topic, correlation_data=correlation_data
        )
        # The acknowledgement reaches the loop through call_soon_threadsafe, so it cannot run
        # before this registration, which happens in the same loop callback as the publish.
        self._unacknowledged[mid] = future
        return future

    def publish(  # noqa: PLR0913 - MQTT's own publish options
        self,
        topic: str,
        payload: str | bytes,
        *,
        retain: bool = False,
        qos: int = 1,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
    ) -> int:
        """Queue a message; paho sends it now or after the next reconnect.

        Returns:
            The message id.

        Raises:
            MqttError: paho refused the message (too large, or the topic is invalid).
        """
        properties = None
        if correlation_data is not None or response_topic is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if correlation_data is not None:
                properties.CorrelationData = correlation_data
            if response_topic is not None:
                properties.ResponseTopic = response_topic
        try:
            info = self._client.publish(
                topic, payload, qos=qos, retain=retain, properties=properties
            )
        except ValueError as exc:
            raise MqttError(f"cannot publish to {topic!r}: {exc}") from exc
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise MqttError(f"cannot publish to {topic!r}: {paho.error_string(info.rc)}")
        return info.mid

    def ack(self, message: Inbound) -> None:
        """Acknowledge a message, so the broker will not deliver it again."""
        if message.qos > 0:
            self._client.ack(message.mid, message.qos)

    def closing(self) -> None:
        """The agent is stopping: a lost connection from now on is expected, not a warning.

        Ctrl-C in a terminal reaches ``scripts/run``'s broker too, before this link's stop.
        """
        self._stopping = True

    async def stop(self) -> None:
        """Publish ``offline`` (a clean DISCONNECT suppresses the will), then disconnect."""
        self.closing()
        if self.connected and self._announces:
            info = self._client.publish(self._topics.availability, "offline", qos=1, retain=True)
            await asyncio.to_thread(info.wait_for_publish, OFFLINE_PUBLISH_TIMEOUT_S)
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)

    # --- paho thread side: only hand over to the loop
    def _paho_connect(
        self,
        client: paho.Client,
        userdata: Any,  # noqa: ANN401 - paho's signature
        flags: paho.ConnectFlags,
        reason_code: Any,  # noqa: ANN401
        properties: Properties | None,
    ) -> None:
        del userdata, flags
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            return
        self._unreachable_said = False
        max_packet = getattr(properties, "MaximumPacketSize", None) if properties else None
        # retainHandling 2: retained requests are never replayed at subscribe time (they would
        # run again at every reconnect); retainAsPublished: a request published with the retain
        # flag keeps it, so the agent can refuse it.
        options = SubscribeOptions(qos=1, retainAsPublished=True, retainHandling=2)
        wanted = [(topic, options) for topic in self._subscriptions]
        retained = SubscribeOptions(qos=1, retainAsPublished=True, retainHandling=0)
        wanted += [(topic, retained) for topic in self._with_retained]
        client.subscribe(wanted)
        if self._announces:
            client.publish(self._topics.availability, "online", qos=1, retain=True)
        self._loop.call_soon_threadsafe(self._set_connected, True, max_packet)

    def _paho_disconnect(
        self,
        client: paho.Client,
        userdata: Any,  # noqa: ANN401 - paho's signature
        flags: paho.DisconnectFlags,
        reason_code: Any,  # noqa: ANN401
        properties: Properties | None,
    ) -> None:
        del client, userdata, flags, properties
        if self._stopping:
            log.debug("disconnected from the broker: %s", reason_code)
        else:
            log.warning("disconnected from the broker: %s; reconnecting", reason_code)
        self._unreachable_said = True  # the line above said it; retries that fail say nothing
        self._loop.call_soon_threadsafe(self._set_connected, False, None)

    def _paho_connect_fail(self, client: paho.Client, userdata: Any) -> None:  # noqa: ANN401
        del client, userdata
        if not self._unreachable_said and not self._stopping:
            self._unreachable_said = True
            log.warning(
                "cannot reach the broker at %s:%d; trying again until it answers",
                self._settings.mqtt_host,
                self._settings.mqtt_port,
            )

    def _paho_message(
        self,
        client: paho.Client,
        userdata: Any,  # noqa: ANN401 - paho's signature
        message: paho.MQTTMessage,
    ) -> None:
        del client, userdata
        properties = getattr(message, "properties", None)
        inbound = Inbound(
            topic=message.topic,
            payload=bytes(message.payload),
            qos=message.qos,
            retain=bool(message.retain),
            mid=message.mid,
            response_topic=getattr(properties, "ResponseTopic", None),
            correlation_data=getattr(properties, "CorrelationData", None),
            expiry_s=getattr(properties, "MessageExpiryInterval", None),
        )
        self._loop.call_soon_threadsafe(self._on_message, inbound)

    def _paho_published(
        self,
        client: paho.Client,
        userdata: Any,  # noqa: ANN401 - paho's signature
        mid: int,
        reason_code: Any,  # noqa: ANN401
        properties: Properties | None,
    ) -> None:
        del client, userdata, reason_code, properties
        self._loop.call_soon_threadsafe(self._acknowledged, mid)

    def _acknowledged(self, mid: int) -> None:
        future = self._unacknowledged.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(None)

    def _set_connected(self, connected: bool, max_packet_size: int | None) -> None:
        was_connected, self.connected = self.connected, connected
        now = time.monotonic()
        if connected:
            self.max_packet_size = max_packet_size
            settings = self._settings
            where = f"{settings.mqtt_host}:{settings.mqtt_port}"
            user = settings.mqtt_username or "anonymous"
            if not self._connected_once.is_set():
                log.info("connected to the broker at %s as %s (MQTT 5)", where, user)
            elif not was_connected:
                log.info(
                    "reconnected to the broker at %s as %s after %.1f s",
                    where,
                    user,
                    now - (self.disconnected_at or now),
                )
            self.disconnected_at = None
            self._connected_once.set()
        elif was_connected:
            self.disconnected_at = now
        self._on_connection(connected)
