"""MQTT: the broker link, the topics, inbound routes, the fleet and Home Assistant discovery."""
