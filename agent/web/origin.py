"""Whether a request comes from another site's page or by a name not the agent's; body types.

With authentication off (or HTTP Basic credentials a browser remembers), any page the user
visits could post a form to the agent: an HTML form may send ``text/plain``, which reads as
JSON when the page writes ``{"prompt": ...}`` into a field. Two checks close that, each enough
alone: a browser says where a request comes from (``Sec-Fetch-Site``, or ``Origin`` on older
ones), and a JSON body must say so in its Content-Type, which a form cannot send and a script on
another site cannot send without a CORS preflight that the agent never grants. Clients that are
not browsers (curl, SDKs, Home Assistant) send neither header and are not affected.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from agent.settings import Settings

SAME_SITE_FETCHES = ("same-origin", "none")
"""``Sec-Fetch-Site`` values of the page's own requests (``none``: typed or bookmarked)."""
DEFAULT_PORTS = {"http": "80", "https": "443"}


def cross_site_write(headers: Mapping[str, str]) -> bool:
    """Return whether a browser sent this request from a page of another origin.

    Home Assistant's ingress serves the page under Home Assistant's own origin, so its requests
    are ``same-origin`` for the browser; a proxy in front that rewrites ``Host`` says the
    original in ``X-Forwarded-Host``, which a page on another site cannot set.

    Args:
        headers: The request's headers, names in lower case.
    """
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None:
        return fetch_site.strip().lower() not in SAME_SITE_FETCHES
    origin = headers.get("origin")
    if origin is None:
        return False  # not a browser, or a browser that sends no Origin on same-origin writes
    parts = urlsplit(origin.strip().lower())
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return True  # "null" (a sandboxed frame, a file), or nothing a page is served from
    port = str(parts.port) if parts.port is not None else DEFAULT_PORTS[parts.scheme]
    served_as = {
        _with_port(host.strip().lower(), parts.scheme)
        for host in (headers.get("host", ""), headers.get("x-forwarded-host", ""))
        if host.strip()
    }
    return f"{parts.hostname}:{port}" not in served_as


def _with_port(host: str, scheme: str) -> str:
    """Return ``host:port`` of a Host header, the scheme's default port when it names none."""
    if host.startswith("["):  # an IPv6 address: [::1]:8080
        address, _, rest = host.partition("]")
        port = rest.removeprefix(":") or DEFAULT_PORTS[scheme]
        return f"{address.removeprefix('[')}:{port}"
    name, _, port = host.partition(":")
    return f"{name}:{port or DEFAULT_PORTS[scheme]}"


def is_json(content_type: str) -> bool:
    """Return whether a Content-Type declares JSON (``application/json`` or ``...+json``)."""
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


def is_form_data(content_type: str) -> bool:
    """Return whether a Content-Type declares ``multipart/form-data`` (a file upload)."""
    return content_type.partition(";")[0].strip().lower() == "multipart/form-data"


class HostAllowlist:
    """The names a request may address the agent by, where no token is needed.

    DNS rebinding: a page on ``attacker.example`` points its name at the agent's address; the
    browser then sends the page's requests to the agent as same-origin, with ``Host:
    attacker.example``. With authentication off nothing else stops them, so a request must
    address the agent by one of its own names (the machine's, the public URL's, those a setting
    adds) or by an IP address, which a rebound name never is.
    """

    def __init__(self, names: Iterable[str]) -> None:
        """Allow ``names`` (any host where one of them is ``*``) and every IP address."""
        self._names = {host_name(name) for name in names}
        self._any = "*" in self._names

    def allows(self, host: str | None) -> bool:
        """Return whether a request whose Host header is ``host`` addresses the agent.

        A request without Host (HTTP/1.0) comes from no browser, and is allowed.
        """
        if self._any or not host or not host.strip():
            return True
        name = host_name(host)
        return name in self._names or _is_address(name)


def host_name(host: str) -> str:
    """Return a Host header's name: without port, brackets or final dot, in lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowlist(settings: Settings) -> HostAllowlist | None:
    """Return the names requests must use where authentication is off; None where it is on.

    With the token required, a rebound page has no token to send.
    """
    if settings.http_auth:
        return None
    machine = socket.gethostname().lower()
    names = {
        "localhost",
        machine,
        f"{machine}.local",
        settings.node_id,
        f"{settings.node_id}.local",
    }
    if settings.public_url:
        names.add(urlsplit(settings.public_url).hostname or "localhost")
    return HostAllowlist([*names, *settings.http_allowed_hosts])
