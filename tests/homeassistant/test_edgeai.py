"""The integration inside a real Home Assistant, against a real running agent."""

from __future__ import annotations

import os
import time

import aiohttp
import pytest
from custom_components.edgeai.const import CONF_SIZE, CONF_STEPS, CONF_TOKEN, CONF_URL, DOMAIN
from homeassistant import config_entries
from homeassistant.components import ai_task
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import entity_registry as er
from pytest_homeassistant_custom_component.common import MockConfigEntry

URL = os.environ["EDGEAI_AGENT_URL"]
TOKEN = os.environ["EDGEAI_AGENT_TOKEN"]


async def start_flow(hass, url: str, token: str):
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": config_entries.SOURCE_USER}
    )
    assert result["type"] is FlowResultType.FORM
    return await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_URL: url, CONF_TOKEN: token}
    )


async def test_the_config_flow_checks_the_agent_and_creates_the_entry(hass):
    result = await start_flow(hass, URL, TOKEN)
    print("config flow:", result["type"], result.get("title"), result.get("data", {}).get("model"))
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["title"] == "edgeai 127.0.0.1"
    assert result["data"][CONF_URL] == URL
    assert result["data"]["model"]


async def test_the_config_flow_says_when_the_agent_cannot_be_reached(hass):
    result = await start_flow(hass, "http://127.0.0.1:9", TOKEN)
    print("config flow, unreachable:", result["type"], result["errors"])
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "cannot_connect"}


async def test_the_config_flow_says_when_the_token_is_wrong(hass):
    result = await start_flow(hass, URL, "not-the-token")
    print("config flow, wrong token:", result["type"], result["errors"])
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "invalid_auth"}


async def set_up(hass, **options) -> str:
    entry = MockConfigEntry(
        domain=DOMAIN,
        title="edgeai 127.0.0.1",
        data={CONF_URL: URL, CONF_TOKEN: TOKEN, "model": "tiny"},
        options={CONF_SIZE: "512x512", CONF_STEPS: 1, **options},
    )
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    entity_id = er.async_get(hass).async_get_entity_id("ai_task", DOMAIN, entry.entry_id)
    assert entity_id is not None
    return entity_id


async def test_generate_image_returns_the_agents_picture(hass):
    entity_id = await set_up(hass, size="320x256", steps=2)
    state = hass.states.get(entity_id)
    assert state.attributes["supported_features"] & ai_task.AITaskEntityFeature.GENERATE_IMAGE
    result = await hass.services.async_call(
        "ai_task",
        "generate_image",
        {"task_name": "apple", "entity_id": entity_id, "instructions": "a red apple"},
        blocking=True,
        return_response=True,
    )
    print("generate_image:", {key: value for key, value in result.items() if key != "url"})
    assert result["mime_type"] == "image/png"
    assert (result["width"], result["height"]) == (320, 256)
    assert result["model"]
    assert result["revised_prompt"] == "a red apple"
    assert result["media_source_id"].startswith("media-source://ai_task/")


async def test_a_size_the_agent_refuses_is_a_home_assistant_error(hass):
    entity_id = await set_up(hass, size="512x513")
    with pytest.raises(HomeAssistantError) as refused:
        await ai_task.async_generate_image(
            hass, task_name="bad", entity_id=entity_id, instructions="a red apple"
        )
    print("bad size:", refused.value)
    assert "height 513 is not a multiple of 8" in str(refused.value)


async def test_a_busy_agent_is_a_home_assistant_error(hass):
    entity_id = await set_up(hass)
    slow = {"prompt": "slow", "steps": 50, "width": 1024, "height": 1024}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as session:
        slow_ids = [f"ha-busy-{time.monotonic_ns()}-{index}" for index in range(3)]
        for job_id in slow_ids:  # one runs, two wait: the agent's queue (2) is full
            job = {**slow, "id": job_id}
            async with session.post(f"{URL}/api/jobs", json=job, headers=headers) as answer:
                assert answer.status == 202
        with pytest.raises(HomeAssistantError) as busy:
            await ai_task.async_generate_image(
                hass, task_name="busy", entity_id=entity_id, instructions="a red apple"
            )
        for job_id in slow_ids:  # leave the agent free for whoever comes next
            async with session.post(f"{URL}/api/jobs/{job_id}/cancel", headers=headers):
                pass
    print("busy:", busy.value)
    assert "queue is full" in str(busy.value)
