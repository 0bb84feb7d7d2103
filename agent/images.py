"""Image encoding, the image folder with its retention limits, and image URLs."""

from __future__ import annotations

import io
import logging
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.machine.disk import free_bytes, write_atomically

if TYPE_CHECKING:
    from pathlib import Path

    from PIL.Image import Image

    from agent.settings import ImageFormat

log = logging.getLogger(__name__)

EXTENSIONS: dict[str, str] = {"png": "png", "jpeg": "jpg", "webp": "webp"}
CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}
FILE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}(\.[0-9a-f]{16})?(\.source)?\.(png|jpg|webp)$")
"""Names of files the agent writes (a job id, the job's image key, ``.source`` for the thumbnail
of the picture an image-to-image job started from, an extension); nothing else is ever served."""
IMAGE_KEY_BYTES = 8
"""Random bytes of a job's image key (16 hex characters in its file name)."""


def encode_image(image: Image, image_format: ImageFormat, quality: int) -> bytes:
    """Encode a picture; the same picture always gives the same bytes (no time stamps).

    Args:
        image: The picture.
        image_format: png, jpeg or webp.
        quality: JPEG and WebP quality, 1-100.

    Returns:
        The encoded file.
    """
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG")
    elif image_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="WEBP", quality=quality)
    return buffer.getvalue()


def file_name(
    job_id: str, image_format: ImageFormat, key: str = "", *, source: bool = False
) -> str:
    """Return the file name of a job's image: its id, its image key and the format's extension.

    The key is new for each admitted job, so a client that reuses an id later gets a new file:
    a URL handed out for the earlier job goes on serving that job's picture (or nothing, once
    retention removed it), never the new one.

    Args:
        job_id: The job's id.
        image_format: The file's format.
        key: The job's image key.
        source: The thumbnail of the picture an image-to-image job started from.
    """
    stem = f"{job_id}.{key}" if key else job_id
    if source:
        stem += ".source"
    return f"{stem}.{EXTENSIONS[image_format]}"


@dataclass(frozen=True)
class StoredImage:
    """An image file in the image folder."""

    name: str
    size: int
    mtime: float


class ImageStore:
    """The image folder: writes images atomically and keeps it under its count and byte limits."""

    def __init__(
        self, folder: Path, keep_count: int, keep_bytes: int, keep_free_bytes: int = 0
    ) -> None:
        """Create the store; the folder is created when missing.

        Args:
            folder: Where images go.
            keep_count: Most files kept.
            keep_bytes: Most bytes kept.
            keep_free_bytes: Free space left on the folder's file system at least: the oldest
                images go first to keep it.
        """
        self.folder = folder
        self._keep_count = keep_count
        self._keep_bytes = keep_bytes
        self._keep_free_bytes = keep_free_bytes
        folder.mkdir(parents=True, exist_ok=True)

    def save(self, name: str, data: bytes) -> None:
        """Write one image, then delete the oldest images beyond the limits.

        Args:
            name: A name from :func:`file_name`.
            data: The encoded image.
        """
        if not FILE_NAME.match(name):
            raise ValueError(f"not an image file name: {name!r}")
        self.make_room(len(data) + self._keep_free_bytes)
        # In one rename: the HTTP server never serves half a file.
        write_atomically(self.folder / name, data)
        self.prune(keep=name)

    def list(self) -> list[StoredImage]:
        """Return the images in the folder, newest first."""
        images = []
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if FILE_NAME.match(entry.name) and entry.is_file(follow_symlinks=False):
                    stat = entry.stat(follow_symlinks=False)
                    images.append(StoredImage(entry.name, stat.st_size, stat.st_mtime))
        return sorted(images, key=lambda image: image.mtime, reverse=True)

    def make_room(self, wanted: int, keep: str | None = None) -> None:
        """Delete the oldest images until ``wanted`` bytes are free (or no image is left).

        Args:
            wanted: Free bytes wanted on the folder's file system.
            keep: A file never deleted (the one just written).
        """
        for image in reversed(self.list()):
            if (free_bytes(self.folder) or 0) >= wanted:
                return
            if image.name != keep:
                (self.folder / image.name).unlink(missing_ok=True)
                log.info("retention removed %s to keep %d bytes free", image.name, wanted)

    def prune(self, keep: str | None = None) -> None:
        """Delete the oldest images until the folder is within its limits, free space included.

        Args:
            keep: A file never deleted (the one just written), even if it alone is over the limit.
        """
        total = 0
        for index, image in enumerate(self.list()):
            total += image.size
            if image.name != keep and (index >= self._keep_count or total > self._keep_bytes):
                try:
                    (self.folder / image.name).unlink()
                except FileNotFoundError:
                    continue
                total -= image.size
                log.debug("retention removed %s", image.name)
        self.make_room(self._keep_free_bytes, keep=keep)
