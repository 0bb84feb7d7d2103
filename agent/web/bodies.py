"""Request bodies read within their route's bound: JSON bodies, and multipart forms field by field.

Every byte of a body counts against the bound as it arrives, chunked bodies too, and a form's
preamble and epilogue as much as its fields.
"""

from __future__ import annotations

import asyncio

from aiohttp import BodyPartReader, MultipartReader, StreamReader, web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError


class TooLargeError(Exception):
    """A body grew past its route's bound while it was read."""


class BadFormError(Exception):
    """A multipart body that cannot be read as a form."""


FORM_FIELDS = 64
"""Fields a form may have at most: each costs a little, and no client sends more."""
FORM_READ_CHUNK = 2**16
"""The least high-water mark of a form's reader (bytes it holds before it would pause)."""


async def read_form(raw: web.Request, limit: int) -> dict[str, list[bytes]]:
    """Read a ``multipart/form-data`` body within ``limit`` bytes, then its fields.

    The whole body is read first, within the bound: a form's preamble and epilogue, which a
    multipart reader skips unseen, count like every other byte.

    Raises:
        TooLargeError: The body passes ``limit``.
        BadFormError: It is not a form: no boundary, a part that is not a field, too many,
            a part's headers malformed or too long.
    """
    body = await read_within(raw, limit)
    # A reader holding the whole body at once: its high-water mark above the body's size, or
    # feeding it would ask a protocol that is not there to pause.
    high_water = max(FORM_READ_CHUNK, len(body))
    content = StreamReader(BaseProtocol(asyncio.get_running_loop()), high_water)
    content.feed_data(body)
    content.feed_eof()
    fields: dict[str, list[bytes]] = {}
    count = 0
    try:
        reader = MultipartReader(raw.headers, content)
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or not part.name:
                raise BadFormError("every part of a form must be a named field")
            count += 1
            if count > FORM_FIELDS:
                raise BadFormError(f"a form has {FORM_FIELDS} fields at most")
            fields.setdefault(part.name, []).append(bytes(await part.read()))
    except (AssertionError, ValueError, RuntimeError, HttpProcessingError) as exc:
        # aiohttp's reader asserts on a missing boundary, raises on malformed parts and on
        # a part's headers too many or too long (BadHttpMessage).
        raise BadFormError(f"the form cannot be read: {exc or type(exc).__name__}") from exc
    return fields


async def read_within(raw: web.Request, limit: int) -> bytes:
    """Read a request's body, stopping as soon as it passes ``limit`` (chunked ones too).

    Raises:
        TooLargeError: The body is over ``limit`` bytes.
    """
    body = bytearray()
    while chunk := await raw.content.readany():
        body += chunk
        if len(body) > limit:
            raise TooLargeError
    return bytes(body)
