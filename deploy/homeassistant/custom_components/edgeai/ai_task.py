"""The AI Task entity: ``ai_task.generate_image`` answered by the agent."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from homeassistant.components import ai_task, conversation
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers.device_registry import DeviceInfo
from PIL import Image

from .client import AgentError
from .const import CONF_MODEL, CONF_SIZE, CONF_STEPS, DEFAULT_SIZE, DEFAULT_STEPS, DOMAIN

if TYPE_CHECKING:
    from homeassistant.core import HomeAssistant
    from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

    from . import EdgeAIConfigEntry


async def async_setup_entry(
    hass: HomeAssistant,
    entry: EdgeAIConfigEntry,
    async_add_entities: AddConfigEntryEntitiesCallback,
) -> None:
    """Add the agent's AI Task entity."""
    async_add_entities([EdgeAITaskEntity(entry)])


class EdgeAITaskEntity(ai_task.AITaskEntity):
    """Generates images on an edgeai agent."""

    _attr_has_entity_name = True
    _attr_name = None
    _attr_supported_features = ai_task.AITaskEntityFeature.GENERATE_IMAGE

    def __init__(self, entry: EdgeAIConfigEntry) -> None:
        """Create the entity of one config entry (one agent)."""
        self._entry = entry
        self._attr_unique_id = entry.entry_id
        self._attr_device_info = DeviceInfo(
            identifiers={(DOMAIN, entry.entry_id)},
            name=entry.title,
            manufacturer="edgeai-agent",
            model=entry.data.get(CONF_MODEL, "Image generator"),
            configuration_url=entry.runtime_data.url,
        )

    async def _async_generate_image(
        self,
        task: ai_task.GenImageTask,
        chat_log: conversation.ChatLog,
    ) -> ai_task.GenImageTaskResult:
        """Send the task's instructions as the prompt; return the PNG and what it is."""
        options = self._entry.options
        try:
            image = await self._entry.runtime_data.generate(
                task.instructions,
                options.get(CONF_SIZE, DEFAULT_SIZE),
                int(options.get(CONF_STEPS, DEFAULT_STEPS)),
            )
        except AgentError as exc:
            raise HomeAssistantError(f"edgeai agent: {exc}") from exc
        width, height = await self.hass.async_add_executor_job(_size_of, image.data)
        return ai_task.GenImageTaskResult(
            image_data=image.data,
            conversation_id=chat_log.conversation_id,
            mime_type="image/png",
            width=width,
            height=height,
            model=image.model,
            revised_prompt=image.revised_prompt,
        )


def _size_of(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size
