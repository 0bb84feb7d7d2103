"""Home Assistant MQTT discovery: pure functions building one retained config per entity.

Each entity is announced on ``<prefix>/<component>/<node_id>/<object_id>/config``, a form every
Home Assistant release with the MQTT ``image`` platform understands. All entities share one
``device`` block, so they appear together as one device, and the agent's availability topic.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.images import CONTENT_TYPES, EXTENSIONS
from agent.metrics import STATES
from agent.mqtt.link import MqttError
from agent.mqtt.topics import Topics

if TYPE_CHECKING:
    from agent.mqtt.link import MqttLink
    from agent.settings import Settings

log = logging.getLogger(__name__)

ORIGIN = {"name": "edgeai-agent", "sw_version": __version__}
TEXT_MAX_CHARS = 255
"""Home Assistant keeps at most 255 characters in a text entity's state."""


@dataclass(frozen=True)
class Announcement:
    """One discovery message: where it goes and what it says."""

    topic: str
    config: dict[str, Any]

    def payload(self) -> str:
        """Return the JSON payload."""
        return json.dumps(self.config, separators=(",", ":"))


def device_block(node_id: str, model: str, configuration_url: str) -> dict[str, Any]:
    """Return the ``device`` block every entity of this agent shares."""
    return {
        "identifiers": [f"edgeai_{node_id}"],
        "name": f"edgeai {node_id}",
        "manufacturer": "edgeai-agent",
        "model": f"Image generator ({model})",
        "sw_version": __version__,
        "configuration_url": configuration_url,
    }


def announcements(  # noqa: PLR0913 - each value lands in the configs
    *,
    prefix: str,
    node_id: str,
    topics: Topics,
    model: str,
    image_format: str,
    configuration_url: str,
    models: list[str] | None = None,
) -> list[Announcement]:
    """Return the discovery messages of every entity.

    Args:
        prefix: Home Assistant's discovery prefix (``homeassistant``).
        node_id: This agent's node id.
        topics: The agent's topics.
        model: The model id, shown on the device.
        image_format: The default image format, for the image entity's content type.
        configuration_url: Where the device page links to (the agent's HTTP server).
        models: The installed models' names, the select's options (the default model is its
            state); None: just ``model``.
    """
    device = device_block(node_id, model, configuration_url)
    shared = {
        "device": device,
        "origin": ORIGIN,
        "availability_topic": topics.availability,
        "payload_available": "online",
        "payload_not_available": "offline",
        "qos": 1,
    }
    state = {"state_topic": topics.state}
    entities: list[tuple[str, str, dict[str, Any]]] = [
        (
            "image",
            "image",
            {
                "name": "Image",
                "image_topic": topics.image,
                "image_encoding": "b64",
                "content_type": CONTENT_TYPES[EXTENSIONS[image_format]],
                "json_attributes_topic": topics.image_attributes,
            },
        ),
        (
            "text",
            "prompt",
            {
                "name": "Prompt",
                "command_topic": topics.generate,
                "max": TEXT_MAX_CHARS,
                "icon": "mdi:draw",
            },
        ),
        (
            "select",
            "model",
            {
                "name": "Model",
                "command_topic": topics.model_set,
                "state_topic": topics.models,
                "value_template": "{{ value_json.default }}",
                "options": models or [model],
                "icon": "mdi:palette-swatch-variant",
            },
        ),
        (
            "button",
            "regenerate",
            {
                "name": "Generate again",
                "command_topic": topics.regenerate,
                "payload_press": "PRESS",
                "icon": "mdi:dice-multiple",
            },
        ),
        (
            "sensor",
            "state",
            {
                **state,
                "name": "State",
                "value_template": "{{ value_json.state }}",
                "device_class": "enum",
                "options": list(STATES),
                # In state error, why (a model that failed to load, say): an attribute.
                "json_attributes_topic": topics.state,
                "json_attributes_template": "{{ {'error': value_json.error | default(none)}"
                " | tojson }}",
            },
        ),
        (
            "sensor",
            "queue_depth",
            {
                **state,
                "name": "Queue",
                "value_template": "{{ value_json.queue_depth }}",
                "unit_of_measurement": "jobs",
                "state_class": "measurement",
                "icon": "mdi:tray-full",
            },
        ),
        (
            "sensor",
            "last_latency",
            {
                **state,
                "name": "Last latency",
                "value_template": "{{ value_json.last_latency_s }}",
                "unit_of_measurement": "s",
                "device_class": "duration",
                "state_class": "measurement",
            },
        ),
        (
            "sensor",
            "soc_temperature",
            {
                **state,
                "name": "SoC temperature",
                "value_template": "{{ value_json.temperature_c }}",
                "unit_of_measurement": "°C",
                "device_class": "temperature",
                "state_class": "measurement",
                "entity_category": "diagnostic",
            },
        ),
        (
            "binary_sensor",
            "throttled",
            {
                **state,
                "name": "Throttled",
                "value_template": "{{ 'ON' if value_json.throttled else 'OFF' }}",
                "payload_on": "ON",
                "payload_off": "OFF",
                "device_class": "problem",
                "entity_category": "diagnostic",
            },
        ),
    ]
    return [
        Announcement(
            topic=f"{prefix}/{component}/{node_id}/{object_id}/config",
            config={
                **shared,
                **config,
                "unique_id": f"edgeai_{node_id}_{object_id}",
                "default_entity_id": entity_id(component, node_id, config["name"]),
            },
        )
        for component, object_id, config in entities
    ]


def entity_id(component: str, node_id: str, name: str) -> str:
    """Return the entity id Home Assistant gives an entity: domain, device name, entity name.

    Newer releases take it from ``default_entity_id``; older ones build the same from the device
    name (``edgeai <node_id>``) and the entity name, so automations work on both.
    """
    return f"{component}." + re.sub(r"[^a-z0-9]+", "_", f"edgeai {node_id} {name}".lower()).strip(
        "_"
    )


def publish_all(
    link: MqttLink, settings: Settings, *, models: list[str], configuration_url: str
) -> None:
    """Publish every entity's retained discovery config (empty ones when discovery is off).

    Empty retained configs remove the entities from Home Assistant.
    """
    for announcement in announcements(
        prefix=settings.discovery_prefix,
        node_id=settings.node_id,
        topics=Topics(settings.base_topic),
        model=settings.model,
        image_format=settings.default_format,
        configuration_url=configuration_url,
        models=models,
    ):
        payload = announcement.payload() if settings.discovery else ""
        try:
            link.publish(announcement.topic, payload, retain=True)
        except MqttError:
            log.exception("cannot publish discovery")
