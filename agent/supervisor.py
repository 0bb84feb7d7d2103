"""Home Assistant's Supervisor, as an app asks it: the broker it hands out, and discovery.

An app reaches the Supervisor at ``http://supervisor`` with the ``SUPERVISOR_TOKEN`` it was
started with. Two calls are used: ``GET /services/mqtt`` (the Mosquitto app's broker and the
credentials made for this app, ``services: mqtt:want``) and ``POST /discovery`` (this agent's
address and API token, ``discovery: [edgeai]``), which Home Assistant turns into an offer of the
edgeai integration. Calls block; the agent makes them before its loop starts or on a thread.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

SUPERVISOR_URL = "http://supervisor"
TIMEOUT_S = 10.0
DISCOVERY_SERVICE = "edgeai"
"""The service name config.yaml lists under ``discovery``: the integration's domain."""


class SupervisorError(Exception):
    """The Supervisor could not be asked, or refused."""


class Supervisor:
    """One app's client of the Supervisor's API."""

    def __init__(self, token: str, url: str = SUPERVISOR_URL) -> None:
        """Ask ``url`` (a stand-in's, in tests) with ``token`` as the Bearer."""
        self._token = token
        self.url = url.rstrip("/")

    def mqtt_service(self) -> dict[str, Any] | None:
        """Return the broker the Supervisor hands out, or None when there is none.

        Raises:
            SupervisorError: The Supervisor cannot be asked, or refused for another reason.
        """
        try:
            data = self._call("GET", "/services/mqtt")
        except urllib.error.HTTPError as exc:
            if exc.code in (400, 404):  # no MQTT service is provided
                return None
            raise SupervisorError(f"the Supervisor's services API answered {exc.code}") from exc
        return data if isinstance(data, dict) and data.get("host") else None

    def announce(self, config: dict[str, Any]) -> str:
        """Post the agent's discovery message; return its id.

        The Supervisor keeps one message per app and service: a second post with another config
        replaces the first, and Home Assistant is told again; the same config changes nothing.

        Raises:
            SupervisorError: The Supervisor cannot be asked, or refused.
        """
        try:
            message = {"service": DISCOVERY_SERVICE, "config": config}
            data = self._call("POST", "/discovery", message)
        except urllib.error.HTTPError as exc:
            raise SupervisorError(f"the Supervisor's discovery API answered {exc.code}") from exc
        return str(data.get("uuid", "")) if isinstance(data, dict) else ""

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:  # noqa: ANN401 - the Supervisor's JSON
        """Return the ``data`` of the Supervisor's answer.

        Raises:
            urllib.error.HTTPError: The Supervisor answered with an error status.
            SupervisorError: It could not be reached, or its answer is not JSON.
        """
        request = urllib.request.Request(  # noqa: S310 - the Supervisor's fixed http:// address
            self.url + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"Bearer {self._token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # noqa: S310
                answer = json.loads(response.read())
        except urllib.error.HTTPError:
            raise
        except (OSError, ValueError) as exc:
            raise SupervisorError(f"cannot reach the Supervisor at {self.url}: {exc}") from exc
        return answer.get("data") if isinstance(answer, dict) else None
