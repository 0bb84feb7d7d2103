"""Set up an agent from the UI: its URL and API token, checked against the agent itself."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import voluptuous as vol
from homeassistant.config_entries import (
    ConfigEntry,
    ConfigFlow,
    ConfigFlowResult,
    OptionsFlow,
)
from homeassistant.core import callback
from homeassistant.helpers.aiohttp_client import async_get_clientsession

from .client import AgentClient, AgentError, CannotConnectError, InvalidAuthError
from .const import (
    CONF_MODEL,
    CONF_SIZE,
    CONF_STEPS,
    CONF_TOKEN,
    CONF_URL,
    DEFAULT_SIZE,
    DEFAULT_STEPS,
    DOMAIN,
    MAX_STEPS,
    SIZE_PATTERN,
)

USER_SCHEMA = vol.Schema(
    {
        vol.Required(CONF_URL, default="http://raspberrypi.local:8080"): str,
        vol.Optional(CONF_TOKEN, default=""): str,
    }
)


class EdgeAIConfigFlow(ConfigFlow, domain=DOMAIN):
    """Ask for the agent's URL and token; refuse an unreachable agent or a wrong token."""

    VERSION = 1

    async def async_step_user(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """The one step: URL and token."""
        errors: dict[str, str] = {}
        placeholders: dict[str, str] = {}
        if user_input is not None:
            url = user_input[CONF_URL].rstrip("/")
            client = AgentClient(async_get_clientsession(self.hass), url, user_input[CONF_TOKEN])
            try:
                model = await client.model()
            except InvalidAuthError:
                errors["base"] = "invalid_auth"
            except CannotConnectError as exc:
                errors["base"] = "cannot_connect"
                placeholders["error"] = str(exc)
            except AgentError as exc:
                errors["base"] = "unknown"
                placeholders["error"] = str(exc)
            else:
                await self.async_set_unique_id(url)
                self._abort_if_unique_id_configured()
                return self.async_create_entry(
                    title=f"edgeai {urlsplit(url).hostname}",
                    data={CONF_URL: url, CONF_TOKEN: user_input[CONF_TOKEN], CONF_MODEL: model},
                )
        return self.async_show_form(
            step_id="user",
            data_schema=self.add_suggested_values_to_schema(USER_SCHEMA, user_input),
            errors=errors,
            description_placeholders=placeholders,
        )

    @staticmethod
    @callback
    def async_get_options_flow(config_entry: ConfigEntry) -> OptionsFlow:
        """Image size and steps."""
        return EdgeAIOptionsFlow()


class EdgeAIOptionsFlow(OptionsFlow):
    """The size and the steps every image is asked with."""

    async def async_step_init(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """One form: size (WIDTHxHEIGHT) and denoising steps."""
        if user_input is not None:
            return self.async_create_entry(data=user_input)
        options = self.config_entry.options
        schema = vol.Schema(
            {
                vol.Required(CONF_SIZE, default=options.get(CONF_SIZE, DEFAULT_SIZE)): vol.Match(
                    SIZE_PATTERN
                ),
                vol.Required(CONF_STEPS, default=options.get(CONF_STEPS, DEFAULT_STEPS)): vol.All(
                    vol.Coerce(int), vol.Range(min=1, max=MAX_STEPS)
                ),
            }
        )
        return self.async_show_form(step_id="init", data_schema=schema)
