"""Settings of the agent's identity, its topics, Home Assistant, the fleet and the broker."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field, SecretStr

Port = Annotated[int, Field(ge=1, le=65535)]


def default_node_id() -> str:
    """Return the hostname reduced to what a topic level and an entity id accept."""
    node = re.sub(r"[^a-z0-9_-]+", "-", socket.gethostname().lower()).strip("-")
    return node or "edgeai"


class NetworkSettings(BaseModel):
    """Who the agent is on the network and how it reaches the broker."""

    # --- identity and topics
    node_id: str = Field(
        default_factory=default_node_id,
        pattern=r"^[a-z0-9_-]{1,64}$",
        description="This agent's name in topics: <base> is <topic_prefix>/<node_id>.",
    )
    topic_prefix: str = Field(
        default="edgeai",
        pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$",
        description="First topic level(s) of every topic this agent owns.",
    )
    reply_prefix: str = Field(
        default="edgeai/reply/",
        description="reply_to and MQTT 5 response topics must start with this (empty allows any).",
    )

    # --- Home Assistant and fleet
    discovery: bool = Field(
        default=True,
        description="Announce entities to Home Assistant; false removes them.",
    )
    discovery_prefix: str = Field(
        default="homeassistant",
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Home Assistant's MQTT discovery prefix.",
    )
    fleet_group: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Join this fleet: take jobs from fleet_topic through a shared subscription.",
    )
    fleet_topic: str = Field(
        default="edgeai/fleet/generate",
        description="Where fleet requests are published; their results go to "
        "<fleet_topic without /generate>/result/<node_id>/<id>.",
    )

    # --- broker
    mqtt_host: str = Field(default="localhost", description="MQTT broker host name or address.")
    mqtt_port: Port = Field(default=1883, description="MQTT broker port.")
    mqtt_username: str | None = Field(default=None, description="MQTT user name.")
    mqtt_password: SecretStr | None = Field(default=None, description="MQTT password.")
    mqtt_password_file: Path | None = Field(
        default=None, description="File holding the MQTT password (its first line)."
    )
    mqtt_client_id: str | None = Field(
        default=None, description="MQTT client id; default edgeai-<node_id>."
    )
    mqtt_keepalive_s: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive.")
    mqtt_session_expiry_s: int = Field(
        default=86400,
        ge=0,
        description="How long the broker keeps this agent's session (and jobs sent to it) "
        "while it is offline.",
    )
    mqtt_reconnect_max_s: int = Field(
        default=30, ge=1, le=600, description="Longest wait between reconnect attempts."
    )
    mqtt_tls_ca: Path | None = Field(
        default=None, description="CA certificate file; setting it turns TLS on."
    )
    mqtt_tls_cert: Path | None = Field(
        default=None, description="Client certificate file, for brokers that require one."
    )
    mqtt_tls_key: Path | None = Field(default=None, description="Client certificate's key file.")
    max_message_bytes: int = Field(
        default=8_000_000,
        ge=10_000,
        description="Largest message the agent publishes; a larger result carries the image "
        "URL instead of base64 (the broker's own limit, from CONNACK, applies too).",
    )
