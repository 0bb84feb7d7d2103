"""The API token: who may create jobs and read images over HTTP.

Clients present it as they are used to: ``Authorization: Bearer <token>`` (OpenAI SDKs, curl,
the page), HTTP Basic with the token as the password (what Open WebUI sends for
``AUTOMATIC1111_API_AUTH``, any user name), or ``?token=`` (links and event streams, which
cannot set headers).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import TYPE_CHECKING

from agent.web.routing import Access

if TYPE_CHECKING:
    from collections.abc import Mapping


def offered_token(headers: Mapping[str, str], query: Mapping[str, list[str]]) -> str | None:
    """Return the token a request presents, however it presents it, or None.

    Args:
        headers: The request's headers, names in lower case.
        query: The request's query parameters.
    """
    authorization = headers.get("authorization") or ""
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials:
        return credentials.strip()
    if scheme.lower() == "basic" and credentials:
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        _user, _, password = decoded.partition(":")
        return password
    return query.get("token", [""])[0] or None


class TokenGate:
    """Decides, per route, whether a request may go on."""

    def __init__(self, token: str | None, *, public_images: bool) -> None:
        """Require ``token`` (None: nobody needs one); ``public_images`` opens image reads."""
        self._token = token
        self._public_images = public_images

    def allows(
        self, access: Access, headers: Mapping[str, str], query: Mapping[str, list[str]]
    ) -> bool:
        """Return whether a request with these headers and query may use a route."""
        if self._token is None or access is Access.OPEN:
            return True
        if access is Access.READ and self._public_images:
            return True
        offered = offered_token(headers, query) or ""
        return hmac.compare_digest(offered.encode(), self._token.encode())
