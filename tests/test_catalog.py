"""Model families, the catalog's defaults and names, AUTOMATIC1111's names: no agent running."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent.jobs.errors import RequestError
from agent.jobs.model_choice import ModelChoice
from agent.jobs.switching import ModelSwitcher
from agent.model.catalog import Catalog, short_name
from agent.model.family import Family, ModelConfigError, choose_tiny_decoder, read_family
from agent.model.link import WorkerUnavailableError
from agent.settings import Settings
from agent.web.a1111_models import checkpoint_name, prompt_loras
from tests.tiny_pipeline import build_tiny_sd_pipeline

SDXL = Family("sdxl", "StableDiffusionXLPipeline", 512, own_tiny_decoder=False)
SD = Family("sd", "StableDiffusionPipeline", 512, own_tiny_decoder=False)
SDXS = Family("sd", "StableDiffusionPipeline", 512, own_tiny_decoder=True)


@pytest.fixture(scope="module")
def sd_model(tmp_path_factory) -> Path:
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("sd"))


def test_the_family_is_read_from_the_models_own_config_files(tiny_model, sd_model):
    assert read_family(str(tiny_model)) == Family(
        "sdxl", "StableDiffusionXLPipeline", 512, own_tiny_decoder=False, cross_attention_dim=64
    )
    assert read_family(str(sd_model)).name == "sd"
    assert read_family(str(sd_model)).cross_attention_dim == 32


def test_a_pipeline_the_agent_does_not_run_is_named_with_what_it_runs(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelConfigError, match="is a FluxPipeline: the agent runs Stable"):
        read_family(str(tmp_path))
    with pytest.raises(ModelConfigError, match=r"cannot read model_index\.json"):
        read_family(str(tmp_path / "nothing-here"))


@pytest.mark.parametrize(
    ("setting", "family", "chosen", "said"),
    [
        ("auto", SDXL, "madebyollin/taesdxl", None),
        ("auto", SD, "madebyollin/taesd", None),
        ("auto", SDXS, "", "the model's own decoder is tiny already"),
        ("", SDXL, "", None),
        ("madebyollin/taesdxl", SD, "madebyollin/taesd", "decodes SDXL latents, not Stable"),
        ("madebyollin/taesd", SDXL, "madebyollin/taesdxl", "decodes Stable Diffusion 1.x/2.x"),
        ("/share/my-taesd", SD, "/share/my-taesd", None),
    ],
)
def test_the_tiny_decoder_matches_the_family(setting, family, chosen, said):
    decoder, note = choose_tiny_decoder(setting, family)
    assert decoder == chosen
    assert (note is None) == (said is None)
    if said:
        assert said in note


def settings(tmp_path: Path, **values) -> Settings:
    return Settings(state_dir=tmp_path, **values)


def test_each_model_draws_its_native_size_unless_the_settings_say_otherwise(tmp_path):
    catalog = Catalog(settings(tmp_path, models={"big": "x/lightning", "small": "x/sd-turbo"}))
    catalog._models["big"] = catalog._models["big"].__class__(
        "big", catalog._models["big"].entry, Family("sdxl", "S", 1024, own_tiny_decoder=False)
    )
    assert catalog.default_size(catalog.get("big")) == (1024, 1024)
    assert catalog.default_size(catalog.get("small")) == (512, 512)  # not read: the setting's
    fixed = Catalog(settings(tmp_path, models={"big": "x/lightning"}, default_width=768))
    fixed._models["big"] = catalog._models["big"]
    assert fixed.default_size(fixed.get("big")) == (768, 512)


def test_the_model_setting_may_name_an_entry_or_a_source(tmp_path):
    named = Catalog(settings(tmp_path, model="fast", models={"fast": "stabilityai/sd-turbo"}))
    assert named.names == ["fast"]
    by_source = Catalog(settings(tmp_path, models={"turbo": "stabilityai/sdxl-turbo"}))
    assert by_source.names == ["turbo"]
    added = Catalog(settings(tmp_path, models={"fast": "stabilityai/sd-turbo"}))
    assert added.names == ["sdxl-turbo", "fast"]
    assert short_name("/share/models/my model/") == "my-model"
    with pytest.raises(ValueError, match="is not a name"):
        Catalog(settings(tmp_path, models={"../x": "y"}))


def test_a_chosen_default_outlives_a_restart_until_the_model_setting_changes(tmp_path):
    values = {"models": {"fast": "stabilityai/sd-turbo"}}
    first = Catalog(settings(tmp_path, **values))
    assert first.choose("stabilityai/sd-turbo").name == "fast"
    assert first.choose("no-such-model") is None
    assert Catalog(settings(tmp_path, **values)).default == "fast"
    moved = Catalog(settings(tmp_path, model="x/other", **values))
    assert moved.default == "other"
    # Another model's integer weights go to a folder of its own; the configured one's stay.
    assert first.pipeline_options("fast").weights_dir == str(tmp_path / "weights/models/fast")
    assert first.pipeline_options("sdxl-turbo").weights_dir == str(tmp_path / "weights")


def test_an_unknown_model_names_the_installed_ones(tmp_path):
    choice = ModelChoice.of(settings(tmp_path, models={"fast": "stabilityai/sd-turbo"}))
    with pytest.raises(RequestError, match="installed: sdxl-turbo, fast") as raised:
        choice.model("dall-e-3")
    assert raised.value.code.value == "unknown_model"


def test_automatic1111s_names_become_the_requests_fields():
    assert checkpoint_name("sd-turbo [0123456789]") == "sd-turbo"
    assert checkpoint_name("sd-turbo.safetensors") == "sd-turbo"
    prompt, loras = prompt_loras("a cat <lora:pixel-art:0.8> in snow <lora:ink> <lora:x:nan?>")
    assert prompt == "a cat in snow"
    assert loras == [
        {"name": "pixel-art", "weight": 0.8},
        {"name": "ink", "weight": 1.0},
        {"name": "x", "weight": "nan?"},
    ]


def test_a_job_for_a_model_no_longer_installed_is_refused_not_run_on_another(tmp_path):
    """A job journaled before a restart whose settings dropped its model: never drawn by the
    resident one. Nothing is loaded or stopped, so the worker is only asked its model's name."""
    catalog = Catalog(settings(tmp_path, models={"fast": "stabilityai/sd-turbo"}))
    resident = SimpleNamespace(model_name="sdxl-turbo")
    switcher = ModelSwitcher(resident, catalog, None, None)  # type: ignore[arg-type]
    asyncio.run(switcher.ensure("sdxl-turbo"))  # resident: nothing to do
    with pytest.raises(WorkerUnavailableError, match="the model gone is no longer installed"):
        asyncio.run(switcher.ensure("gone"))
