"""Several models, one resident, and LoRA styles: over MQTT, against the real pipelines (tiny).

One agent holds three families' worth of tiny models (SDXL, SD 2.x, SDXS-512 with its own tiny
decoder) and a folder of LoRA styles made with peft; requests name a model, the select of Home
Assistant changes the default, and styles come and go without a trace in the pictures.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import openai
import pytest

from tests.conftest import AgentProcess, generate
from tests.test_apis import call
from tests.tiny_pipeline import build_tiny_sd_pipeline, write_tiny_lora


@pytest.fixture(scope="module")
def shelf(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three tiny models of two families, and a LoRA folder: one per family, one broken."""
    root = tmp_path_factory.mktemp("shelf")
    sd = build_tiny_sd_pipeline(root / "sd")
    sdxs = build_tiny_sd_pipeline(root / "sdxs", tiny_decoder=True)
    loras = root / "loras"
    write_tiny_lora(tiny_model, loras / "style-xl.safetensors")
    write_tiny_lora(sd, loras / "style-sd.safetensors")
    (loras / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    return {"xl": tiny_model, "sd": sd, "sdxs": sdxs, "loras": loras}


@pytest.fixture(scope="module")
def models_agent(module_broker, shelf, tmp_path_factory) -> AgentProcess:
    models = {
        "xl": str(shelf["xl"]),
        "sd": {"source": str(shelf["sd"]), "steps": 2},
        # SDXS-512 decodes with its own tiny decoder: auto leaves it be.
        "sdxs": {"source": str(shelf["sdxs"]), "tiny_vae": "auto"},
        # SDXL-Lightning's way: a base model, its distillation LoRA always on, trailing steps.
        "xl-lightning": {
            "source": str(shelf["xl"]),
            "lora": str(shelf["loras"] / "style-xl.safetensors"),
            "steps": 2,
            "timestep_spacing": "trailing",
        },
    }
    env = {
        "EDGEAI_MODELS": json.dumps(models),
        "EDGEAI_LORA_DIR": str(shelf["loras"]),
        "EDGEAI_MAX_SIZE": "2048",
        "EDGEAI_MIN_SIZE": "64",
    }
    agent = AgentProcess(module_broker, shelf["xl"], tmp_path_factory.mktemp("models"), env)
    agent.start()
    yield agent
    agent.stop()


def picture(result: dict) -> bytes:
    assert result["status"] == "ok", result
    return base64.b64decode(result["image"]["b64"])


def draw(client, agent, **fields) -> dict:
    return generate(client, agent, output="both", seed=3, width=64, height=64, **fields)


def test_a_request_names_a_model_and_each_family_draws_with_its_own_defaults(
    models_agent, client, shelf
):
    results = {name: draw(client, models_agent, model=name) for name in ("sd", "sdxs", "xl")}
    for name, result in results.items():
        assert result["status"] == "ok", result
        assert result["model"] == str(shelf[name])
    assert len({picture(result) for result in results.values()}) == 3
    assert results["sd"]["steps"] == 2  # its entry's default
    assert results["xl"]["steps"] == 1  # the setting's
    log = models_agent.log()
    assert "switching model: xl -> sd" in log
    assert "model switched: sd -> sdxs in" in log
    assert "tiny decoder: the model's own decoder is tiny already" in log


def test_the_installed_models_and_loras_are_listed_retained(models_agent, client):
    client.subscribe(f"{models_agent.base}/models", f"{models_agent.base}/loras")
    models = client.wait_for(f"{models_agent.base}/models").json()
    assert [m["name"] for m in models["models"]] == ["xl", "sd", "sdxs", "xl-lightning"]
    assert {m["name"]: m["family"] for m in models["models"]} == {
        "xl": "sdxl",
        "sd": "sd",
        "sdxs": "sd",
        "xl-lightning": "sdxl",
    }
    loras = client.wait_for(f"{models_agent.base}/loras").json()
    assert {lora["name"] for lora in loras["loras"]} >= {"style-xl", "style-sd", "broken"}


def test_jobs_for_different_models_run_in_arrival_order(models_agent, client):
    order = ["sd", "xl", "sd"]
    ids = [f"order-{index}-{time.monotonic_ns()}" for index in range(len(order))]
    for job_id in ids:
        client.subscribe(f"{models_agent.base}/result/{job_id}")
    for job_id, name in zip(ids, order, strict=True):
        payload = {"prompt": "a cat", "id": job_id, "model": name, "width": 64, "height": 64}
        client.publish(f"{models_agent.base}/generate", json.dumps(payload))
    finished = []
    for job_id in ids:
        message = client.wait_for(f"{models_agent.base}/result/{job_id}", timeout=120)
        assert message.json()["status"] == "ok"
        finished.append(client.seen.index(message))
    assert finished == sorted(finished)


def test_a_model_that_is_not_installed_or_a_size_beyond_its_family_is_a_clear_error(
    models_agent, client
):
    unknown = generate(client, models_agent, model="sdxl-lightning")
    assert unknown["status"] == "error"
    assert unknown["error"]["code"] == "unknown_model"
    assert "installed: xl, sd, sdxs, xl-lightning" in unknown["error"]["message"]
    too_wide = generate(client, models_agent, model="sd", width=1536, height=512)
    assert too_wide["error"]["code"] == "out_of_range"
    assert "64..1024 for sd" in too_wide["error"]["message"]


def test_a_lora_changes_the_picture_and_its_removal_gives_back_the_same_bytes(models_agent, client):
    plain = picture(draw(client, models_agent, model="xl"))
    styled = picture(draw(client, models_agent, model="xl", loras=[{"name": "style-xl"}]))
    assert styled != plain
    assert picture(draw(client, models_agent, model="xl")) == plain
    again = draw(client, models_agent, model="xl", loras=[{"name": "style-xl", "weight": 1.0}])
    assert picture(again) == styled
    half = draw(client, models_agent, model="xl", loras=[{"name": "style-xl", "weight": 0.5}])
    assert picture(half) not in (plain, styled)
    sd_styled = draw(client, models_agent, model="sd", loras=[{"name": "style-sd"}])
    assert picture(sd_styled) != picture(draw(client, models_agent, model="sd"))


@pytest.mark.parametrize(
    ("loras", "code", "words"),
    [
        ([{"name": "no-such-style"}], "unknown_lora", "no LoRA 'no-such-style'"),
        ([{"name": "style-sd"}], "bad_lora", "text features are 32 wide; xl"),
        ([{"name": "broken"}], "bad_lora", "not a safetensors file"),
        ([{"name": "style-xl", "weight": 40.0}], "out_of_range", "weight 40.0"),
        ([{"name": f"s{index}"} for index in range(5)], "out_of_range", "at most 4"),
        ([{"name": "style-xl", "strength": 1}], "unknown_field", "strength"),
        ("style-xl", "invalid_request", "loras"),
    ],
)
def test_a_lora_that_cannot_be_applied_is_a_clear_error_and_the_agent_keeps_drawing(
    models_agent, client, loras, code, words
):
    refused = generate(client, models_agent, model="xl", loras=loras)
    assert refused["status"] == "error"
    assert refused["error"]["code"] == code
    assert words in refused["error"]["message"]
    assert draw(client, models_agent, model="xl")["status"] == "ok"


def test_a_lora_file_dropped_in_the_folder_is_listed_and_usable(models_agent, client, shelf):
    write_tiny_lora(shelf["xl"], shelf["loras"] / "dropped-in.safetensors", seed=9)
    client.subscribe(f"{models_agent.base}/loras")
    client.wait_for(
        f"{models_agent.base}/loras",
        lambda m: "dropped-in" in {lora["name"] for lora in m.json()["loras"]},
        timeout=10,  # the state interval is 2 s here
    )
    result = draw(client, models_agent, model="xl", loras=[{"name": "dropped-in"}])
    assert result["status"] == "ok"


def test_the_select_changes_the_model_of_the_next_request_that_names_none(
    models_agent, client, shelf
):
    base = models_agent.base
    client.subscribe(f"{base}/models", f"{base}/errors")
    try:
        client.publish(f"{base}/model/set", "sdxs")
        client.wait_for(f"{base}/models", lambda m: m.json()["default"] == "sdxs", timeout=10)
        # Loaded ahead while nothing waits.
        models_agent.wait_state("idle", timeout=60)
        assert draw(client, models_agent)["model"] == str(shelf["sdxs"])
        client.publish(f"{base}/model/set", "no-such-model")
        error = client.wait_for(f"{base}/errors", timeout=10).json()
        assert error["error"]["code"] == "unknown_model"
        assert draw(client, models_agent)["model"] == str(shelf["sdxs"])
    finally:
        client.publish(f"{base}/model/set", "xl")
        client.wait_for(f"{base}/models", lambda m: m.json()["default"] == "xl", timeout=10)


def test_the_openai_client_chooses_a_model_and_a_lora(models_agent):
    client = openai.OpenAI(base_url=f"{models_agent.url}/v1", api_key="-", max_retries=0)
    listed = client.models.list()
    assert [model.id for model in listed.data] == ["xl", "sd", "sdxs", "xl-lightning"]
    fields = {"seed": 3, "steps": 1}
    plain = client.images.generate(prompt="a cat", model="xl", size="64x64", extra_body=fields)
    styled = client.images.generate(
        prompt="a cat",
        model="xl",
        size="64x64",
        extra_body={**fields, "loras": [{"name": "style-xl", "weight": 1.0}]},
    )
    assert plain.data[0].b64_json != styled.data[0].b64_json
    # OpenAI's own model names mean the default; another name is an OpenAI error.
    default = client.images.generate(prompt="a cat", model="dall-e-3", size="64x64")
    assert default.data[0].b64_json
    with pytest.raises(openai.BadRequestError) as unknown:
        client.images.generate(prompt="a cat", model="sdxl-lightning", size="64x64")
    assert unknown.value.body["code"] == "unknown_model"
    assert unknown.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(
            prompt="a cat", model="xl", size="64x64", extra_body={"loras": [{"name": "nope"}]}
        )
    assert bad.value.body["code"] == "unknown_lora"


def test_an_automatic1111_client_chooses_a_checkpoint_and_a_lora(models_agent, client):
    status, listed = call(models_agent, "GET", "/sdapi/v1/sd-models")
    assert status == 200
    titles = {model["model_name"]: model["title"] for model in listed}
    assert list(titles) == ["xl", "sd", "sdxs", "xl-lightning"]
    status, loras = call(models_agent, "GET", "/sdapi/v1/loras")
    assert {"style-xl", "style-sd"} <= {lora["name"] for lora in loras}
    request = {"prompt": "a fox", "width": 64, "height": 64, "steps": 1, "seed": 5}
    over = {"override_settings": {"sd_model_checkpoint": titles["sd"]}}
    status, plain = call(models_agent, "POST", "/sdapi/v1/txt2img", {**request, **over})
    assert status == 200
    assert json.loads(plain["info"])["sd_model_name"] == "sd"
    styled_request = {**request, **over, "prompt": "a fox <lora:style-sd:1>"}
    status, styled = call(models_agent, "POST", "/sdapi/v1/txt2img", styled_request)
    assert status == 200
    assert json.loads(styled["info"])["prompt"] == "a fox"
    assert styled["images"] != plain["images"]
    # The options choose the default for the requests that follow.
    base = models_agent.base
    client.subscribe(f"{base}/models")
    try:
        status, chosen = call(
            models_agent, "POST", "/sdapi/v1/options", {"sd_model_checkpoint": titles["sd"]}
        )
        assert (status, chosen["sd_model_checkpoint"]) == (200, titles["sd"])
        status, options = call(models_agent, "GET", "/sdapi/v1/options")
        assert options["sd_model_checkpoint"] == titles["sd"]
        status, again = call(models_agent, "POST", "/sdapi/v1/txt2img", request)
        assert json.loads(again["info"])["sd_model_name"] == "sd"
        assert again["images"] == plain["images"]
    finally:
        call(models_agent, "POST", "/sdapi/v1/options", {"sd_model_checkpoint": "xl"})
        client.wait_for(f"{base}/models", lambda m: m.json()["default"] == "xl", timeout=10)


def test_a_distilled_model_is_its_base_with_its_lora_always_on(models_agent, client):
    lightning = draw(client, models_agent, model="xl-lightning")
    assert lightning["steps"] == 2  # its entry's default
    assert "base-lora" in models_agent.log()
    # A request's own style goes on top of it, and off again.
    styled = draw(
        client, models_agent, model="xl-lightning", loras=[{"name": "style-xl", "weight": 0.5}]
    )
    assert picture(styled) != picture(lightning)
    assert picture(draw(client, models_agent, model="xl-lightning")) == picture(lightning)
    by_hand = draw(client, models_agent, model="xl", steps=2, loras=[{"name": "style-xl"}])
    assert picture(lightning) == picture(by_hand)
    assert picture(lightning) != picture(draw(client, models_agent, model="xl", steps=2))


def test_the_sd_family_takes_the_prompt_cache_and_image_to_image(models_agent, client):
    before = models_agent.metric("edgeai_prompt_cache_hits_total") or 0.0
    first = draw(client, models_agent, model="sd", prompt="a quiet harbour at dawn")
    again = draw(client, models_agent, model="sd", prompt="a quiet harbour at dawn")
    assert picture(first) == picture(again)
    assert models_agent.metric("edgeai_prompt_cache_hits_total") == before + 1
    restyled = generate(
        client,
        models_agent,
        model="sd",
        init_image=base64.b64encode(picture(first)).decode("ascii"),
        strength=0.5,
        steps=2,
        seed=3,
    )
    assert restyled["status"] == "ok", restyled
    assert restyled["mode"] == "img2img"
    assert (restyled["width"], restyled["height"]) == (64, 64)
