"""Every setting of the agent, in one place.

Settings come from, highest priority first: environment variables ``EDGEAI_<NAME>``, an optional
TOML file (``--config`` or ``EDGEAI_CONFIG_FILE``), then the defaults below. The broker password
can come from a file so it stays out of the environment and out of the TOML file.
"""

from __future__ import annotations

import os
import socket
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from agent.settings.model import ModelSettings
from agent.settings.network import NetworkSettings
from agent.settings.service import ImageFormat, OutputMode, ServiceSettings

__all__ = ["ImageFormat", "OutputMode", "Settings", "SettingsError", "load_settings"]

ENV_PREFIX = "EDGEAI_"
CONFIG_FILE_ENV = f"{ENV_PREFIX}CONFIG_FILE"


class SettingsError(Exception):
    """A setting is wrong; the message names it and says why."""


class Settings(ServiceSettings, ModelSettings, NetworkSettings, BaseSettings):
    """The agent's settings. Each field is one setting; its description is its documentation.

    The fields are declared by section in this package's modules; this class puts them together
    with what spans sections: the checks between settings and the values derived from them.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    @model_validator(mode="after")
    def _check_bounds(self) -> Settings:
        if self.min_size > self.max_size:
            raise ValueError("min_size is larger than max_size")
        for name in ("default_width", "default_height", "min_size", "max_size"):
            if getattr(self, name) % 8:
                raise ValueError(f"{name} must be a multiple of 8")
        if not self.min_size <= self.default_width <= self.max_size:
            raise ValueError("default_width is outside min_size..max_size")
        if not self.min_size <= self.default_height <= self.max_size:
            raise ValueError("default_height is outside min_size..max_size")
        if self.default_steps > self.max_steps:
            raise ValueError("default_steps is larger than max_steps")
        if self.resume_c >= self.pause_c:
            raise ValueError("resume_c must be below pause_c")
        if (self.mqtt_tls_cert is None) != (self.mqtt_tls_key is None):
            raise ValueError("set both mqtt_tls_cert and mqtt_tls_key, or neither")
        if self.mqtt_password is not None and self.mqtt_password_file is not None:
            raise ValueError("set mqtt_password or mqtt_password_file, not both")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Let the environment override the TOML file, which is passed as init values."""
        del settings_cls, dotenv_settings, file_secret_settings
        return (env_settings, init_settings)

    # --- derived values
    @property
    def base_topic(self) -> str:
        """Return ``<topic_prefix>/<node_id>``, the root of this agent's topics."""
        return f"{self.topic_prefix}/{self.node_id}"

    @property
    def client_id(self) -> str:
        """Return the MQTT client id."""
        return self.mqtt_client_id or f"edgeai-{self.node_id}"

    @property
    def fleet_results(self) -> str:
        """Return the topic prefix of fleet results: ``fleet_topic`` without ``/generate``."""
        return self.fleet_topic.removesuffix("/generate")

    @property
    def journal_path(self) -> Path:
        """Return the SQLite journal's path."""
        return self.state_dir / "journal.sqlite3"

    @property
    def init_images_path(self) -> Path:
        """Return the folder of image-to-image jobs' pictures, kept until each is answered."""
        return self.state_dir / "init-images"

    @property
    def weights_path(self) -> Path:
        """Return the folder of the weights' integer forms, written once and mapped after."""
        return self.state_dir / "weights"

    @property
    def api_token_path(self) -> Path:
        """Return where the generated API token is kept (when api_token is not set)."""
        return self.state_dir / "api-token"

    @property
    def images_path(self) -> Path:
        """Return the folder generated images are written to."""
        return self.image_dir if self.image_dir is not None else self.state_dir / "images"

    def base_url(self, bound_port: int) -> str:
        """Return the URL other hosts reach the HTTP server at, without a trailing slash."""
        if self.public_url:
            return self.public_url.rstrip("/")
        return f"http://{socket.gethostname()}:{bound_port}"

    def password(self) -> str | None:
        """Return the MQTT password, read from its file when one is set.

        Raises:
            SettingsError: The password file cannot be read.
        """
        if self.mqtt_password is not None:
            return self.mqtt_password.get_secret_value()
        if self.mqtt_password_file is None:
            return None
        try:
            lines = self.mqtt_password_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise SettingsError(f"mqtt_password_file: cannot read it: {exc}") from exc
        return lines[0] if lines else ""


COMPUTED_DEFAULTS = {"node_id": "hostname"}
"""Defaults computed on the machine, named rather than shown (they differ from host to host)."""


def default_text(name: str) -> str:
    """Return how a setting's default is shown: its value, ``unset``, or what computes it."""
    field = Settings.model_fields[name]
    if name in COMPUTED_DEFAULTS:
        return COMPUTED_DEFAULTS[name]
    if field.default_factory is not None:
        return str(field.default_factory())  # type: ignore[call-arg]
    return "unset" if field.default is None else str(field.default)


def describe_settings() -> str:
    """Return a help text listing every setting with its variable, default and meaning."""
    lines = [
        f"  {ENV_PREFIX}{name.upper()}  [{default_text(name)}]\n      {field.description}"
        for name, field in Settings.model_fields.items()
    ]
    return "\n".join(lines)


SCRIPT_VARIABLES = (
    "EDGEAI_TORCH",
    "EDGEAI_TORCH_VERSION",
    "EDGEAI_TORCH_SPEC",
    "EDGEAI_TORCH_CPU_INDEX",
    "EDGEAI_VENV",
    "EDGEAI_HA_ROOT",
    "EDGEAI_DEBIAN_MIRROR",
    "EDGEAI_BENCH_CACHE",
    "EDGEAI_CONTAINER_TESTS",
    "EDGEAI_CONTAINER_PREPARE",
    "EDGEAI_CONTAINER_IMAGE",
    "EDGEAI_SMALL_PI_TESTS",
)
"""Variables the install, test and benchmark scripts read (scripts/lib.sh says what each does):
not settings of the agent, and no mistake to find in its environment."""


RENAMED = {"EDGEAI_INT8_WEIGHTS": "EDGEAI_WEIGHT_FORM=int8"}
"""Settings of earlier releases, and what says the same now."""


def _unknown_environment() -> list[str]:
    known = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    known.update((CONFIG_FILE_ENV, *SCRIPT_VARIABLES))
    return sorted(key for key in os.environ if key.startswith(ENV_PREFIX) and key not in known)


def load_settings(config_file: Path | None = None) -> Settings:
    """Load the settings from the environment and an optional TOML file.

    Args:
        config_file: A TOML file of ``name = value`` lines; ``EDGEAI_CONFIG_FILE`` when None.

    Returns:
        The validated settings.

    Raises:
        SettingsError: A setting is unknown or invalid; the message names each one.
    """
    unknown = _unknown_environment()
    if unknown:
        named = [f"{key} (now {RENAMED[key]})" if key in RENAMED else key for key in unknown]
        raise SettingsError(f"unknown setting(s) in the environment: {', '.join(named)}")
    if config_file is None and os.environ.get(CONFIG_FILE_ENV):
        config_file = Path(os.environ[CONFIG_FILE_ENV])
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            values = tomllib.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"config file {config_file}: {exc}") from exc
    try:
        return Settings(**values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = ".".join(str(part) for part in error["loc"]) or "settings"
            where = f"{name} ({ENV_PREFIX}{name.upper()})" if error["loc"] else name
            problems.append(f"{where}: {error['msg']}")
        raise SettingsError("invalid setting(s):\n  " + "\n  ".join(problems)) from exc
