"""edgeai-agent: SDXL-Turbo image generation over MQTT on a Raspberry Pi 5."""

__version__ = "0.1.0"
