"""Running as a Home Assistant app: the app's options and the Mosquitto app's broker, as settings.

The Supervisor starts an app with ``SUPERVISOR_TOKEN`` in its environment and the options the
user chose in ``/data/options.json``. Before the settings are read, this turns them into the
``EDGEAI_*`` variables the agent already understands: the state under ``/data``, the model and
its decoder, the default size and steps, the API token; the broker the user named, or else the
one the Supervisor's services API hands out (``services: mqtt:want``); the ingress gateway,
whose requests need no token; and a shutdown grace that ends before the Supervisor's stop
timeout (config.yaml's ``timeout``). A variable already set in the environment wins.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.settings import SettingsError
from agent.supervisor import Supervisor, SupervisorError

if TYPE_CHECKING:
    from collections.abc import MutableMapping

    from agent.settings import Settings

log = logging.getLogger(__name__)

OPTIONS_PATH = Path("/data/options.json")
INGRESS_GATEWAY = "172.30.32.2"
"""The address the Supervisor's ingress proxy connects from (Home Assistant's developer docs)."""
STOP_TIMEOUT_S = 300
"""config.yaml's ``timeout``: the Supervisor's ``docker stop -t``, then SIGKILL."""
SHUTDOWN_GRACE_S = STOP_TIMEOUT_S - 20
"""The running picture's grace on a stop: what is left after it is enough to requeue and exit."""
FIXED = {
    "EDGEAI_STATE_DIR": "/data",
    "HF_HOME": "/data/huggingface",
    "EDGEAI_INGRESS_PEER": INGRESS_GATEWAY,
    "EDGEAI_SHUTDOWN_GRACE_S": str(SHUTDOWN_GRACE_S),
    "EDGEAI_LORA_DIR": "/share/edgeai/loras",
}
"""What every app gets: all state in the app's own folder, ingress trusted, a stop that ends
before the Supervisor kills, LoRA styles from a folder of /share (what the Samba app shows)."""
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
"""The app's options (config.yaml's schema) and the settings they set; empty ones set nothing,
but for the decoder's."""
EMPTY_MEANS_NONE = ("tiny_vae",)
"""Options whose empty value is a choice: no tiny decoder, the model's own VAE (the setting's
empty value). The option's default in config.yaml names the tiny decoder."""
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
            if option in EMPTY_MEANS_NONE:
                variables[name] = ""
            continue
        kind = int if option in NUMBER_OPTIONS else str
        if isinstance(value, bool) or not isinstance(value, kind):
            expected = "a whole number" if kind is int else "text"
            raise SettingsError(f"the app option {option} must be {expected}, not {value!r}")
        variables[name] = str(value)
    models = options.get("models") or []
    if not isinstance(models, list) or not all(
        isinstance(line, str) and "=" in line for line in models
    ):
        raise SettingsError("the app option models must be lines of name=source")
    if models:
        variables["EDGEAI_MODELS"] = json.dumps(dict(line.split("=", 1) for line in models))
    if "EDGEAI_MQTT_HOST" not in variables and broker:
        for key, name in BROKER.items():
            if broker.get(key) not in (None, ""):
                variables[name] = str(broker[key])
    return variables


@dataclass(frozen=True)
class AppStart:
    """What running as an app found: the line to log, and the Supervisor to announce to."""

    line: str
    supervisor: Supervisor


def prepare_app_environment(
    environ: MutableMapping[str, str],
    options_path: Path = OPTIONS_PATH,
    supervisor_url: str | None = None,
    *,
    ask_for_broker: bool = True,
) -> AppStart | None:
    """Set the app's variables when running as a Home Assistant app.

    Args:
        environ: The environment to complete (``os.environ``).
        options_path: The options the Supervisor wrote.
        supervisor_url: The Supervisor's address (a stand-in's, in tests).
        ask_for_broker: False for a command that needs no broker (the backup's journal copy).

    Returns:
        What was found, or None when not running as an app.

    Raises:
        SettingsError: The options cannot be read, or the Supervisor cannot be asked.
    """
    token = environ.get("SUPERVISOR_TOKEN")
    if not token or not options_path.exists():
        return None
    supervisor = Supervisor(token) if supervisor_url is None else Supervisor(token, supervisor_url)
    try:
        options = json.loads(options_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SettingsError(f"cannot read the app's options {options_path}: {exc}") from exc
    if not isinstance(options, dict):
        raise SettingsError(f"the app's options {options_path} are not a JSON object")
    if options.get("mqtt_host"):
        broker, where = None, "its options"
    elif not ask_for_broker:
        broker, where = None, "nowhere (not asked)"
    else:
        try:
            broker = supervisor.mqtt_service()
        except SupervisorError as exc:
            raise SettingsError(f"cannot ask the Supervisor for the MQTT broker: {exc}") from exc
        where = (
            "the Supervisor" if broker else "nowhere: install the Mosquitto app or set mqtt_host"
        )
    for name, value in app_environment(options, broker).items():
        environ.setdefault(name, value)
    return AppStart(f"running as a Home Assistant app; the MQTT broker from {where}", supervisor)


def discovery_config(settings: Settings, token: str | None, port: int) -> dict[str, Any]:
    """Return what Home Assistant needs to reach this agent (the integration's hassio step).

    The host is the app's host name on the Supervisor's network (its slug, ``_`` as ``-``),
    which the container is given; ``port`` is the one the agent listens on, not a host port.
    """
    return {
        "host": socket.gethostname(),
        "port": port,
        "token": token or "",
        "node_id": settings.node_id,
    }


async def announce_agent(
    supervisor: Supervisor, settings: Settings, token: str | None, port: int
) -> None:
    """Tell Home Assistant, through the Supervisor, where this agent is and its token.

    Posted at every start: the address and the token change only across starts (an option
    changed restarts the app), and the Supervisor forwards a message only when it changed. A
    Supervisor that cannot be asked costs the offer, not the start: the integration can still be
    added by hand.
    """
    config = discovery_config(settings, token, port)
    try:
        await asyncio.to_thread(supervisor.announce, config)
    except SupervisorError as exc:
        log.warning(
            "cannot announce the agent to Home Assistant (%s): add the edgeai integration by hand",
            exc,
        )
        return
    log.info(
        "announced to Home Assistant as http://%s:%d: the edgeai integration is offered under "
        "Settings > Devices & services > Discovered",
        config["host"],
        config["port"],
    )
