"""The integration inside a real Home Assistant, against a real running agent."""

from __future__ import annotations

import asyncio
import os
import time
from urllib.parse import urlsplit

import aiohttp
import pytest
from custom_components.edgeai.const import CONF_SIZE, CONF_STEPS, CONF_TOKEN, CONF_URL, DOMAIN
from homeassistant import config_entries
from homeassistant.components import ai_task
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import entity_registry as er
from homeassistant.helpers.service_info.hassio import HassioServiceInfo
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


async def generate_image(hass, entity_id: str, task_name: str) -> dict:
    """``ai_task.generate_image`` as an automation calls it, with its answer."""
    return await hass.services.async_call(
        "ai_task",
        "generate_image",
        {"task_name": task_name, "entity_id": entity_id, "instructions": "a red apple"},
        blocking=True,
        return_response=True,
    )


async def test_generate_image_returns_the_agents_picture(hass):
    entity_id = await set_up(hass, size="320x256", steps=2)
    state = hass.states.get(entity_id)
    assert state.attributes["supported_features"] & ai_task.AITaskEntityFeature.GENERATE_IMAGE
    result = await generate_image(hass, entity_id, "apple")
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


def noise_png(width: int, height: int, seed: int) -> bytes:
    """A picture of noise, different for each seed (Pillow only: Home Assistant ships it)."""
    import io  # noqa: PLC0415
    import random  # noqa: PLC0415

    from PIL import Image  # noqa: PLC0415

    generator = random.Random(seed)
    picture = Image.frombytes(
        "RGB", (width, height), bytes(generator.randrange(256) for _ in range(width * height * 3))
    )
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


async def media_folder(hass, tmp_path, pictures: dict[str, bytes]) -> None:
    """Give Home Assistant a media folder holding these files, as a user's /media does."""
    from homeassistant.setup import async_setup_component  # noqa: PLC0415

    for name, data in pictures.items():
        (tmp_path / name).write_bytes(data)
    hass.config.media_dirs = {"local": str(tmp_path)}
    assert await async_setup_component(hass, "media_source", {})


async def test_an_attached_picture_is_restyled(hass, tmp_path):
    """ai_task.generate_image with a PNG from the media folder, resolved by Home Assistant."""
    await media_folder(
        hass, tmp_path, {"door.png": noise_png(384, 256, 1), "other.png": noise_png(384, 256, 2)}
    )
    entity_id = await set_up(hass, size="512x512", steps=2)
    state = hass.states.get(entity_id)
    assert state.attributes["supported_features"] & ai_task.AITaskEntityFeature.SUPPORT_ATTACHMENTS

    async def restyle(name: str) -> dict:
        return await hass.services.async_call(
            "ai_task",
            "generate_image",
            {
                "task_name": "watercolour",
                "entity_id": entity_id,
                "instructions": "turn it into a watercolour",
                "attachments": [
                    {
                        "media_content_id": f"media-source://media_source/local/{name}",
                        "media_content_type": "image/png",
                    }
                ],
            },
            blocking=True,
            return_response=True,
        )

    door, other = await restyle("door.png"), await restyle("other.png")
    print("restyled:", {key: value for key, value in door.items() if key != "url"})
    # The picture's own size, not the entity's 512x512; and a different picture, a different
    # result (the agent's seed is random each time, so only their sizes are compared here:
    # identical bytes for identical pictures and seeds are tested on the agent's side).
    assert (door["width"], door["height"]) == (384, 256)
    assert (other["width"], other["height"]) == (384, 256)
    assert door["mime_type"] == "image/png"
    assert door["media_source_id"].startswith("media-source://ai_task/")
    # The agent's gallery: both were image-to-image jobs, each with the picture it started from.
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{URL}/api/images", headers={"Authorization": f"Bearer {TOKEN}"}) as answer,
    ):
        newest = (await answer.json())["images"][:2]
    assert [image["mode"] for image in newest] == ["img2img", "img2img"]
    assert all("source_url" in image for image in newest)


async def test_an_attachment_that_is_not_a_picture_is_a_home_assistant_error(hass, tmp_path):
    await media_folder(hass, tmp_path, {"notes.txt": b"not a picture"})
    entity_id = await set_up(hass)
    with pytest.raises(HomeAssistantError) as refused:
        await ai_task.async_generate_image(
            hass,
            task_name="notes",
            entity_id=entity_id,
            instructions="a watercolour",
            attachments=[
                {
                    "media_content_id": "media-source://media_source/local/notes.txt",
                    "media_content_type": "text/plain",
                }
            ],
        )
    print("not a picture:", refused.value)
    assert "not a picture" in str(refused.value)


def announced(token: str = TOKEN, name: str = "edgeai-agent") -> HassioServiceInfo:
    """What Home Assistant's hassio integration hands the flow for the app's discovery message
    (homeassistant/components/hassio/discovery.py): the app's config, its name and slug."""
    address = urlsplit(URL)
    return HassioServiceInfo(
        config={
            "host": address.hostname,
            "port": address.port,
            "token": token,
            "node_id": "pi5",
            "addon": name,
        },
        name=name,
        slug="local_edgeai_agent",
        uuid="0123456789abcdef0123456789abcdef",
    )


async def test_the_apps_announcement_sets_up_the_agent_with_nothing_to_type(hass):
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": config_entries.SOURCE_HASSIO}, data=announced()
    )
    print("hassio discovery:", result["type"], result.get("step_id"))
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "hassio_confirm"
    assert result["description_placeholders"]["url"] == URL
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"][CONF_URL] == URL
    assert result["data"][CONF_TOKEN] == TOKEN
    entry = result["result"]
    assert entry.unique_id == "local_edgeai_agent"
    await hass.async_block_till_done()
    entity_id = er.async_get(hass).async_get_entity_id("ai_task", DOMAIN, entry.entry_id)
    assert entity_id is not None
    generated = await generate_image(hass, entity_id, "discovered")
    print("discovered agent, generate_image:", generated["mime_type"], generated["width"])
    assert generated["mime_type"] == "image/png"

    # The app started again with another token: the entry takes it, no second offer.
    again = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": config_entries.SOURCE_HASSIO}, data=announced("new-token")
    )
    assert again["type"] is FlowResultType.ABORT
    assert again["reason"] == "already_configured"
    assert hass.config_entries.async_get_entry(entry.entry_id).data[CONF_TOKEN] == "new-token"


async def test_an_announced_token_the_agent_refuses_is_said_at_the_confirmation(hass):
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": config_entries.SOURCE_HASSIO}, data=announced("wrong")
    )
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {})
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "invalid_auth"}


MQTT_PORT = int(os.environ["EDGEAI_MQTT_PORT"])
MQTT_PASSWORD = os.environ["EDGEAI_MQTT_PASSWORD"]
NODE_ID = os.environ["EDGEAI_NODE_ID"]


async def wait_for_state(hass, entity_id: str, wanted: str):
    """Return the entity's state once it is ``wanted`` (30 s at most)."""
    try:
        async with asyncio.timeout(30):
            while True:
                state = hass.states.get(entity_id)
                if state is not None and state.state == wanted:
                    return state
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"{entity_id} is {hass.states.get(entity_id)}, not {wanted}") from None


async def test_the_model_select_changes_the_model_of_the_next_picture(hass, tmp_path):
    # Home Assistant's own MQTT integration on the agent's broker, discovery on (it reads
    # configuration.yaml for MQTT entities: an empty one, as a fresh install has).
    hass.config.config_dir = str(tmp_path)
    (tmp_path / "configuration.yaml").write_text("")
    mqtt_entry = MockConfigEntry(
        domain="mqtt",
        data={
            "broker": "127.0.0.1",
            "port": MQTT_PORT,
            "username": "edgeai-client",
            "password": MQTT_PASSWORD,
            "discovery": True,
        },
    )
    mqtt_entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(mqtt_entry.entry_id)
    select_id = f"select.edgeai_{NODE_ID.replace('-', '_')}_model"
    try:
        state = await wait_for_state(hass, select_id, "tiny-xl")
        assert state.attributes["options"] == ["tiny-xl", "tiny-sd"]
        entity_id = await set_up(hass)
        first = await generate_image(hass, entity_id, "before")
        assert first["model"] == "tiny-xl"
        await hass.services.async_call(
            "select", "select_option", {"entity_id": select_id, "option": "tiny-sd"}, blocking=True
        )
        await wait_for_state(hass, select_id, "tiny-sd")  # the agent's retained answer
        switched = await generate_image(hass, entity_id, "after")
        assert switched["model"] == "tiny-sd"
        await hass.services.async_call(
            "select", "select_option", {"entity_id": select_id, "option": "tiny-xl"}, blocking=True
        )
        await wait_for_state(hass, select_id, "tiny-xl")
    finally:
        assert await hass.config_entries.async_unload(mqtt_entry.entry_id)
        await hass.async_block_till_done()


async def test_the_ai_task_entity_may_ask_for_an_installed_model(hass):
    entity_id = await set_up(hass, image_model="tiny-sd")
    result = await generate_image(hass, entity_id, "chosen")
    assert result["model"] == "tiny-sd"
