"""Running as a Home Assistant app: options and the Supervisor's broker become settings.

The whole app is tested in its image by scripts/test-containers (tests/containers/test_app.py);
these check the mapping against a real HTTP stand-in of the Supervisor's services API.
"""

from __future__ import annotations

import http.server
import json
import os
import threading

import pytest

from agent.home_assistant_app import INGRESS_GATEWAY, prepare_app_environment
from agent.settings import SettingsError, load_settings

BROKER = {
    "host": "core-mosquitto",
    "port": 1883,
    "ssl": False,
    "protocol": "3.1.1",
    "username": "addons",
    "password": "s3cret",
    "addon": "core_mosquitto",
}


@pytest.fixture
def supervisor():
    asked = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append((self.path, self.headers.get("Authorization")))
            ok = self.headers.get("Authorization") == "Bearer token-1"
            body = {"result": "ok", "data": BROKER} if ok else {"result": "error"}
            data = json.dumps(body).encode()
            self.send_response(200 if ok else 401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/services/mqtt", asked
    server.shutdown()


def write_options(tmp_path, **options):
    path = tmp_path / "options.json"
    path.write_text(json.dumps(options))
    return path


def test_outside_an_app_nothing_changes(tmp_path, supervisor):
    environ = {"PATH": "/bin"}
    url, asked = supervisor
    assert prepare_app_environment(environ, write_options(tmp_path, model="x"), url) is None
    assert environ == {"PATH": "/bin"}
    assert asked == []


def test_options_and_the_supervisors_broker_become_valid_settings(
    tmp_path, supervisor, monkeypatch
):
    url, asked = supervisor
    options = write_options(
        tmp_path,
        model="/share/sdxl-turbo",
        tiny_vae="",
        default_width=768,
        default_steps=2,
        api_token="",
        node_id="kitchen",
    )
    environ = {"SUPERVISOR_TOKEN": "token-1", "EDGEAI_HTTP_PORT": "9000"}
    said = prepare_app_environment(environ, options, url)
    assert said == "running as a Home Assistant app; the MQTT broker from the Supervisor"
    assert asked == [("/services/mqtt", "Bearer token-1")]
    assert environ["EDGEAI_STATE_DIR"] == "/data"
    assert environ["EDGEAI_INGRESS_PEER"] == INGRESS_GATEWAY
    assert environ["EDGEAI_MODEL"] == "/share/sdxl-turbo"
    assert environ["EDGEAI_MQTT_HOST"] == "core-mosquitto"
    assert environ["EDGEAI_MQTT_PASSWORD"] == "s3cret"
    assert "EDGEAI_API_TOKEN" not in environ  # empty: the agent makes one, never "no token"
    assert "EDGEAI_TINY_VAE" not in environ
    assert environ["EDGEAI_HTTP_PORT"] == "9000"  # what the environment says wins
    for name in list(os.environ):
        if name.startswith("EDGEAI_"):
            monkeypatch.delenv(name)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()  # every variable is a setting the agent knows, and valid
    assert (settings.default_width, settings.default_steps, settings.node_id) == (768, 2, "kitchen")
    assert str(settings.ingress_peer) == INGRESS_GATEWAY


def test_a_broker_in_the_options_is_used_without_asking(tmp_path, supervisor):
    url, asked = supervisor
    options = write_options(tmp_path, model="m", mqtt_host="10.0.0.5", mqtt_port=1884)
    environ = {"SUPERVISOR_TOKEN": "token-1"}
    assert "from its options" in prepare_app_environment(environ, options, url)
    assert asked == []
    assert (environ["EDGEAI_MQTT_HOST"], environ["EDGEAI_MQTT_PORT"]) == ("10.0.0.5", "1884")


def test_a_supervisor_that_refuses_stops_the_start_with_its_reason(tmp_path, supervisor):
    url, _ = supervisor
    with pytest.raises(SettingsError, match="services API answered 401"):
        prepare_app_environment(
            {"SUPERVISOR_TOKEN": "wrong"}, write_options(tmp_path, model="m"), url
        )


def test_unreadable_options_are_a_clear_error(tmp_path, supervisor):
    url, _ = supervisor
    broken = tmp_path / "options.json"
    broken.write_text("{not json")
    with pytest.raises(SettingsError, match="cannot read the app's options"):
        prepare_app_environment({"SUPERVISOR_TOKEN": "token-1"}, broken, url)


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
    url, _ = supervisor
    options = write_options(tmp_path, model="m", mqtt_host="10.0.0.5", **{option: value})
    environ = {"SUPERVISOR_TOKEN": "token-1"}
    with pytest.raises(SettingsError, match=f"the app option {option} must be {expected}"):
        prepare_app_environment(environ, options, url)
    assert "EDGEAI_API_TOKEN" not in environ
