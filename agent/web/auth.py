"""The API token: who may create jobs and read images over HTTP.

Secure by default: without ``api_token`` the agent generates one on first start into its state
folder (mode 0600, like the broker's passwords), and creating or cancelling jobs needs it.
Clients present it as they are used to: ``Authorization: Bearer <token>`` (OpenAI SDKs, curl,
the page), HTTP Basic with the token as the password (what Open WebUI sends for
``AUTOMATIC1111_API_AUTH``, any user name), or ``?token=`` (the page's first visit, links).

Image URLs the agent hands out (results, ``<base>/image/url``, the gallery) carry a signature
that opens that one image: Home Assistant's image entity fetches them with no token, and a name
that can be guessed (clients choose job ids) opens nothing without it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
from typing import TYPE_CHECKING

from agent.web.routing import Access

if TYPE_CHECKING:
    from collections.abc import Mapping

    from agent.settings import Settings

log = logging.getLogger(__name__)

SIGNATURE_CHARS = 32
"""Hex characters of an image URL's signature (128 bits)."""


def agent_token(settings: Settings) -> str | None:
    """Return the token HTTP clients need, creating it on first start; None when auth is off."""
    if not settings.http_auth:
        log.warning(
            "HTTP authentication is off (EDGEAI_HTTP_AUTH=false): anyone who reaches port %d "
            "can create and cancel jobs and read every image",
            settings.http_port,
        )
        return None
    if settings.api_token is not None:
        return settings.api_token.get_secret_value()
    path = settings.api_token_path
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="ascii") as file:
        file.write(token + "\n")
    log.info("generated the API token into %s", path)
    return token


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


class UrlSigner:
    """Signs image file names, so that their URLs open them without the token."""

    def __init__(self, token: str | None) -> None:
        """Sign with a key derived from ``token``; None signs nothing (nothing needs it)."""
        self._key = None if token is None else hashlib.sha256(b"edgeai-image:" + token.encode())

    def signature(self, name: str) -> str | None:
        """Return the signature of an image file name, or None when URLs need none."""
        if self._key is None:
            return None
        digest = hmac.new(self._key.digest(), name.encode(), hashlib.sha256)
        return digest.hexdigest()[:SIGNATURE_CHARS]

    def valid(self, name: str, signature: str) -> bool:
        """Return whether ``signature`` is the one of ``name``."""
        expected = self.signature(name)
        return expected is not None and hmac.compare_digest(expected, signature)


class TokenGate:
    """Decides, per route, whether a request may go on."""

    def __init__(self, token: str | None, *, public_images: bool, signer: UrlSigner) -> None:
        """Require ``token`` (None: nobody needs one); ``public_images`` opens image reads."""
        self._token = token
        self._public_images = public_images
        self._signer = signer

    def allows(
        self,
        access: Access,
        headers: Mapping[str, str],
        query: Mapping[str, list[str]],
        params: Mapping[str, str],
    ) -> bool:
        """Return whether a request with these headers, query and path parameters may go on."""
        if self._token is None or access is Access.OPEN:
            return True
        if access is Access.READ:
            if self._public_images:
                return True
            name, signature = params.get("name"), query.get("sig", [""])[0]
            if name and signature and self._signer.valid(name, signature):
                return True
        offered = offered_token(headers, query) or ""
        return hmac.compare_digest(offered.encode(), self._token.encode())
