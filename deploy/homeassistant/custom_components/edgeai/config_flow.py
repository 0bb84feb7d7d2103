"""Set up an agent from the UI, or from the app's announcement; checked against the agent.

From the UI: its URL and API token. Offered by Home Assistant when the edgeai-agent app
announces itself through the Supervisor: nothing to type.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
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
    CONF_HOST,
    CONF_IMAGE_MODEL,
    CONF_MODEL,
    CONF_PORT,
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

if TYPE_CHECKING:
    from homeassistant.helpers.service_info.hassio import HassioServiceInfo

USER_SCHEMA = vol.Schema(
    {
        vol.Required(CONF_URL, default="http://raspberrypi.local:8080"): str,
        vol.Optional(CONF_TOKEN, default=""): str,
    }
)


class EdgeAIConfigFlow(ConfigFlow, domain=DOMAIN):
    """Ask for the agent's URL and token, or confirm what the app announced.

    An unreachable agent or a wrong token is refused, with the reason.
    """

    VERSION = 1
    _discovered: dict[str, str] | None = None

    async def async_step_user(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """The one step: URL and token."""
        errors: dict[str, str] = {}
        placeholders: dict[str, str] = {}
        if user_input is not None:
            url = user_input[CONF_URL].rstrip("/")
            result = await self._check(url, user_input[CONF_TOKEN], errors, placeholders)
            if result is not None:
                return result
        return self.async_show_form(
            step_id="user",
            data_schema=self.add_suggested_values_to_schema(USER_SCHEMA, user_input),
            errors=errors,
            description_placeholders=placeholders,
        )

    async def async_step_hassio(self, discovery_info: HassioServiceInfo) -> ConfigFlowResult:
        """The edgeai-agent app's announcement: its address on the Supervisor's network, its token.

        An agent set up already by this app takes the new address and token and is reloaded; one
        set up by hand at the same URL is left as it is; otherwise the user is asked to confirm.
        """
        config = discovery_info.config
        url = f"http://{config[CONF_HOST]}:{config[CONF_PORT]}"
        token = str(config.get(CONF_TOKEN, ""))
        await self.async_set_unique_id(discovery_info.slug)
        self._abort_if_unique_id_configured(updates={CONF_URL: url, CONF_TOKEN: token})
        self._async_abort_entries_match({CONF_URL: url})
        self._discovered = {CONF_URL: url, CONF_TOKEN: token, "app": discovery_info.name}
        self.context["title_placeholders"] = {"app": discovery_info.name}
        return await self.async_step_hassio_confirm()

    async def async_step_hassio_confirm(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Confirm the discovered agent; nothing to type."""
        assert self._discovered is not None  # noqa: S101 - set by async_step_hassio
        errors: dict[str, str] = {}
        placeholders = {"app": self._discovered["app"], "url": self._discovered[CONF_URL]}
        if user_input is not None:
            discovered = self._discovered
            result = await self._check(
                discovered[CONF_URL], discovered[CONF_TOKEN], errors, placeholders
            )
            if result is not None:
                return result
        return self.async_show_form(
            step_id="hassio_confirm", errors=errors, description_placeholders=placeholders
        )

    async def _check(
        self, url: str, token: str, errors: dict[str, str], placeholders: dict[str, str]
    ) -> ConfigFlowResult | None:
        """Create the entry if the agent answers with this token; else fill in ``errors``."""
        client = AgentClient(async_get_clientsession(self.hass), url, token)
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
            if self.unique_id is None:  # set by hand: the URL is the agent's identity
                await self.async_set_unique_id(url)
                self._abort_if_unique_id_configured()
            return self.async_create_entry(
                title=f"edgeai {urlsplit(url).hostname}",
                data={CONF_URL: url, CONF_TOKEN: token, CONF_MODEL: model},
            )
        return None

    @staticmethod
    @callback
    def async_get_options_flow(config_entry: ConfigEntry) -> OptionsFlow:
        """The model, image size and steps."""
        return EdgeAIOptionsFlow()


class EdgeAIOptionsFlow(OptionsFlow):
    """The model, size and steps every image is asked with."""

    async def async_step_init(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """One form: the model (the agent's installed ones), size (WIDTHxHEIGHT) and steps."""
        if user_input is not None:
            return self.async_create_entry(data=user_input)
        options = self.config_entry.options
        try:
            installed = await self.config_entry.runtime_data.models()
        except AgentError:
            installed = []  # the agent is away: its default, or the model chosen before
        chosen = options.get(CONF_IMAGE_MODEL, "")
        choices = {"": "The agent's default", **{name: name for name in installed}}
        if chosen:
            choices.setdefault(chosen, chosen)
        schema = vol.Schema(
            {
                vol.Optional(CONF_IMAGE_MODEL, default=chosen): vol.In(choices),
                vol.Required(CONF_SIZE, default=options.get(CONF_SIZE, DEFAULT_SIZE)): vol.Match(
                    SIZE_PATTERN
                ),
                vol.Required(CONF_STEPS, default=options.get(CONF_STEPS, DEFAULT_STEPS)): vol.All(
                    vol.Coerce(int), vol.Range(min=1, max=MAX_STEPS)
                ),
            }
        )
        return self.async_show_form(step_id="init", data_schema=schema)
