"""The AI Task entity: ``ai_task.generate_image`` answered by the agent.

With an attached picture (a camera snapshot, an image entity, a file from the media folder,
resolved to a file by Home Assistant) the instructions restyle it: the first picture attached is
the one the agent starts from; further attachments are ignored, with a warning in the log.
"""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING

from homeassistant.components import ai_task, conversation
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers.device_registry import DeviceInfo
from PIL import Image

from .client import AgentError
from .const import (
    CONF_IMAGE_MODEL,
    CONF_MODEL,
    CONF_SIZE,
    CONF_STEPS,
    DEFAULT_SIZE,
    DEFAULT_STEPS,
    DOMAIN,
)

if TYPE_CHECKING:
    from pathlib import Path

    from homeassistant.core import HomeAssistant
    from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

    from . import EdgeAIConfigEntry
    from .client import GeneratedImage

_LOGGER = logging.getLogger(__name__)


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
    _attr_supported_features = (
        ai_task.AITaskEntityFeature.GENERATE_IMAGE | ai_task.AITaskEntityFeature.SUPPORT_ATTACHMENTS
    )

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
        try:
            image = await self._generate(task)
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

    async def _generate(self, task: ai_task.GenImageTask) -> GeneratedImage:
        """Generate from the instructions alone, or restyle the first attached picture."""
        options = self._entry.options
        steps = int(options.get(CONF_STEPS, DEFAULT_STEPS))
        model = options.get(CONF_IMAGE_MODEL) or None
        client = self._entry.runtime_data
        attachments = task.attachments or []
        if not attachments:
            return await client.generate(
                task.instructions, options.get(CONF_SIZE, DEFAULT_SIZE), steps, model
            )
        first = attachments[0]
        if not first.mime_type.startswith("image/"):
            raise HomeAssistantError(
                f"edgeai agent: {first.media_content_id} is {first.mime_type}, not a picture"
            )
        if len(attachments) > 1:
            _LOGGER.warning(
                "%s: %d attachments; the agent restyles the first, %s",
                self.entity_id,
                len(attachments),
                first.media_content_id,
            )
        picture = await self.hass.async_add_executor_job(_read, first.path)
        return await client.edit(
            task.instructions, picture, first.path.name, first.mime_type, steps, model=model
        )


def _read(path: Path) -> bytes:
    return path.read_bytes()


def _size_of(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size
