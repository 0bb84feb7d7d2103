"""Every setting of the agent, in one place.

Settings come from, highest priority first: environment variables ``EDGEAI_<NAME>``, an optional
TOML file (``--config`` or ``EDGEAI_CONFIG_FILE``), then the defaults below. The broker password
can come from a file so it stays out of the environment and out of the TOML file.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "EDGEAI_"
CONFIG_FILE_ENV = f"{ENV_PREFIX}CONFIG_FILE"

OutputMode = Literal["b64", "url", "both"]
ImageFormat = Literal["png", "jpeg", "webp"]
Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "float16", "bfloat16"]


class SettingsError(Exception):
    """A setting is wrong; the message names it and says why."""


def default_node_id() -> str:
    """Return the hostname reduced to what a topic level and an entity id accept."""
    node = re.sub(r"[^a-z0-9_-]+", "-", socket.gethostname().lower()).strip("-")
    return node or "edgeai"


Port = Annotated[int, Field(ge=1, le=65535)]


class Settings(BaseSettings):
    """The agent's settings. Each field is one setting; its description is its documentation."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    # --- identity and topics
    node_id: str = Field(
        default_factory=default_node_id,
        pattern=r"^[a-z0-9_-]{1,64}$",
        description="This agent's name in topics: <base> is <topic_prefix>/<node_id>.",
    )
    topic_prefix: str = Field(
        default="edgeai",
        pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$",
        description="First topic level(s) of every topic this agent owns.",
    )
    reply_prefix: str = Field(
        default="edgeai/reply/",
        description="reply_to and MQTT 5 response topics must start with this (empty allows any).",
    )

    # --- Home Assistant and fleet
    discovery: bool = Field(
        default=True,
        description="Announce entities to Home Assistant; false removes them.",
    )
    discovery_prefix: str = Field(
        default="homeassistant",
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Home Assistant's MQTT discovery prefix.",
    )
    fleet_group: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Join this fleet: take jobs from fleet_topic through a shared subscription.",
    )
    fleet_topic: str = Field(
        default="edgeai/fleet/generate",
        description="Where fleet requests are published; their results go to "
        "<fleet_topic without /generate>/result/<id>.",
    )

    # --- broker
    mqtt_host: str = Field(default="localhost", description="MQTT broker host name or address.")
    mqtt_port: Port = Field(default=1883, description="MQTT broker port.")
    mqtt_username: str | None = Field(default=None, description="MQTT user name.")
    mqtt_password: SecretStr | None = Field(default=None, description="MQTT password.")
    mqtt_password_file: Path | None = Field(
        default=None, description="File holding the MQTT password (its first line)."
    )
    mqtt_client_id: str | None = Field(
        default=None, description="MQTT client id; default edgeai-<node_id>."
    )
    mqtt_keepalive_s: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive.")
    mqtt_session_expiry_s: int = Field(
        default=86400,
        ge=0,
        description="How long the broker keeps this agent's session (and jobs sent to it) "
        "while it is offline.",
    )
    mqtt_reconnect_max_s: int = Field(
        default=30, ge=1, le=600, description="Longest wait between reconnect attempts."
    )
    mqtt_tls_ca: Path | None = Field(
        default=None, description="CA certificate file; setting it turns TLS on."
    )
    mqtt_tls_cert: Path | None = Field(
        default=None, description="Client certificate file, for brokers that require one."
    )
    mqtt_tls_key: Path | None = Field(default=None, description="Client certificate's key file.")
    max_message_bytes: int = Field(
        default=8_000_000,
        ge=10_000,
        description="Largest message the agent publishes; a larger result carries the image "
        "URL instead of base64 (the broker's own limit, from CONNACK, applies too).",
    )

    # --- model and worker
    model: str = Field(
        default="stabilityai/sdxl-turbo",
        description="Hugging Face hub id or local folder of the text-to-image pipeline.",
    )
    model_variant: str = Field(
        default="auto",
        pattern=r"^[A-Za-z0-9_-]*$",
        description="Weight files to load (diffusers' variant): auto takes the fp16 files of a "
        "hub model, and of a local folder that has them; empty takes the default files.",
    )
    device: Device = Field(
        default="auto", description="Where the model runs: auto picks cuda when present."
    )
    dtype: DType = Field(
        default="auto",
        description="Precision: auto is float16 on cuda, bfloat16 on a CPU with AVX512-BF16 or "
        "AMX, float32 on other CPUs (a Raspberry Pi).",
    )
    tiny_vae: str = Field(
        default="madebyollin/taesdxl",
        description="Hub id or folder of a tiny decoder (AutoencoderTiny, TAESDXL) used instead "
        "of the model's VAE: decoding is many times faster; empty uses the model's VAE.",
    )
    half_weights: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Keep the weights of linear and convolution layers in float16 and compute "
        "in float32 (each layer upcast while it runs), halving the model's memory at some speed; "
        "auto: on when float32 runs on a CPU with less than 16 GiB of memory.",
    )
    int8_weights: bool = Field(
        default=False,
        description="Store the linear and convolution weights of the UNet and text encoders as "
        "int8 (weight-only, one scale per output channel; needs the int8 extra, torchao): about "
        "half the memory of float16. Off by default: its effect on image quality could not be "
        "checked on the real weights.",
    )
    channels_last: bool = Field(
        default=True, description="Run the UNet and the decoder in channels_last memory format."
    )
    warmup: bool = Field(
        default=True, description="Generate one small image at load so the first job is fast."
    )
    prompt_cache_size: int = Field(
        default=16,
        ge=0,
        le=1024,
        description="Prompt embeddings kept (LRU): a repeated prompt skips the text encoders.",
    )
    torch_threads: int = Field(
        default=0, ge=0, le=256, description="CPU threads for torch; 0 uses every core."
    )
    max_attempts: int = Field(
        default=2,
        ge=1,
        le=10,
        description="Runs of a job whose worker died under it before the job fails.",
    )
    journal_keep_s: float = Field(
        default=7 * 86400,
        gt=0,
        description="How long delivered jobs stay in the journal (a resent id gets the stored "
        "result meanwhile).",
    )
    journal_keep_rows: int = Field(
        default=10000, ge=10, description="Delivered jobs kept in the journal at most."
    )
    worker_restart_delay_s: float = Field(
        default=2.0,
        ge=0,
        le=600,
        description="Wait before restarting a worker that died; after loads that failed in a row "
        "(a worker killed while loading, say) the wait doubles each time.",
    )
    worker_restart_max_delay_s: float = Field(
        default=300.0,
        ge=0,
        le=86400,
        description="Longest wait between two attempts to load the model.",
    )

    # --- request defaults and bounds
    default_width: int = Field(default=512, ge=64, description="Width when a request has none.")
    default_height: int = Field(default=512, ge=64, description="Height when a request has none.")
    default_steps: int = Field(default=1, ge=1, description="Denoising steps when not given.")
    default_guidance_scale: float = Field(
        default=0.0, ge=0, description="Guidance scale when not given (SDXL-Turbo wants 0)."
    )
    default_output: OutputMode = Field(default="b64", description="b64, url or both.")
    default_format: ImageFormat = Field(default="png", description="png, jpeg or webp.")
    min_size: int = Field(default=256, ge=8, description="Smallest width or height allowed.")
    max_size: int = Field(default=1024, ge=8, description="Largest width or height allowed.")
    max_steps: int = Field(default=8, ge=1, le=100, description="Most denoising steps allowed.")
    max_guidance_scale: float = Field(default=20.0, ge=0, description="Largest guidance scale.")
    max_prompt_chars: int = Field(default=1000, ge=1, description="Longest prompt, in characters.")
    max_payload_bytes: int = Field(
        default=16384, ge=64, description="Largest request payload; checked before parsing."
    )
    max_queue: int = Field(
        default=16, ge=1, le=10000, description="Jobs waiting at most; more get a busy error."
    )
    jpeg_quality: int = Field(default=90, ge=1, le=100, description="JPEG and WebP quality.")

    # --- images on disk and HTTP
    state_dir: Path = Field(default=Path("state"), description="Folder for the agent's state.")
    image_dir: Path | None = Field(
        default=None, description="Folder for generated images; default <state_dir>/images."
    )
    image_keep_count: int = Field(default=200, ge=1, description="Images kept on disk at most.")
    image_keep_bytes: int = Field(
        default=500_000_000, ge=1, description="Bytes of images kept on disk at most."
    )
    http_host: str = Field(default="0.0.0.0", description="Address the HTTP server binds.")  # noqa: S104 - a LAN appliance serves its LAN
    http_port: int = Field(default=8080, ge=0, le=65535, description="HTTP port; 0 picks one.")
    public_url: str | None = Field(
        default=None,
        description="Base URL other hosts reach this agent at, for image URLs; "
        "default http://<hostname>:<http_port>.",
    )

    api_token: SecretStr | None = Field(
        default=None,
        description="When set, creating or cancelling a job over HTTP needs this token "
        "(Authorization: Bearer, or ?token=).",
    )
    public_images: bool = Field(
        default=False,
        description="With api_token set, let anyone read images and the gallery without it.",
    )

    # --- hardware
    thermal_glob: str = Field(
        default="/sys/class/thermal/thermal_zone*/temp",
        description="Files holding SoC temperatures in millidegrees Celsius.",
    )
    vcgencmd: str = Field(
        default="vcgencmd", description="The vcgencmd command, for throttling flags."
    )
    pause_c: float = Field(
        default=80.0, description="At or above this SoC temperature no new job starts."
    )
    resume_c: float = Field(
        default=70.0, description="Below this temperature, jobs start again after a pause."
    )
    thermal_poll_s: float = Field(
        default=5.0, gt=0, description="How often the temperature is read while cooling."
    )
    state_interval_s: float = Field(
        default=30.0, gt=0, description="How often the retained state is refreshed."
    )
    shutdown_grace_s: float = Field(
        default=60.0, ge=0, description="On SIGTERM, how long the running job may finish."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level."
    )

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


def describe_settings() -> str:
    """Return a help text listing every setting with its variable, default and meaning."""
    lines = []
    for name, field in Settings.model_fields.items():
        if field.default_factory is not None:
            default = "(computed)"
        elif field.default is None:
            default = "(unset)"
        else:
            default = str(field.default)
        lines.append(f"  {ENV_PREFIX}{name.upper()}  [{default}]\n      {field.description}")
    return "\n".join(lines)


def _unknown_environment() -> list[str]:
    known = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    known.add(CONFIG_FILE_ENV)
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
        raise SettingsError(f"unknown setting(s) in the environment: {', '.join(unknown)}")
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
