"""Pictures for image-to-image tests: real files of each format, and broken ones."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from functools import cache

import numpy as np
from PIL import Image


def picture(
    width: int = 320, height: int = 256, seed: int = 1, fmt: str = "PNG", orientation: int = 1
) -> bytes:
    """Return a noisy picture of this size as a file (PNG, JPEG, WEBP or GIF).

    ``orientation`` is its EXIF orientation, as a phone writes it (6: turned a quarter).
    """
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8")
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(buffer, format=fmt, exif=exif)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    """Return a file as base64 text, as a request carries it."""
    return base64.b64encode(data).decode("ascii")


def png_chunks(width: int, height: int, compressed: bytes) -> bytes:
    """Return a PNG file of this declared size around already compressed RGB rows."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", compressed)
        + chunk(b"IEND", b"")
    )


def png_header_only(width: int, height: int) -> bytes:
    """Return a PNG that declares a size and carries one empty compressed row: a bomb's head."""
    return png_chunks(width, height, zlib.compress(b"\0" * 64))


def zip_bomb_png(side: int = 6000) -> bytes:
    """Return a valid PNG of ``side`` x ``side`` black pixels: 100 KB that decode to 108 MB."""
    row = b"\0" + b"\0" * side * 3
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    return png_chunks(side, side, data)


@cache
def deep_png(side: int = 4096) -> bytes:
    """The worst picture accepted: ``side`` x ``side``, 16 bits per channel, RGBA, stripes
    (small as a file, 64 MiB once decoded)."""
    stripes = b"".join((x * 4096).to_bytes(2, "big") * 3 + b"\xff\xff" for x in range(16))
    row = b"\0" + stripes * (side // 16)
    compressor = zlib.compressobj(9)
    compressed = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    png = png_chunks(side, side, compressed)
    # png_chunks writes 8-bit RGB: make its header 16-bit RGBA (bit depth 16, colour type 6).
    header_at = png.index(b"IHDR") + 4
    header = png[header_at : header_at + 13]
    new_header = header[:8] + bytes([16, 6]) + header[10:]
    crc = zlib.crc32(b"IHDR" + new_header).to_bytes(4, "big")
    return png[:header_at] + new_header + crc + png[header_at + 17 :]
