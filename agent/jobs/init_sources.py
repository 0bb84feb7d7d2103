"""Init sources: what a request says about the picture an image-to-image job starts from.

``init_image`` (base64, a data URL, or an http(s) URL whose host a setting allows) and
``strength`` are checked here, before anything is fetched or decoded; reading the picture itself
is :mod:`agent.jobs.init_images`' work.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from agent.jobs.errors import ErrorCode, RequestError

if TYPE_CHECKING:
    from agent.settings import Settings

DEFAULT_STRENGTH = 0.5
"""Image-to-image strength when a request names none: half the picture kept."""
MIN_STRENGTH = 0.01
"""Less would change nothing one can see, and lengthen the schedule past 100 steps."""
WEB_PORTS = {"http": 80, "https": 443}
"""The ports an ``init_image_hosts`` entry without one allows, and each scheme's default."""
DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)
"""A data URL's head, as web clients send a picture; the base64 after it is the file."""


@dataclass(frozen=True)
class InitSource:
    """An init image as the request gave it, before it is checked and stored.

    Its bytes, or the URL to fetch them from.
    """

    data: bytes | None = None
    url: str | None = None
    thumbnail: bytes | None = None
    """Once stored: the gallery's JPEG of it, made while the picture was decoded anyway."""


def parse_init_image(
    given_image: str | None, given_strength: float | None, settings: Settings
) -> tuple[InitSource | None, float | None]:
    """Return a request's init image (its bytes, or the URL to fetch) and its strength.

    Raises:
        RequestError: The image is neither base64 nor an allowed URL, or the strength is out
            of range or given without an image.
    """
    if given_image is None:
        if given_strength is not None:
            raise RequestError(
                ErrorCode.INVALID_REQUEST, "strength needs an init_image", field="strength"
            )
        return None, None
    strength = DEFAULT_STRENGTH if given_strength is None else given_strength
    if not MIN_STRENGTH <= strength <= 1.0:  # also false for NaN
        raise RequestError(
            ErrorCode.OUT_OF_RANGE,
            f"strength {strength} is outside {MIN_STRENGTH}..1",
            field="strength",
        )
    given = given_image.strip()
    if given.lower().startswith(("http://", "https://")):
        return InitSource(url=checked_image_url(given, settings)), strength
    try:
        data = base64.b64decode(DATA_URL.sub("", given, count=1), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(
            ErrorCode.BAD_IMAGE,
            "init_image is neither base64 nor an http(s) URL",
            field="init_image",
        ) from exc
    if not data:
        raise RequestError(ErrorCode.BAD_IMAGE, "init_image is empty", field="init_image")
    return InitSource(data=data), strength


def checked_image_url(url: str, settings: Settings) -> str:
    """Return an init image URL whose host and port ``init_image_hosts`` allows.

    An entry ``host`` allows the web's own ports (80 and 443); ``host:port`` that port alone.
    Other ports of an allowed host stay closed: a camera's snapshot port is one thing, the
    host's other services another.

    Raises:
        RequestError: The URL is malformed, or its host and port are not allowed.
    """
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or WEB_PORTS[parts.scheme.lower()]
    except (ValueError, KeyError):
        host, port = None, 0
    if not host:
        raise RequestError(ErrorCode.BAD_IMAGE, "init_image is not a valid URL", field="init_image")
    if (host.rstrip("."), port) not in allowed_fetches(settings.init_image_hosts):
        raise RequestError(
            ErrorCode.BAD_IMAGE,
            f"init_image URLs from {host}:{port} are not fetched: not in init_image_hosts",
            field="init_image",
        )
    return url


def allowed_fetches(entries: list[str]) -> set[tuple[str, int]]:
    """Return the (host, port) pairs ``init_image_hosts`` allows (hosts in lower case)."""
    allowed: set[tuple[str, int]] = set()
    for entry in entries:
        try:
            parts = urlsplit(f"//{entry.strip()}")
            host, port = parts.hostname, parts.port
        except ValueError:
            continue  # refused when the settings are read; nothing to allow here
        if host:
            ports = (port,) if port else tuple(WEB_PORTS.values())
            allowed.update((host.rstrip("."), each) for each in ports)
    return allowed
