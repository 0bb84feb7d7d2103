"""Home Assistant discovery: every payload checked against the keys Home Assistant documents."""

from __future__ import annotations

import time

from tests.conftest import AgentProcess, generate

# Keys every MQTT entity accepts (availability, device, origin, attributes, identity).
COMMON_KEYS = {
    "availability",
    "availability_mode",
    "availability_template",
    "availability_topic",
    "payload_available",
    "payload_not_available",
    "device",
    "origin",
    "enabled_by_default",
    "entity_category",
    "entity_picture",
    "icon",
    "json_attributes_template",
    "json_attributes_topic",
    "name",
    "object_id",
    "default_entity_id",
    "qos",
    "encoding",
    "unique_id",
    "platform",
}
# Per platform: (keys it adds, keys it requires), from Home Assistant's MQTT platform docs.
PLATFORMS = {
    "image": (
        {"content_type", "image_encoding", "image_topic", "url_template", "url_topic"},
        set(),
    ),
    "text": (
        {
            "command_template",
            "command_topic",
            "max",
            "min",
            "mode",
            "pattern",
            "retain",
            "state_topic",
            "value_template",
        },
        {"command_topic"},
    ),
    "button": (
        {"command_template", "command_topic", "device_class", "payload_press", "retain"},
        {"command_topic"},
    ),
    "sensor": (
        {
            "device_class",
            "expire_after",
            "force_update",
            "last_reset_value_template",
            "options",
            "state_class",
            "state_topic",
            "suggested_display_precision",
            "unit_of_measurement",
            "value_template",
        },
        {"state_topic"},
    ),
    "select": (
        {
            "command_template",
            "command_topic",
            "options",
            "retain",
            "state_topic",
            "value_template",
        },
        {"command_topic", "options"},
    ),
    "binary_sensor": (
        {
            "device_class",
            "expire_after",
            "force_update",
            "off_delay",
            "payload_off",
            "payload_on",
            "state_topic",
            "value_template",
        },
        {"state_topic"},
    ),
}
DEVICE_KEYS = {
    "identifiers",
    "connections",
    "manufacturer",
    "model",
    "name",
    "hw_version",
    "serial_number",
    "sw_version",
    "via_device",
    "suggested_area",
    "configuration_url",
}
ORIGIN_KEYS = {"name", "sw_version", "support_url"}
EXPECTED = {
    ("image", "image"),
    ("text", "prompt"),
    ("button", "regenerate"),
    ("select", "model"),
    ("sensor", "state"),
    ("sensor", "queue_depth"),
    ("sensor", "last_latency"),
    ("sensor", "soc_temperature"),
    ("binary_sensor", "throttled"),
}


def collect_configs(
    client, node_id: str, expected: int = len(EXPECTED), timeout: float = 20.0
) -> dict:
    client.subscribe(f"homeassistant/+/{node_id}/+/config")
    deadline = time.monotonic() + timeout
    while True:
        configs = {
            m.topic: m
            for m in client.seen
            if m.topic.startswith("homeassistant/")
            and m.topic.split("/")[2] == node_id
            and m.payload
        }
        if len(configs) >= expected or time.monotonic() > deadline:
            return configs
        time.sleep(0.1)


def valid_topic(topic: str, *, subscribe: bool) -> bool:
    if not topic or "\x00" in topic or len(topic.encode()) > 65535:
        return False
    if subscribe:
        return all(
            level in ("+", "#") or ("+" not in level and "#" not in level)
            for level in topic.split("/")
        )
    return "+" not in topic and "#" not in topic


def test_every_entity_is_announced_with_documented_keys(shared_agent, client):
    configs = collect_configs(client, shared_agent.node_id)
    found = set()
    unique_ids = set()
    for topic, message in configs.items():
        assert message.retain
        prefix, component, node, object_id, last = topic.split("/")
        assert (prefix, node, last) == ("homeassistant", shared_agent.node_id, "config")
        found.add((component, object_id))
        config = message.json()
        extra, required = PLATFORMS[component]
        assert set(config) <= COMMON_KEYS | extra, (
            f"{topic}: unknown keys {set(config) - COMMON_KEYS - extra}"
        )
        assert required <= set(config), topic
        assert set(config["device"]) <= DEVICE_KEYS
        assert set(config["origin"]) <= ORIGIN_KEYS
        assert config["origin"]["name"] == "edgeai-agent"
        assert config["availability_topic"] == f"{shared_agent.base}/availability"
        assert config["device"]["identifiers"] == [f"edgeai_{shared_agent.node_id}"]
        for key, value in config.items():
            if key.endswith("_topic"):
                assert valid_topic(value, subscribe=key != "command_topic"), (topic, key)
                assert not value.startswith("homeassistant/")
        unique_ids.add(config["unique_id"])
    assert found == EXPECTED
    assert len(unique_ids) == len(EXPECTED)
    image = configs[f"homeassistant/image/{shared_agent.node_id}/image/config"].json()
    assert image["image_topic"] == f"{shared_agent.base}/image"
    assert image["image_encoding"] == "b64"
    assert image["content_type"] == "image/png"
    assert image["json_attributes_topic"] == f"{shared_agent.base}/image/attributes"
    temperature = configs[
        f"homeassistant/sensor/{shared_agent.node_id}/soc_temperature/config"
    ].json()
    assert (temperature["device_class"], temperature["unit_of_measurement"]) == (
        "temperature",
        "°C",
    )


def test_discovery_is_sent_again_when_home_assistant_comes_online(shared_agent, client):
    topic = f"homeassistant/text/{shared_agent.node_id}/prompt/config"
    collect_configs(client, shared_agent.node_id)
    before = len(client.messages(topic))
    client.publish("homeassistant/status", "online")
    client.wait_for(topic, lambda m: len(client.messages(topic)) > before, timeout=10)


def test_the_text_entity_and_the_button_make_pictures(shared_agent, client):
    configs = collect_configs(client, shared_agent.node_id)
    text = configs[f"homeassistant/text/{shared_agent.node_id}/prompt/config"].json()
    button = configs[f"homeassistant/button/{shared_agent.node_id}/regenerate/config"].json()
    attributes_topic = f"{shared_agent.base}/image/attributes"
    client.subscribe(attributes_topic)
    # What Home Assistant publishes when someone types in the text entity.
    client.publish(text["command_topic"], "a cat in the garden")
    typed = client.wait_for(
        attributes_topic, lambda m: m.json()["prompt"] == "a cat in the garden"
    ).json()
    client.publish(button["command_topic"], button["payload_press"])
    again = client.wait_for(
        attributes_topic,
        lambda m: m.json()["id"] != typed["id"] and m.json()["prompt"] == "a cat in the garden",
    ).json()
    assert again["seed"] != typed["seed"]


def test_turning_discovery_off_removes_the_entities(broker, make_agent, tiny_model, tmp_path):
    announced = make_agent(broker)
    client = broker.client()
    assert len(collect_configs(client, announced.node_id)) == len(EXPECTED)
    announced.stop()
    silent = AgentProcess(
        broker,
        tiny_model,
        tmp_path / "silent",
        {"EDGEAI_DISCOVERY": "false"},
        node_id=announced.node_id,
    )
    silent.start()
    try:
        deadline = time.monotonic() + 20
        while True:  # a fresh subscriber sees whatever is still retained
            late = broker.client()
            left = collect_configs(late, announced.node_id, timeout=1)
            late.close()
            if not left:
                break
            assert time.monotonic() < deadline, f"still announced: {sorted(left)}"
        assert generate(client, silent)["status"] == "ok"  # the agent itself works as before
    finally:
        silent.stop()
    client.close()
