"""Home Assistant's own test harness (pytest-homeassistant-custom-component) for the integration.

These tests run in an environment with Home Assistant (Python 3.13 or later): a Debian 13 root on
older machines. ``tests/test_home_assistant.py`` builds it, starts a real agent with the tiny
model, and runs them there with the agent's URL and token in the environment.
"""

from __future__ import annotations

import pytest
from homeassistant.setup import async_setup_component


@pytest.fixture(autouse=True)
def auto_enable_custom_integrations(enable_custom_integrations):
    """Let Home Assistant load ``custom_components/edgeai``."""
    return


@pytest.fixture(autouse=True)
def real_network(socket_enabled):
    """Let the integration talk to the real agent (the harness blocks sockets by default)."""
    return


@pytest.fixture(autouse=True)
async def core_integration(hass):
    """Set up Home Assistant's core integration, as a running instance has (AI Task needs it)."""
    assert await async_setup_component(hass, "homeassistant", {})
