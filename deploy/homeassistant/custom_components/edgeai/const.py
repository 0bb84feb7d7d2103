"""Constants of the edgeai-agent integration."""

from __future__ import annotations

from typing import Final

DOMAIN: Final = "edgeai"
CONF_URL: Final = "url"
CONF_HOST: Final = "host"
"""The app's announcement (Supervisor discovery): host, port and token."""
CONF_PORT: Final = "port"
CONF_TOKEN: Final = "token"  # noqa: S105 - a setting's name, not a secret
CONF_MODEL: Final = "model"
CONF_SIZE: Final = "size"
CONF_STEPS: Final = "steps"
CONF_IMAGE_MODEL: Final = "image_model"
"""The installed model images are asked of; empty: the agent's default (its select)."""
DEFAULT_SIZE: Final = "512x512"
DEFAULT_STEPS: Final = 1
MAX_STEPS: Final = 8
SIZE_PATTERN: Final = r"^\d{2,4}x\d{2,4}$"
REQUEST_TIMEOUT_S: Final = 600
"""An image takes seconds on a desktop and a minute or more on a Raspberry Pi."""
CHECK_TIMEOUT_S: Final = 10
