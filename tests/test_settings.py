"""Settings: environment, TOML file, password file, --help, and a clear stop on a wrong value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.model.protocol import PipelineOptions
from agent.settings import Settings, SettingsError, load_settings


@pytest.fixture
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("EDGEAI_"):
            monkeypatch.delenv(key)
    return monkeypatch


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("EDGEAI_")}
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_defaults_follow_sdxl_turbo(clean_env):
    settings = load_settings()
    assert settings.model == "stabilityai/sdxl-turbo"
    assert (settings.default_width, settings.default_height) == (512, 512)
    assert settings.default_steps == 1
    assert settings.default_guidance_scale == 0.0
    assert settings.base_topic == f"edgeai/{settings.node_id}"


def test_toml_file_and_environment_override(clean_env, tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text('node_id = "garage"\nmax_queue = 3\nmodel = "/models/sdxl-turbo"\n')
    clean_env.setenv("EDGEAI_MAX_QUEUE", "5")
    settings = load_settings(config)
    assert settings.node_id == "garage"
    assert settings.model == "/models/sdxl-turbo"
    assert settings.max_queue == 5  # the environment wins over the file


def test_password_from_a_file(clean_env, tmp_path):
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    clean_env.setenv("EDGEAI_MQTT_PASSWORD_FILE", str(secret))
    assert load_settings().password() == "s3cret"


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("EDGEAI_MQTT_PORT", "70000", "mqtt_port (EDGEAI_MQTT_PORT)"),
        ("EDGEAI_DEFAULT_WIDTH", "500", "multiple of 8"),
        ("EDGEAI_DEVICE", "tpu", "device (EDGEAI_DEVICE)"),
        ("EDGEAI_NODE_ID", "Bad Name!", "node_id (EDGEAI_NODE_ID)"),
        ("EDGEAI_MAX_QUEEU", "3", "EDGEAI_MAX_QUEEU"),
        (
            "EDGEAI_WARMUP_AT_DEFAULT_SIZE",
            "sometimes",
            "warmup_at_default_size (EDGEAI_WARMUP_AT_DEFAULT_SIZE)",
        ),
    ],
)
def test_a_wrong_setting_is_named(clean_env, variable, value, named):
    clean_env.setenv(variable, value)
    with pytest.raises(SettingsError, match=named.replace("(", r"\(").replace(")", r"\)")):
        load_settings()


def test_the_worker_warms_up_at_the_default_size_the_environment_sets(clean_env):
    clean_env.setenv("EDGEAI_DEFAULT_WIDTH", "640")
    clean_env.setenv("EDGEAI_DEFAULT_HEIGHT", "384")
    clean_env.setenv("EDGEAI_WARMUP_AT_DEFAULT_SIZE", "on")
    options = PipelineOptions.from_settings(load_settings())
    assert options.default_size == (640, 384)
    assert options.warmup_at_default_size == "on"


def test_unknown_key_in_the_file_is_refused(clean_env, tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text("colour = 'red'\n")
    with pytest.raises(SettingsError, match="colour"):
        load_settings(config)


def test_help_lists_every_setting():
    completed = run_cli("--help")
    assert completed.returncode == 0
    for name in Settings.model_fields:
        assert f"EDGEAI_{name.upper()}" in completed.stdout


def test_the_command_stops_on_a_wrong_setting_with_its_name():
    completed = run_cli(env={"EDGEAI_MQTT_PORT": "not-a-port"})
    assert completed.returncode == 2
    assert "EDGEAI_MQTT_PORT" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_a_missing_password_file_stops_the_start(tmp_path):
    completed = run_cli(env={"EDGEAI_MQTT_PASSWORD_FILE": str(tmp_path / "missing")})
    assert completed.returncode == 2
    assert "mqtt_password_file" in completed.stderr


def test_the_console_script_is_installed():
    script = Path(sys.executable).parent / "edgeai-agent"
    completed = subprocess.run([script, "--version"], capture_output=True, text=True, check=False)
    assert completed.returncode == 0
    assert "edgeai-agent" in completed.stdout


def test_an_earlier_release_s_setting_names_what_replaced_it(clean_env):
    clean_env.setenv("EDGEAI_INT8_WEIGHTS", "true")
    with pytest.raises(SettingsError, match=r"EDGEAI_INT8_WEIGHTS \(now EDGEAI_WEIGHT_FORM=int8\)"):
        load_settings()


def test_the_weights_form_and_its_folder_reach_the_worker(clean_env, tmp_path):
    clean_env.setenv("EDGEAI_STATE_DIR", str(tmp_path))
    assert PipelineOptions.from_settings(load_settings()).weight_form == "auto"
    clean_env.setenv("EDGEAI_WEIGHT_FORM", "int4")
    options = PipelineOptions.from_settings(load_settings())
    assert (options.weight_form, options.weights_dir) == ("int4", str(tmp_path / "weights"))
    clean_env.setenv("EDGEAI_WEIGHT_FORM", "int3")
    with pytest.raises(SettingsError, match="EDGEAI_WEIGHT_FORM"):
        load_settings()
