"""Init images: the pictures image-to-image jobs start from, read, checked, sized and kept.

A request's ``init_image`` and ``strength`` are parsed in :mod:`agent.jobs.init_sources`. Its
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
import contextlib
import dataclasses
import io
import logging
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from PIL import Image, ImageOps, UnidentifiedImageError

from agent.jobs.errors import ErrorCode, RequestError
from agent.jobs.init_sources import InitSource
from agent.machine.disk import StorageWatch, is_full, write_atomically

if TYPE_CHECKING:
    from pathlib import Path

    from agent.jobs.requests import JobSpec
    from agent.settings import Settings

log = logging.getLogger(__name__)

FORMATS = ("PNG", "JPEG", "WEBP")
"""What an init image may be: what cameras, browsers and image APIs send."""
EXIF_ORIENTATION = 0x0112
ROTATED = (5, 6, 7, 8)
"""EXIF orientations that swap width and height."""
TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""What turns a picture of each EXIF orientation upright (as Pillow's ``exif_transpose``, without
writing the EXIF back, which fails on a malformed tag)."""
MAX_SIDE = 8192
"""The longest side a picture may have, whatever its pixel count: a 1 x 16,777,216 PNG is within
the pixel bound and costs 979 MB to decode and turn."""
REDUCED_IN_PLACE = ("RGB", "L")
"""Modes Pillow's reduce takes as they are, writing only the smaller picture."""
STRIP_ROWS = 256
"""Rows converted at a time where a picture must change mode before it is reduced: 4 MiB of a
4096-wide picture."""
MAX_ASPECT = 8
"""How many times longer than the other one side may be: panoramas, not strips."""
THUMBNAIL_SIDE = 256
"""The gallery's thumbnail of what a picture was made from, at most this many pixels a side."""


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
    except RequestError:
        raise
    except Exception as exc:
        # Pillow's parsers raise any kind on hostile bytes: "image file is truncated", "broken
        # data stream", a TypeError from a malformed tag.
        raise _bad(f"init_image cannot be read: {exc}") from exc


def _fitted(picture: Image.Image, width: int, height: int, settings: Settings) -> Normalized:
    _check_shape(picture, settings)
    orientation = exif_orientation(picture)
    rotated = orientation in ROTATED
    upright = picture.size[::-1] if rotated else picture.size
    target = output_size(
        upright, width, height, min_size=settings.min_size, max_size=settings.max_size
    )
    as_stored = target[::-1] if rotated else target
    if picture.format == "JPEG":
        # Decode a large JPEG at a fraction of its size straight away: less memory, less time.
        picture.draft("RGB", as_stored)
    picture.load()
    # Shrunk first, so turning it upright and converting it copy the small picture, not the
    # decoded one: the one full-size buffer is the decoder's.
    small = _reduced(picture, as_stored)
    transpose = TRANSPOSES.get(orientation)
    rgb = (small.transpose(transpose) if transpose is not None else small).convert("RGB")
    fitted = ImageOps.fit(rgb, target, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    # Level 1: a third of the default's time (20 against 69 ms at 512x512), 20% larger.
    fitted.save(buffer, format="PNG", compress_level=1)
    return Normalized(buffer.getvalue(), thumbnail(fitted), target)


def _check_shape(picture: Image.Image, settings: Settings) -> None:
    """Refuse a picture over the pixel bound, a side bound or the aspect bound, before decoding.

    Raises:
        RequestError: ``bad_image``, saying which bound.
    """
    width, height = picture.size
    pixels = width * height
    if pixels > settings.init_image_max_pixels:
        raise _bad(
            f"init_image is {width}x{height} ({pixels} pixels); the limit is "
            f"{settings.init_image_max_pixels} pixels"
        )
    if max(width, height) > MAX_SIDE:
        raise _bad(f"init_image is {width}x{height}; a side may be at most {MAX_SIDE} pixels")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise _bad(f"init_image is {width}x{height}; its sides may differ {MAX_ASPECT}:1 at most")


def exif_orientation(picture: Image.Image) -> int:
    """Return a picture's EXIF orientation (1 to 8), 1 where it has none or it cannot be read.

    A camera's EXIF is untrusted bytes: a tag of the wrong type or a broken directory makes
    Pillow raise all manner of errors, and the picture is still good without it.
    """
    try:
        value = picture.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - Pillow's EXIF parser raises any kind on hostile bytes
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _reduced(picture: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Return the picture shrunk by the largest whole factor that still covers ``size``.

    Where it must change mode on the way (alpha, which Pillow's reduce premultiplies in a
    full-size copy; palettes, bits, 16-bit channels, CMYK), it is converted and reduced a strip
    at a time, so no second full-size buffer is ever made.
    """
    factor = min(picture.width // size[0], picture.height // size[1])
    if factor < 2:
        return picture
    if picture.mode in REDUCED_IN_PLACE:
        return picture.reduce(factor)
    width, height = picture.width // factor, picture.height // factor
    reduced = Image.new("RGB", (width, height))
    rows = factor * max(1, STRIP_ROWS // factor)
    for top in range(0, height * factor, rows):
        box = (0, top, width * factor, min(top + rows, height * factor))
        reduced.paste(picture.crop(box).convert("RGB").reduce(factor), (0, top // factor))
    return reduced


class FetchError(Exception):
    """An init_image URL's file could not be had (the reason, for the log)."""


FETCH_FAILED = "init_image URL could not be fetched as a picture (the agent's log says why)"
"""What a client hears of any failed fetch, or of a fetched file that is no picture."""


def _without_query(url: str) -> str:
    """Return a URL without its query, which may carry a camera's credentials, for the log."""
    return url.partition("?")[0]


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
            try:
                picture = await asyncio.to_thread(
                    normalize, data, spec.width, spec.height, self._settings
                )
            except RequestError as exc:
                if source.url is None:
                    raise
                # What another port answered ("not a PNG") says what runs there: the log alone.
                log.warning("init_image %s not used: %s", _without_query(source.url), exc)
                raise _bad(FETCH_FAILED) from exc
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

        The client hears one reason whatever went wrong; the log says which. Telling "connection
        refused" from "answered HTTP 401" would map the allowed host's ports for anyone.

        Raises:
            RequestError: ``bad_image``: not answered, not 200, too large, too slow.
        """
        try:
            return await self._download(url)
        except FetchError as exc:
            log.warning("init_image %s not fetched: %s", _without_query(url), exc)
            raise _bad(FETCH_FAILED) from exc

    async def _download(self, url: str) -> bytes:
        """Return the file at ``url``, or raise :class:`FetchError` saying why not."""
        limit = self._settings.max_image_payload_bytes
        waited = self._settings.init_image_fetch_timeout_s
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=waited)) as session,
                # A redirect could lead to a host the setting does not allow.
                session.get(url, allow_redirects=False) as response,
            ):
                if response.status != 200:
                    raise FetchError(f"it answered HTTP {response.status}")
                if (response.content_length or 0) > limit:
                    raise FetchError(f"its file is over {limit} bytes")
                data = bytearray()
                async for chunk in response.content.iter_chunked(65536):
                    data += chunk
                    if len(data) > limit:
                        raise FetchError(f"its file is over {limit} bytes")
                return bytes(data)
        except TimeoutError as exc:
            raise FetchError(f"it did not answer within {waited:g} s") from exc
        except aiohttp.ClientError as exc:
            raise FetchError(str(exc) or type(exc).__name__) from exc

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
