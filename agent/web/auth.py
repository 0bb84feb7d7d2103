"""The API token: who may use jobs and the APIs, and read images, over HTTP.

Secure by default: without ``api_token`` the agent generates one on first start into its state
folder (mode 0600, like the broker's passwords), and every job route and API needs it. An empty
token is never "no authentication": an empty ``api_token`` stops the start with a message, and
an empty token file (what a full disk leaves) is replaced by a new token, or stops the start
when it cannot be written. Clients present the token as they are used to: ``Authorization:
Bearer <token>`` (OpenAI SDKs, curl, the page) or HTTP Basic with the token as the password
(what Open WebUI sends for ``AUTOMATIC1111_API_AUTH``, any user name). Never in a URL: URLs end
up in histories, logs and shared links.

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
import secrets
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import TYPE_CHECKING

from agent.machine.disk import write_atomically
from agent.settings import SettingsError
from agent.web.routing import Access

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from agent.settings import Settings

log = logging.getLogger(__name__)

SIGNATURE_CHARS = 32
"""Hex characters of an image URL's signature (128 bits)."""
TOKEN_BYTES = 24
"""Random bytes of a generated token (192 bits; 32 URL-safe characters)."""


def agent_token(settings: Settings) -> str | None:
    """Return the token HTTP clients need, creating it on first start; None when auth is off.

    Raises:
        SettingsError: The token is set but empty, or its file can be neither read nor written.
    """
    if not settings.http_auth:
        log.warning(
            "HTTP authentication is off (EDGEAI_HTTP_AUTH=false): anyone who reaches port %d "
            "can create and cancel jobs and read every image",
            settings.http_port,
        )
        return None
    if settings.api_token is not None:
        token = settings.api_token.get_secret_value().strip()
        if not token:
            raise SettingsError(
                "api_token is set but empty; set a token, or unset EDGEAI_API_TOKEN to have one "
                "generated (EDGEAI_HTTP_AUTH=false turns authentication off)"
            )
        return token
    path = settings.api_token_path
    try:
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        token = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"cannot read the API token file {path}: {exc}") from exc
    else:
        if token:
            return token
        log.warning("the API token file %s is empty; generating a new token", path)
    return _write_new_token(path)


def _write_new_token(path: Path) -> str:
    """Write a new token to ``path`` (0600) in one rename: never half a file, never an empty one.

    Raises:
        SettingsError: It cannot be written (a full disk, a read-only folder).
    """
    token = secrets.token_urlsafe(TOKEN_BYTES)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomically(path, f"{token}\n".encode("ascii"), durable=True)
    except OSError as exc:
        raise SettingsError(
            f"cannot write the API token to {path}: {exc}; free some space or set EDGEAI_API_TOKEN"
        ) from exc
    log.info("generated the API token into %s", path)
    return token


def offered_token(headers: Mapping[str, str]) -> str | None:
    """Return the token a request presents in its Authorization header, or None.

    Args:
        headers: The request's headers, names in lower case.
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
    return None


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
        """Return whether ``signature`` is the one of ``name`` (any text: compared as bytes)."""
        expected = self.signature(name)
        offered = signature.encode("utf-8", "surrogateescape")
        return expected is not None and hmac.compare_digest(expected.encode(), offered)


class TokenGate:
    """Decides, per route, whether a request may go on."""

    def __init__(
        self,
        token: str | None,
        *,
        public_images: bool,
        signer: UrlSigner,
        ingress_peer: IPv4Address | IPv6Address | None = None,
    ) -> None:
        """Require ``token`` (None: nobody needs one); ``public_images`` opens image reads.

        Args:
            token: What clients must present; None when authentication is off.
            public_images: Images and the gallery need nothing.
            signer: Checks image URLs' signatures.
            ingress_peer: Home Assistant's ingress gateway: connections from this address are
                let in, Home Assistant having signed the user in. Only the connection's own
                address counts, never a header a client could write.

        Raises:
            ValueError: ``token`` is empty: that would let every request through.
        """
        if token is not None and not token:
            raise ValueError("an empty token would let anyone in")
        self._token = token
        self._public_images = public_images
        self._signer = signer
        self._ingress_peer = ingress_peer

    def allows(
        self,
        access: Access,
        headers: Mapping[str, str],
        query: Mapping[str, list[str]],
        params: Mapping[str, str],
        peer: str | None = None,
    ) -> bool:
        """Return whether a request with these headers, query and path parameters may go on.

        ``peer`` is the address of the connection it came on.
        """
        if self._token is None or access is Access.OPEN or self.from_ingress(peer):
            return True
        if access in (Access.IMAGE, Access.GALLERY) and self._public_images:
            return True
        if access is Access.IMAGE:
            name, signature = params.get("name"), query.get("sig", [""])[0]
            if name and signature and self._signer.valid(name, signature):
                return True
        offered = (offered_token(headers) or "").encode("utf-8", "surrogateescape")
        return hmac.compare_digest(offered, self._token.encode())

    def from_ingress(self, peer: str | None) -> bool:
        """Return whether ``peer`` (a connection's address) is Home Assistant's ingress gateway."""
        if self._ingress_peer is None or peer is None:
            return False
        try:
            return ip_address(peer) == self._ingress_peer
        except ValueError:
            return False
