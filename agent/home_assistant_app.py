"""Running as a Home Assistant app: the app's options and the Mosquitto app's broker, as settings.

The Supervisor starts an app with ``SUPERVISOR_TOKEN`` in its environment and the options the
user chose in ``/data/options.json``. Before the settings are read, this turns them into the
``EDGEAI_*`` variables the agent already understands: the state under ``/data``, the model and
its decoder, the default size and steps, the API token; the broker the user named, or else the
one the Supervisor's services API hands out (``services: mqtt:need``); and the ingress gateway,
whose requests need no token. A variable already set in the environment wins.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.settings import SettingsError

if TYPE_CHECKING:
    from collections.abc import MutableMapping

OPTIONS_PATH = Path("/data/options.json")
SERVICES_URL = "http://supervisor/services/mqtt"
INGRESS_GATEWAY = "172.30.32.2"
"""The address the Supervisor's ingress proxy connects from (Home Assistant's developer docs)."""
SERVICES_TIMEOUT_S = 10.0
FIXED = {
    "EDGEAI_STATE_DIR": "/data",
    "HF_HOME": "/data/huggingface",
    "EDGEAI_INGRESS_PEER": INGRESS_GATEWAY,
}
"""What every app gets: all state in the app's own folder, ingress trusted."""
OPTIONS = {
    "model": "EDGEAI_MODEL",
    "tiny_vae": "EDGEAI_TINY_VAE",
    "default_width": "EDGEAI_DEFAULT_WIDTH",
    "default_height": "EDGEAI_DEFAULT_HEIGHT",
    "default_steps": "EDGEAI_DEFAULT_STEPS",
    "api_token": "EDGEAI_API_TOKEN",
    "node_id": "EDGEAI_NODE_ID",
    "log_level": "EDGEAI_LOG_LEVEL",
    "mqtt_host": "EDGEAI_MQTT_HOST",
    "mqtt_port": "EDGEAI_MQTT_PORT",
    "mqtt_username": "EDGEAI_MQTT_USERNAME",
    "mqtt_password": "EDGEAI_MQTT_PASSWORD",
}
"""The app's options (config.yaml's schema) and the settings they set; empty ones set nothing."""
NUMBER_OPTIONS = ("default_width", "default_height", "default_steps", "mqtt_port")
"""Options that are whole numbers; every other one is text."""
BROKER = {
    "host": "EDGEAI_MQTT_HOST",
    "port": "EDGEAI_MQTT_PORT",
    "username": "EDGEAI_MQTT_USERNAME",
    "password": "EDGEAI_MQTT_PASSWORD",
}


def app_environment(options: dict[str, Any], broker: dict[str, Any] | None) -> dict[str, str]:
    """Return the variables an app's options and the Supervisor's broker stand for.

    Args:
        options: ``/data/options.json``.
        broker: The ``data`` of the Supervisor's ``/services/mqtt`` answer, or None.

    Raises:
        SettingsError: An option is not of its kind: ``api_token: false`` must not become the
            token "False".
    """
    variables = dict(FIXED)
    for option, name in OPTIONS.items():
        value = options.get(option)
        if value is None or value == "":
            continue
        kind = int if option in NUMBER_OPTIONS else str
        if isinstance(value, bool) or not isinstance(value, kind):
            expected = "a whole number" if kind is int else "text"
            raise SettingsError(f"the app option {option} must be {expected}, not {value!r}")
        variables[name] = str(value)
    if "EDGEAI_MQTT_HOST" not in variables and broker:
        for key, name in BROKER.items():
            if broker.get(key) not in (None, ""):
                variables[name] = str(broker[key])
    return variables


def mqtt_service(token: str, url: str = SERVICES_URL) -> dict[str, Any] | None:
    """Return the broker the Supervisor hands out, or None when there is none.

    Raises:
        SettingsError: The Supervisor cannot be asked.
    """
    # The Supervisor's fixed http:// address (a test's stand-in in tests): no other scheme.
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=SERVICES_TIMEOUT_S) as response:  # noqa: S310
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code in (400, 404):  # no MQTT service is provided
            return None
        raise SettingsError(f"the Supervisor's services API answered {exc.code}") from exc
    except (OSError, ValueError) as exc:
        raise SettingsError(f"cannot ask the Supervisor for the MQTT broker: {exc}") from exc
    data = answer.get("data") if isinstance(answer, dict) else None
    return data if isinstance(data, dict) and data.get("host") else None


def prepare_app_environment(
    environ: MutableMapping[str, str],
    options_path: Path = OPTIONS_PATH,
    services_url: str = SERVICES_URL,
) -> str | None:
    """Set the app's variables when running as a Home Assistant app.

    Returns:
        The line to log (where the broker came from), or None when not running as an app.

    Raises:
        SettingsError: The options cannot be read, or the Supervisor cannot be asked.
    """
    token = environ.get("SUPERVISOR_TOKEN")
    if not token or not options_path.exists():
        return None
    try:
        options = json.loads(options_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SettingsError(f"cannot read the app's options {options_path}: {exc}") from exc
    if not isinstance(options, dict):
        raise SettingsError(f"the app's options {options_path} are not a JSON object")
    if options.get("mqtt_host"):
        broker, where = None, "its options"
    else:
        broker = mqtt_service(token, services_url)
        where = (
            "the Supervisor" if broker else "nowhere: install the Mosquitto app or set mqtt_host"
        )
    for name, value in app_environment(options, broker).items():
        environ.setdefault(name, value)
    return f"running as a Home Assistant app; the MQTT broker from {where}"
