"""Init images: the pictures image-to-image jobs start from, read, checked, sized and kept.

A request's ``init_image`` and ``strength`` are parsed here (:func:`parse_init_image`). Its
picture (base64 in the request, or fetched from a URL whose host a setting allows) is read
before the job is journaled: a file that is not a PNG, JPEG or WebP, a truncated
one, a decompression bomb or one with more pixels than ``init_image_max_pixels`` is refused as
``bad_image``. What passes is turned upright (EXIF orientation), scaled to cover the job's size
and centre-cropped to it, and stored as a PNG of exactly that size under
``<state_dir>/init-images/`` beside the journal, so a job resumed after a kill -9 finds it. The
file is removed once its job is answered; files of jobs no longer waiting are swept at start.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import io
import logging
import os
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp
from PIL import Image, ImageOps, UnidentifiedImageError

from agent.jobs.errors import ErrorCode, RequestError
from agent.machine.disk import StorageWatch, is_full, write_atomically

if TYPE_CHECKING:
    from pathlib import Path

    from agent.jobs.requests import JobSpec
    from agent.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_STRENGTH = 0.5
"""Image-to-image strength when a request names none: half the picture kept."""
MIN_STRENGTH = 0.01
"""Less would change nothing one can see, and lengthen the schedule past 100 steps."""
DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)
"""A data URL's head, as web clients send a picture; the base64 after it is the file."""

FORMATS = ("PNG", "JPEG", "WEBP")
"""What an init image may be: what cameras, browsers and image APIs send."""
ROTATED = (5, 6, 7, 8)
"""EXIF orientations that swap width and height."""
THUMBNAIL_SIDE = 256
"""The gallery's thumbnail of what a picture was made from, at most this many pixels a side."""


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
    """Return an init image URL whose host ``init_image_hosts`` allows.

    Raises:
        RequestError: The URL is malformed or its host is not allowed.
    """
    try:
        host = urlsplit(url).hostname
    except ValueError:
        host = None
    allowed = {name.lower().rstrip(".") for name in settings.init_image_hosts}
    if not host:
        raise RequestError(ErrorCode.BAD_IMAGE, "init_image is not a valid URL", field="init_image")
    if host.rstrip(".") not in allowed:
        raise RequestError(
            ErrorCode.BAD_IMAGE,
            f"init_image URLs from {host} are not fetched: the host is not in init_image_hosts",
            field="init_image",
        )
    return url


def output_size(
    picture: tuple[int, int],
    width: int,
    height: int,
    *,
    min_size: int,
    max_size: int,
) -> tuple[int, int]:
    """Return the size of an image-to-image job's output.

    A side the request gives is kept. With neither given the picture's own size is used,
    scaled down to fit ``max_size`` (or up to reach ``min_size``) keeping its aspect; with one
    given the other follows the aspect. Each side computed is rounded to a multiple of 8 within
    the bounds.

    Args:
        picture: The picture's (width, height), upright.
        width: The request's width, 0 when not given.
        height: The request's height, 0 when not given.
        min_size: Smallest side allowed.
        max_size: Largest side allowed.
    """
    source_width, source_height = picture
    if width and height:
        return width, height
    if width:
        scale = width / source_width
    elif height:
        scale = height / source_height
    else:
        scale = min(1.0, max_size / max(picture))
        scale = max(scale, min_size / min(picture))
    low, high = -(-min_size // 8) * 8, max_size // 8 * 8

    def side(given: int, source: int) -> int:
        if given:
            return given
        return min(high, max(low, round(source * scale / 8) * 8))

    return side(width, source_width), side(height, source_height)


@dataclass(frozen=True)
class Normalized:
    """A picture checked and sized for its job."""

    png: bytes
    thumbnail: bytes
    """The gallery's JPEG of it."""
    size: tuple[int, int]


def normalize(data: bytes, width: int, height: int, settings: Settings) -> Normalized:
    """Check a picture and return it as a PNG of the job's size, with its thumbnail.

    Args:
        data: The file as sent.
        width: The request's width, 0 when not given.
        height: The request's height, 0 when not given.
        settings: Size and pixel bounds.

    Returns:
        The PNG, the gallery's JPEG of it, and its size.

    Raises:
        RequestError: ``bad_image``, saying why.
    """
    try:
        with warnings.catch_warnings():
            # A picture over Pillow's own bomb threshold is refused below, by our own bound.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as picture:
                return _fitted(picture, width, height, settings)
    except UnidentifiedImageError as exc:
        raise _bad("init_image is not a PNG, JPEG or WebP picture") from exc
    except Image.DecompressionBombError as exc:
        raise _bad(f"init_image has too many pixels: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow says "image file is truncated", "broken data stream" and the like.
        raise _bad(f"init_image cannot be read: {exc}") from exc


def _fitted(picture: Image.Image, width: int, height: int, settings: Settings) -> Normalized:
    pixels = picture.width * picture.height
    if pixels > settings.init_image_max_pixels:
        raise _bad(
            f"init_image is {picture.width}x{picture.height} ({pixels} pixels); the limit is "
            f"{settings.init_image_max_pixels} pixels"
        )
    upright = picture.size
    if picture.getexif().get(0x0112) in ROTATED:
        upright = (picture.height, picture.width)
    target = output_size(
        upright, width, height, min_size=settings.min_size, max_size=settings.max_size
    )
    if picture.format == "JPEG":
        # Decode a large JPEG at a fraction of its size straight away: less memory, less time.
        picture.draft("RGB", target if upright == picture.size else target[::-1])
    picture.load()
    rgb = ImageOps.exif_transpose(picture).convert("RGB")
    fitted = ImageOps.fit(rgb, target, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    # Level 1: a third of the default's time (20 against 69 ms at 512x512), 20% larger.
    fitted.save(buffer, format="PNG", compress_level=1)
    return Normalized(buffer.getvalue(), thumbnail(fitted), target)


def _bad(message: str) -> RequestError:
    return RequestError(ErrorCode.BAD_IMAGE, message, field="init_image", mode="img2img")


def thumbnail(picture: Image.Image) -> bytes:
    """Return a small JPEG of a picture, for the gallery."""
    small = picture.convert("RGB")  # a copy: the picture itself stays as it is
    small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def stored_thumbnail(path: Path) -> bytes:
    """Return the thumbnail of a stored init image (a job resumed after a restart)."""
    with Image.open(path) as picture:
        return thumbnail(picture)


class InitImages:
    """The folder of init images, and the checks a picture passes to get there."""

    def __init__(
        self, folder: Path, settings: Settings, storage: StorageWatch | None = None
    ) -> None:
        """Use ``folder`` (created when missing, private to the agent).

        Args:
            folder: Where stored init images go.
            settings: Bounds, allowed hosts and the fetch timeout.
            storage: Where a picture that cannot be written is told (health, state, log).
        """
        self.folder = folder
        self._settings = settings
        self._storage = storage or StorageWatch({})
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._reading = asyncio.Semaphore(1)
        """One picture decoded at a time: a 16-megapixel picture takes 48 MiB while it is."""

    def path(self, spec: JobSpec) -> Path:
        """Return where a job's init image is stored."""
        return self.folder / spec.init_image

    async def prepare(self, spec: JobSpec) -> JobSpec:
        """Fetch, check, size and store a job's init image; return the job with its file.

        Raises:
            RequestError: ``bad_image`` (the picture, its URL or its fetch), or a storage error.
        """
        source = spec.init_source
        if source is None:
            return spec
        data = source.data if source.data is not None else await self._fetch(source.url or "")
        async with self._reading:
            picture = await asyncio.to_thread(
                normalize, data, spec.width, spec.height, self._settings
            )
        name = f"{spec.id}.{spec.image_key}.png" if spec.image_key else f"{spec.id}.png"
        try:
            await asyncio.to_thread(write_atomically, self.folder / name, picture.png, durable=True)
        except OSError as exc:
            sentence = self._storage.failed("the init image", self.folder, exc)
            code = ErrorCode.STORAGE_FULL if is_full(exc) else ErrorCode.STORAGE_ERROR
            raise RequestError(code, sentence, mode="img2img") from exc
        self._storage.succeeded("the init image")
        # The stored PNG stays in memory with the job: the regenerate button starts from it, and
        # the gallery's thumbnail is ready when the job is answered.
        stored = InitSource(data=picture.png, thumbnail=picture.thumbnail)
        width, height = picture.size
        return dataclasses.replace(
            spec, init_image=name, width=width, height=height, init_source=stored
        )

    async def _fetch(self, url: str) -> bytes:
        """Fetch an init image (its host checked when it was parsed), bounded in size and time.

        Raises:
            RequestError: ``bad_image``: not allowed, not answered, not 200, too large, too slow.
        """
        limit = self._settings.max_image_payload_bytes
        timeout = aiohttp.ClientTimeout(total=self._settings.init_image_fetch_timeout_s)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                # A redirect could lead to a host the setting does not allow.
                session.get(url, allow_redirects=False) as response,
            ):
                if response.status != 200:
                    raise _bad(f"init_image URL answered HTTP {response.status}")
                if (response.content_length or 0) > limit:
                    raise _bad(f"init_image URL's file is over {limit} bytes")
                data = bytearray()
                async for chunk in response.content.iter_chunked(65536):
                    data += chunk
                    if len(data) > limit:
                        raise _bad(f"init_image URL's file is over {limit} bytes")
                return bytes(data)
        except TimeoutError as exc:
            waited = self._settings.init_image_fetch_timeout_s
            raise _bad(f"init_image URL did not answer within {waited:g} s") from exc
        except aiohttp.ClientError as exc:
            raise _bad(f"init_image URL cannot be fetched: {exc}") from exc

    async def thumbnail(self, spec: JobSpec) -> bytes | None:
        """Return a small JPEG of a job's init image, or None (no init image, or it is gone).

        Made when the picture was stored; read back from its file for a job resumed after a
        restart.
        """
        if not spec.init_image:
            return None
        if spec.init_source is not None and spec.init_source.thumbnail is not None:
            return spec.init_source.thumbnail
        try:
            return await asyncio.to_thread(stored_thumbnail, self.path(spec))
        except (OSError, ValueError):
            log.warning("the init image of job %s is gone; the gallery shows no source", spec.id)
            return None

    async def discard(self, spec: JobSpec) -> None:
        """Remove a job's init image (its job is answered, or was never journaled)."""
        if spec.init_image:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self.path(spec).unlink, missing_ok=True)

    def sweep(self, keep: set[str]) -> None:
        """Remove every init image but ``keep`` (at start: those of jobs still waiting)."""
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if entry.name not in keep and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(OSError):
                        (self.folder / entry.name).unlink()
                    log.debug("removed %s: its job is no longer waiting", entry.name)
