"""A small synchronous MQTT client for tests: subscribe, publish, wait for messages."""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    correlation_data: bytes | None

    def json(self) -> Any:
        return json.loads(self.payload)


class TestClient:
    """A connected paho client that records every message it receives."""

    def __init__(
        self,
        port: int,
        username: str,
        password: str,
        *,
        protocol: int = paho.MQTTv5,
        client_id: str | None = None,
        persistent: bool = False,
    ) -> None:
        """Connect; ``persistent`` keeps the session (and queued messages) across reconnects."""
        self._messages: queue.Queue[Received] = queue.Queue()
        self.seen: list[Received] = []
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-{uuid.uuid4().hex[:8]}",
            protocol=protocol,
        )
        self.client.username_pw_set(username, password)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda *args: self._connected.set()
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        if persistent:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 3600
            self.client.connect("127.0.0.1", port, clean_start=False, properties=properties)
        else:
            self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._connected.wait(10), "test client could not connect"

    def _on_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        properties = getattr(message, "properties", None)
        received = Received(
            message.topic,
            bytes(message.payload),
            bool(message.retain),
            getattr(properties, "CorrelationData", None),
        )
        with self._lock:
            self.seen.append(received)
        self._messages.put(received)

    def subscribe(self, *topics: str) -> None:
        for topic in topics:
            self._subscribed.clear()
            self.client.subscribe(topic, qos=1)
            assert self._subscribed.wait(10)

    def publish(
        self,
        topic: str,
        payload: str | bytes,
        *,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        expiry_s: int | None = None,
    ) -> None:
        properties = None
        if response_topic is not None or expiry_s is not None:
            properties = Properties(PacketTypes.PUBLISH)
        if response_topic is not None:
            properties.ResponseTopic = response_topic
            if correlation_data is not None:
                properties.CorrelationData = correlation_data
        if expiry_s is not None:
            properties.MessageExpiryInterval = expiry_s
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        if info.rc == paho.MQTT_ERR_SUCCESS:
            info.wait_for_publish(10)
        # MQTT_ERR_NO_CONN: paho keeps the QoS 1 message and sends it after the reconnect.

    def wait_for(self, topic: str, predicate: Any = None, timeout: float = 60.0) -> Received:
        """Return the first message on ``topic`` (seen before or arriving) matching predicate."""
        deadline = time.monotonic() + timeout
        checked = 0
        while True:
            with self._lock:
                pending = self.seen[checked:]
                checked = len(self.seen)
            for message in pending:
                if message.topic == topic and (predicate is None or predicate(message)):
                    return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                topics = sorted({m.topic for m in self.seen})
                raise AssertionError(f"no matching message on {topic} in {timeout} s; saw {topics}")
            with contextlib.suppress(queue.Empty):
                self._messages.get(timeout=min(remaining, 0.2))

    def messages(self, topic: str) -> list[Received]:
        with self._lock:
            return [message for message in self.seen if message.topic == topic]

    def messages_matching(self, prefix: str) -> list[Received]:
        with self._lock:
            return [message for message in self.seen if message.topic.startswith(prefix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
