"""edgeai-agent: pictures from a Raspberry Pi for Home Assistant's AI Task."""

from __future__ import annotations

from typing import TYPE_CHECKING

from homeassistant.config_entries import ConfigEntry
from homeassistant.const import Platform
from homeassistant.helpers.aiohttp_client import async_get_clientsession

from .client import AgentClient
from .const import CONF_TOKEN, CONF_URL

if TYPE_CHECKING:
    from homeassistant.core import HomeAssistant

PLATFORMS = [Platform.AI_TASK]

EdgeAIConfigEntry = ConfigEntry[AgentClient]


async def async_setup_entry(hass: HomeAssistant, entry: EdgeAIConfigEntry) -> bool:
    """Connect to the agent the entry names and set up its AI Task entity."""
    entry.runtime_data = AgentClient(
        async_get_clientsession(hass), entry.data[CONF_URL], entry.data[CONF_TOKEN]
    )
    await hass.config_entries.async_forward_entry_setups(entry, PLATFORMS)
    entry.async_on_unload(entry.add_update_listener(_options_changed))
    return True


async def async_unload_entry(hass: HomeAssistant, entry: EdgeAIConfigEntry) -> bool:
    """Remove the entity."""
    return await hass.config_entries.async_unload_platforms(entry, PLATFORMS)


async def _options_changed(hass: HomeAssistant, entry: EdgeAIConfigEntry) -> None:
    await hass.config_entries.async_reload(entry.entry_id)
