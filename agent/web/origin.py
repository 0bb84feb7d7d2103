"""Whether a write comes from another site's page, and whether a body is declared as JSON.

With authentication off (or HTTP Basic credentials a browser remembers), any page the user
visits could post a form to the agent: an HTML form may send ``text/plain``, which reads as
JSON when the page writes ``{"prompt": ...}`` into a field. Two checks close that, each enough
alone: a browser says where a request comes from (``Sec-Fetch-Site``, or ``Origin`` on older
ones), and a JSON body must say so in its Content-Type, which a form cannot send and a script on
another site cannot send without a CORS preflight that the agent never grants. Clients that are
not browsers (curl, SDKs, Home Assistant) send neither header and are not affected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from collections.abc import Mapping

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
