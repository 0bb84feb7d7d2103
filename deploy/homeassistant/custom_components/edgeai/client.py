"""The agent's OpenAI-compatible API, as this integration uses it."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import aiohttp

from .const import CHECK_TIMEOUT_S, REQUEST_TIMEOUT_S


class AgentError(Exception):
    """The agent refused or failed a request; the message is the agent's own."""

    def __init__(self, message: str, code: str | None = None, status: int | None = None) -> None:
        """Keep the agent's stable error code and the HTTP status beside the message."""
        super().__init__(message)
        self.code = code
        self.status = status


class CannotConnectError(AgentError):
    """The agent could not be reached."""


class InvalidAuthError(AgentError):
    """The agent refused the token."""


@dataclass(frozen=True)
class GeneratedImage:
    """One image and what the agent says about it."""

    data: bytes
    model: str
    revised_prompt: str | None


class AgentClient:
    """Talks to one agent: its URL and its API token."""

    def __init__(self, session: aiohttp.ClientSession, url: str, token: str) -> None:
        """Use ``session`` for every request."""
        self._session = session
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def model(self) -> str:
        """Return the model the agent serves; checks the URL and the token on the way.

        Raises:
            CannotConnectError: Nothing answers there.
            InvalidAuthError: The token is wrong.
            AgentError: Something else answers (not an edgeai agent).
        """
        body = await self._request("GET", "/v1/models", None, CHECK_TIMEOUT_S)
        try:
            return str(body["data"][0]["id"])
        except (KeyError, IndexError, TypeError) as exc:
            raise AgentError(f"{self.url} does not answer like an edgeai agent") from exc

    async def models(self) -> list[str]:
        """Return the names of the models installed on the agent, its default first.

        Raises:
            AgentError: The agent cannot be asked (unreachable, wrong token).
        """
        body = await self._request("GET", "/v1/models", None, CHECK_TIMEOUT_S)
        try:
            return [str(model["id"]) for model in body["data"]]
        except (KeyError, TypeError) as exc:
            raise AgentError(f"{self.url} does not answer like an edgeai agent") from exc

    async def generate(
        self, prompt: str, size: str, steps: int, model: str | None = None
    ) -> GeneratedImage:
        """Generate one PNG image (OpenAI's ``images/generations``, base64 back).

        ``model``: an installed model's name; None: the agent's default.
        """
        body: dict[str, Any] = {
            "prompt": prompt,
            "size": size,
            "n": 1,
            "response_format": "b64_json",
            "output_format": "png",
            "steps": steps,
        }
        if model:
            body["model"] = model
        response = await self._request("POST", "/v1/images/generations", body, REQUEST_TIMEOUT_S)
        return await self._image(response, model)

    async def edit(  # noqa: PLR0913 - the picture's three facts, and the request's
        self,
        prompt: str,
        picture: bytes,
        filename: str,
        mime_type: str,
        steps: int,
        *,
        model: str | None = None,
    ) -> GeneratedImage:
        """Restyle a picture as the prompt says (OpenAI's ``images/edits``, base64 back).

        The output takes the picture's own size, within the agent's bounds.
        """
        form = aiohttp.FormData()
        for name, value in {
            "prompt": prompt,
            "n": "1",
            "size": "auto",
            "response_format": "b64_json",
            "output_format": "png",
            "steps": str(steps),
            **({"model": model} if model else {}),
        }.items():
            form.add_field(name, value)
        form.add_field("image", picture, filename=filename, content_type=mime_type)
        body = await self._request("POST", "/v1/images/edits", form, REQUEST_TIMEOUT_S)
        return await self._image(body, model)

    async def _image(self, body: Any, model: str | None) -> GeneratedImage:  # noqa: ANN401 - the agent's JSON
        """Return the picture of an answer, and the model that drew it (None: the default)."""
        item = body["data"][0]
        drawn = body.get("model") or model or await self.model()
        return GeneratedImage(base64.b64decode(item["b64_json"]), drawn, item.get("revised_prompt"))

    async def _request(
        self,
        method: str,
        path: str,
        payload: dict[str, Any] | aiohttp.FormData | None,
        seconds: float,
    ) -> Any:  # noqa: ANN401 - the JSON the agent answers
        body = {"data": payload} if isinstance(payload, aiohttp.FormData) else {"json": payload}
        try:
            async with self._session.request(
                method,
                self.url + path,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=seconds),
                **body,
            ) as response:
                try:
                    body = await response.json(content_type=None)
                except ValueError:
                    body = None
                if response.status == 401:
                    raise InvalidAuthError("the agent refused the token", "unauthorized", 401)
                if response.status >= 400:
                    error = (body or {}).get("error", {}) if isinstance(body, dict) else {}
                    message = error.get("message") or f"the agent answered {response.status}"
                    raise AgentError(message, error.get("code"), response.status)
                return body
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise CannotConnectError(f"cannot reach the agent at {self.url}: {exc}") from exc
