"""Running as a Home Assistant app: options and the Supervisor's broker become settings, and
the agent announces itself to Home Assistant through the Supervisor.

The whole app is tested in its image by scripts/test-containers (tests/containers/test_app.py);
these check the mapping against a real HTTP stand-in of the Supervisor's API, and a real agent
started as the Supervisor starts an app (its options in /data, the Supervisor at
http://supervisor) in a private mount namespace.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from agent.home_assistant_app import (
    FIXED,
    INGRESS_GATEWAY,
    SHUTDOWN_GRACE_S,
    STOP_TIMEOUT_S,
    prepare_app_environment,
)
from agent.settings import Settings, SettingsError, load_settings
from agent.supervisor import DISCOVERY_SERVICE
from tests.conftest import ROOT, generate
from tests.supervisor import DISCOVERY_SERVICES, SUPERVISOR_TOKEN, SupervisorStandIn

BROKER = {
    "host": "core-mosquitto",
    "port": 1883,
    "ssl": False,
    "protocol": "3.1.1",
    "username": "addons",
    "password": "s3cret",
    "addon": "core_mosquitto",
}
CONFIG = yaml.safe_load((ROOT / "config.yaml").read_text())


@pytest.fixture
def supervisor():
    stand_in = SupervisorStandIn(BROKER)
    yield stand_in
    stand_in.stop()


def write_options(tmp_path, **options):
    path = tmp_path / "options.json"
    path.write_text(json.dumps(options))
    return path


def test_outside_an_app_nothing_changes(tmp_path, supervisor):
    environ = {"PATH": "/bin"}
    options = write_options(tmp_path, model="x")
    assert prepare_app_environment(environ, options, supervisor.url) is None
    assert environ == {"PATH": "/bin"}
    assert supervisor.calls == []


def test_options_and_the_supervisors_broker_become_valid_settings(
    tmp_path, supervisor, monkeypatch
):
    options = write_options(
        tmp_path,
        model="/share/sdxl-turbo",
        tiny_vae="",
        default_width=768,
        default_steps=2,
        api_token="",
        node_id="kitchen",
    )
    environ = {"SUPERVISOR_TOKEN": SUPERVISOR_TOKEN, "EDGEAI_HTTP_PORT": "9000"}
    found = prepare_app_environment(environ, options, supervisor.url)
    assert found is not None
    assert found.line == "running as a Home Assistant app; the MQTT broker from the Supervisor"
    asked = [(call.path, call.authorization) for call in supervisor.calls]
    assert asked == [("/services/mqtt", f"Bearer {SUPERVISOR_TOKEN}")]
    assert environ["EDGEAI_STATE_DIR"] == "/data"
    assert environ["EDGEAI_INGRESS_PEER"] == INGRESS_GATEWAY
    assert environ["EDGEAI_MODEL"] == "/share/sdxl-turbo"
    assert environ["EDGEAI_MQTT_HOST"] == "core-mosquitto"
    assert environ["EDGEAI_MQTT_PASSWORD"] == "s3cret"
    assert "EDGEAI_API_TOKEN" not in environ  # empty: the agent makes one, never "no token"
    assert environ["EDGEAI_TINY_VAE"] == ""  # emptied: the model's own VAE, as the option says
    assert environ["EDGEAI_HTTP_PORT"] == "9000"  # what the environment says wins
    for name in list(os.environ):
        if name.startswith("EDGEAI_"):
            monkeypatch.delenv(name)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()  # every variable is a setting the agent knows, and valid
    assert (settings.default_width, settings.default_steps, settings.node_id) == (768, 2, "kitchen")
    assert str(settings.ingress_peer) == INGRESS_GATEWAY
    assert settings.tiny_vae == ""
    assert settings.shutdown_grace_s == SHUTDOWN_GRACE_S


def test_a_broker_in_the_options_is_used_without_asking(tmp_path, supervisor):
    options = write_options(tmp_path, model="m", mqtt_host="10.0.0.5", mqtt_port=1884)
    environ = {"SUPERVISOR_TOKEN": SUPERVISOR_TOKEN}
    found = prepare_app_environment(environ, options, supervisor.url)
    assert found is not None
    assert "from its options" in found.line
    assert supervisor.calls == []
    assert (environ["EDGEAI_MQTT_HOST"], environ["EDGEAI_MQTT_PORT"]) == ("10.0.0.5", "1884")


def test_a_supervisor_that_refuses_stops_the_start_with_its_reason(tmp_path, supervisor):
    with pytest.raises(SettingsError, match="services API answered 401"):
        prepare_app_environment(
            {"SUPERVISOR_TOKEN": "wrong"}, write_options(tmp_path, model="m"), supervisor.url
        )


def test_without_the_mosquitto_app_the_start_goes_on_and_says_where_to_look(tmp_path):
    """``mqtt:want``: no broker handed out is not an error; the log says what to do."""
    stand_in = SupervisorStandIn(None)
    try:
        environ = {"SUPERVISOR_TOKEN": SUPERVISOR_TOKEN}
        found = prepare_app_environment(environ, write_options(tmp_path, model="m"), stand_in.url)
    finally:
        stand_in.stop()
    assert found is not None
    assert found.line.endswith("nowhere: install the Mosquitto app or set mqtt_host")
    assert "EDGEAI_MQTT_HOST" not in environ


def test_unreadable_options_are_a_clear_error(tmp_path, supervisor):
    broken = tmp_path / "options.json"
    broken.write_text("{not json")
    with pytest.raises(SettingsError, match="cannot read the app's options"):
        prepare_app_environment({"SUPERVISOR_TOKEN": SUPERVISOR_TOKEN}, broken, supervisor.url)


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("api_token", False, "text"),
        ("api_token", 12345, "text"),
        ("mqtt_password", True, "text"),
        ("default_steps", "2", "a whole number"),
        ("mqtt_port", True, "a whole number"),
    ],
)
def test_an_option_of_the_wrong_kind_stops_the_start_and_is_named(
    tmp_path, supervisor, option, value, expected
):
    """``api_token: false`` in the app's YAML must not become the token "False"."""
    options = write_options(tmp_path, model="m", mqtt_host="10.0.0.5", **{option: value})
    environ = {"SUPERVISOR_TOKEN": SUPERVISOR_TOKEN}
    with pytest.raises(SettingsError, match=f"the app option {option} must be {expected}"):
        prepare_app_environment(environ, options, supervisor.url)
    assert "EDGEAI_API_TOKEN" not in environ


@pytest.mark.parametrize(
    ("given", "expected"),
    [({}, ""), ({"tiny_vae": ""}, ""), ({"tiny_vae": "/share/taesdxl"}, "/share/taesdxl")],
)
def test_an_empty_decoder_option_means_the_models_own_vae(tmp_path, supervisor, given, expected):
    """The option's default names the tiny decoder; emptying it is how an app user picks the
    model's own VAE (slower, the model's own colours), as the option's description says."""
    environ = {"SUPERVISOR_TOKEN": SUPERVISOR_TOKEN}
    options = write_options(tmp_path, model="m", mqtt_host="10.0.0.5", **given)
    prepare_app_environment(environ, options, supervisor.url)
    assert environ["EDGEAI_TINY_VAE"] == expected
    assert CONFIG["options"]["tiny_vae"] == "auto"  # each model's own family's decoder


def test_the_installed_models_option_becomes_the_models_setting(tmp_path, supervisor):
    environ = {"SUPERVISOR_TOKEN": SUPERVISOR_TOKEN}
    lines = ["sd-turbo=stabilityai/sd-turbo", "local=/share/models/sdxs-512"]
    options = write_options(tmp_path, model="sd-turbo", mqtt_host="10.0.0.5", models=lines)
    prepare_app_environment(environ, options, supervisor.url)
    assert json.loads(environ["EDGEAI_MODELS"]) == {
        "sd-turbo": "stabilityai/sd-turbo",
        "local": "/share/models/sdxs-512",
    }
    assert environ["EDGEAI_LORA_DIR"] == "/share/edgeai/loras"
    settings = Settings(models=json.loads(environ["EDGEAI_MODELS"]))
    assert settings.models["local"].source == "/share/models/sdxs-512"
    broken = write_options(tmp_path, model="m", mqtt_host="10.0.0.5", models=["no equals sign"])
    with pytest.raises(SettingsError, match="lines of name=source"):
        prepare_app_environment({"SUPERVISOR_TOKEN": SUPERVISOR_TOKEN}, broken, supervisor.url)


def test_a_stop_gives_the_running_picture_its_grace_before_the_supervisor_kills():
    """The Supervisor stops an app with ``docker stop -t <timeout>``; the agent's grace ends
    early enough to requeue what still runs and exit 0 (the container suite stops a real app)."""
    assert CONFIG["timeout"] == STOP_TIMEOUT_S <= 300  # the Supervisor's own bound
    assert FIXED["EDGEAI_SHUTDOWN_GRACE_S"] == str(SHUTDOWN_GRACE_S)
    assert STOP_TIMEOUT_S - SHUTDOWN_GRACE_S >= 15


def test_the_app_follows_the_stores_rules():
    """What the Supervisor reads besides the options (the validator's run is in the container
    suite, where the Supervisor's source is given)."""
    manifest = json.loads(
        (ROOT / "deploy/homeassistant/custom_components/edgeai/manifest.json").read_text()
    )
    assert CONFIG["discovery"] == [DISCOVERY_SERVICE] == list(DISCOVERY_SERVICES)
    assert manifest["domain"] == DISCOVERY_SERVICE  # Home Assistant starts that domain's flow
    assert CONFIG["services"] == ["mqtt:want"]  # a broker of one's own is an option
    assert CONFIG["map"] == [
        {"type": "share", "read_only": True},
        {"type": "media", "read_only": True},
    ]
    assert CONFIG["watchdog"] == f"tcp://[HOST]:[PORT:{CONFIG['ingress_port']}]"
    assert CONFIG["url"].startswith("https://")
    assert CONFIG["ulimits"]["nofile"]["soft"] >= 65536
    assert not (ROOT / "build.yaml").exists()  # deprecated: the Dockerfile's BUILD_FROM serves
    assert "ARG BUILD_FROM=debian:" in (ROOT / "Dockerfile").read_text()
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {CONFIG['version']}" in changelog
    # The store shows README.md as the app's long description, where a relative link is dead.
    readme = (ROOT / "README.md").read_text()
    assert "](docs/" not in readme
    assert "](http" in readme


def test_backups_leave_out_exactly_the_model_and_what_is_made_from_it(tmp_path, monkeypatch):
    """backup_exclude names the model cache, the weight forms and the live journal; not the
    journal's copy, the token, the options or the pictures. The Supervisor's rule over a real
    layout is in tests/test_app_backups.py."""
    for name in list(os.environ):
        if name.startswith("EDGEAI_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("EDGEAI_STATE_DIR", str(tmp_path))
    settings = load_settings()
    excluded = set(CONFIG["backup_exclude"])
    assert Path(FIXED["HF_HOME"]).name in excluded
    assert settings.weights_path.name in excluded
    journal = settings.journal_path.name
    assert {journal, f"{journal}-wal", f"{journal}-shm"} <= excluded
    kept = {"journal-backup.sqlite3", settings.api_token_path.name, "options.json"}
    kept |= {settings.images_path.name, settings.init_images_path.name}
    assert not kept & excluded
    command = CONFIG["backup_pre"].split()
    assert command[0] == "edgeai-agent"
    from agent.cli import build_parser  # noqa: PLC0415

    assert build_parser().parse_args(command[1:]).journal_backup is True


@pytest.fixture
def as_an_app(tmp_path):
    """Run an agent as the Supervisor runs an app: in a mount namespace of its own where
    ``supervisor`` is 127.0.0.1 (the stand-in on port 80) and /data is the agent's state folder."""
    if subprocess.run(["unshare", "--mount", "true"], check=False).returncode != 0:
        pytest.skip("needs mount namespaces (root)")
    hosts = tmp_path / "hosts"
    hosts.write_text(Path("/etc/hosts").read_text() + "\n127.0.0.1 supervisor\n")
    Path("/data").mkdir(exist_ok=True)  # the mount point only; nothing is written there
    stand_in = SupervisorStandIn(BROKER, port=80)

    def prefix(state_dir: Path) -> list[str]:
        state_dir.mkdir(parents=True, exist_ok=True)
        script = 'mount --bind "$1" /etc/hosts && mount --bind "$2" /data && shift 2 && exec "$@"'
        binds = ["sh", "-c", script, "sh", str(hosts), str(state_dir)]
        return ["unshare", "--mount", "--propagation", "private", *binds]

    yield stand_in, prefix
    stand_in.stop()


def start_as_app(make_agent, broker, as_an_app, tiny_model, **env):
    """An agent whose broker comes from the Supervisor, as the Mosquitto app hands it out."""
    supervisor, prefix = as_an_app
    agent = make_agent(broker, start=False, SUPERVISOR_TOKEN=SUPERVISOR_TOKEN, **env)
    agent.unset = tuple(name for name in agent.env() if name.startswith("EDGEAI_MQTT_"))
    broker.add_node(agent.node_id)
    supervisor.broker = {
        **BROKER,
        "host": "127.0.0.1",
        "port": broker.port,
        "username": agent.node_id,
        "password": broker.password(agent.node_id),
    }
    agent.prefix = prefix(agent.state_dir)
    options = {
        "model": str(tiny_model),
        "tiny_vae": str(tiny_model / "taesd"),
        "node_id": agent.node_id,
    }
    (agent.state_dir / "options.json").write_text(json.dumps(options))
    agent.start()
    return agent


def wait_for(condition, timeout=30.0):
    import time  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.1)


def models_status(agent, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(agent.url + "/v1/models", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_app_hands_home_assistant_its_address_and_token(
    as_an_app, make_agent, broker, tiny_model
):
    supervisor, _ = as_an_app
    agent = start_as_app(make_agent, broker, as_an_app, tiny_model, EDGEAI_HTTP_AUTH="true")
    announced = supervisor.announcement()
    token = (agent.state_dir / "api-token").read_text().strip()
    assert announced == {
        "service": "edgeai",
        "config": {
            "host": socket.gethostname(),
            "port": agent.http_port,
            "token": token,
            "node_id": agent.node_id,
        },
    }
    # What Home Assistant is handed opens the agent; nothing else does.
    assert models_status(agent, announced["config"]["token"]) == 200
    assert models_status(agent, None) == 401
    log = agent.log_path.read_text()
    assert "the MQTT broker from the Supervisor" in log
    assert f"announced to Home Assistant as http://{socket.gethostname()}:{agent.http_port}" in log
    first = supervisor.messages["edgeai"]["uuid"]

    # A new token (the option changed: the app restarts) reaches Home Assistant at the start:
    # the same message, its config replaced.
    agent.stop()
    agent.extra_env["EDGEAI_API_TOKEN"] = "a-token-the-user-chose"
    agent.start()
    wait_for(lambda: len(supervisor.discovery_posts()) == 2)
    assert supervisor.messages["edgeai"]["uuid"] == first
    assert supervisor.messages["edgeai"]["config"]["token"] == "a-token-the-user-chose"
    assert models_status(agent, "a-token-the-user-chose") == 200


def test_a_supervisor_refusing_discovery_costs_the_offer_not_the_agent(
    as_an_app, make_agent, broker, tiny_model
):
    supervisor, _ = as_an_app
    supervisor.refuse_discovery = True
    agent = start_as_app(make_agent, broker, as_an_app, tiny_model)
    wait_for(lambda: "cannot announce the agent" in agent.log_path.read_text())
    client = broker.client()
    try:
        assert generate(client, agent, id="after-refusal")["status"] == "ok"
    finally:
        client.close()
    log = agent.log_path.read_text()
    assert "answered 403): add the edgeai integration by hand" in log
    assert "Traceback" not in log
