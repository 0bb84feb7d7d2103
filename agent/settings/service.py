"""Settings of requests, images on disk, the HTTP server and its APIs, and the hardware."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, IPvAnyAddress, SecretStr

HOST_AND_PORT = r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:[0-9]{1,5})?$"
"""A host name or address, with a port or without: ``nvr.local``, ``10.0.0.5:8123``,
``[::1]:80``."""
OutputMode = Literal["b64", "url", "both"]
ImageFormat = Literal["png", "jpeg", "webp"]


class ServiceSettings(BaseModel):
    """What requests may ask, where images go, who may use HTTP, and the SoC's limits."""

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
        default=16384,
        ge=64,
        description="Largest request without an init image (MQTT payload or HTTP body); "
        "checked before parsing.",
    )
    max_image_payload_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        description="Largest request that carries an init image (base64 or a multipart file), "
        "and largest image fetched from an init_image URL. 4 MiB holds a 3 MiB file: any "
        "1024x1024 camera JPEG (150-400 KB) and most PNG photos of that size.",
    )
    init_image_max_pixels: int = Field(
        default=4096 * 4096,
        ge=64 * 64,
        description="Most pixels an init image may have before it is resized (a 4K camera "
        "frame is 8.3 million); a larger one, or a decompression bomb, is refused as bad_image.",
    )
    init_image_hosts: list[Annotated[str, Field(pattern=HOST_AND_PORT)]] = Field(
        default_factory=list,
        description="Hosts an init_image URL may be fetched from (none by default: URLs are "
        "refused), each as host (ports 80 and 443) or host:port, e.g. "
        '["nvr.local", "192.168.1.20:8123"].',
    )
    init_image_fetch_timeout_s: float = Field(
        default=10.0, gt=0, le=300, description="Longest wait for an init_image URL's file."
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
    image_keep_free_bytes: int = Field(
        default=200_000_000,
        ge=0,
        description="Free space kept on the image folder's file system: the oldest images are "
        "removed to keep it (a Pi's SD card fills up).",
    )
    http_host: str = Field(default="0.0.0.0", description="Address the HTTP server binds.")  # noqa: S104 - a LAN appliance serves its LAN
    http_port: int = Field(default=8080, ge=0, le=65535, description="HTTP port; 0 picks one.")
    public_url: str | None = Field(
        default=None,
        description="Base URL other hosts reach this agent at, for image URLs; "
        "default http://<hostname>:<http_port>.",
    )

    http_idle_timeout_s: float = Field(
        default=15.0,
        gt=0,
        le=3600,
        description="An HTTP connection that sends no complete request within this (after it "
        "opens, or after its last answer) is closed; a request body still arriving after it is "
        "refused (408).",
    )
    http_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="With http_auth off: names besides the machine's own (its host name, "
        "<hostname>.local, the node id, public_url's host, localhost) and IP addresses that "
        'requests may address the agent by, e.g. ["pi5.lan"]; ["*"] allows any (DNS '
        "rebinding then reaches the API).",
    )
    http_max_connections: int = Field(
        default=256,
        ge=1,
        le=65536,
        description="Open HTTP connections at most, all clients together; one more is answered "
        "503 and closed (lowered to half the open-files limit where that is smaller).",
    )
    http_max_connections_per_address: int = Field(
        default=32,
        ge=1,
        le=65536,
        description="Open HTTP connections at most from one address (Home Assistant's ingress "
        "gateway is held to the total alone).",
    )
    http_max_event_streams: int = Field(
        default=32,
        ge=1,
        le=65536,
        description="Job event streams (GET /api/jobs/<id>/events) open at most; one more is "
        "answered 503.",
    )
    http_frame_ancestors: list[str] = Field(
        default_factory=list,
        description="Origins besides the page's own that may show it in a frame "
        "(Content-Security-Policy frame-ancestors), e.g. http://homeassistant.local:8123.",
    )
    api_token: SecretStr | None = Field(
        default=None,
        description="The token jobs and the APIs need over HTTP (Authorization: Bearer, or the "
        "HTTP Basic password); unset: one generated on first start into <state_dir>/api-token.",
    )
    http_auth: bool = Field(
        default=True,
        description="Require the API token over HTTP; false lets anyone on the network create "
        "and cancel jobs (logged as a warning).",
    )
    public_images: bool = Field(
        default=False,
        description="Let anyone read images and the gallery without the token; otherwise image "
        "URLs the agent hands out carry a signature that opens that one image.",
    )
    ingress_peer: IPvAnyAddress | None = Field(
        default=None,
        description="The address of Home Assistant's ingress gateway (172.30.32.2 for a Home "
        "Assistant app): requests whose connection comes from it need no token, since Home "
        "Assistant has signed the user in. Unset: no address is trusted.",
    )
    api_max_images: int = Field(
        default=4,
        ge=1,
        le=16,
        description="Most images one OpenAI or AUTOMATIC1111 request may ask for (n, "
        "batch_size x n_iter); they run one after another.",
    )
    api_wait_s: float = Field(
        default=300.0,
        gt=0,
        le=3600,
        description="How long an OpenAI or AUTOMATIC1111 request waits for its images; the "
        "jobs go on after that and keep their results.",
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
    health_broker_grace_s: float = Field(
        default=10.0,
        ge=0,
        le=600,
        description="/healthz stays 200 while a lost broker link is this recent (it reconnects "
        "by itself); past it, 503.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level."
    )
