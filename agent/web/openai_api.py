"""OpenAI's image API: ``POST /v1/images/generations`` and ``GET /v1/models``.

What Open WebUI, LibreChat, SillyTavern and any OpenAI SDK send, answered in OpenAI's own shapes,
errors included (``{"error": {"message", "type", "param", "code"}}``). ``model`` may be anything:
the loaded model answers. The agent's own fields (``seed``, ``steps``, ``negative_prompt``,
``guidance_scale``) ride along as extra body fields.
"""

from __future__ import annotations

import base64
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict

from agent.web.generation import ApiError, Generation, parse_body, parse_size
from agent.web.routing import Access, Request, Response, Routes

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 429: "requests"}
"""OpenAI's ``type`` per status; the rest are ``server_error``."""


class OpenAIErrors:
    """Errors as OpenAI words them."""

    def error(self, status: int, code: str, message: str, param: str | None = None) -> Response:
        """Return ``{"error": {"message", "type", "param", "code"}}``."""
        if code == "unauthorized":
            code = "invalid_api_key"
        kind = ERROR_TYPES.get(status, "server_error")
        return Response.json(
            status, {"error": {"message": message, "type": kind, "param": param, "code": code}}
        )


class ImageRequest(BaseModel):
    """The body of ``POST /v1/images/generations`` (OpenAI's fields and the agent's)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    prompt: str
    model: str | None = None
    n: int | None = None
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    # OpenAI's, accepted and not used: one model, one quality.
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    background: str | None = None
    moderation: str | None = None
    output_compression: int | None = None
    safety_identifier: str | None = None
    partial_images: int | None = None
    stream: bool | None = None
    # The agent's own.
    seed: int | None = None
    steps: int | None = None
    negative_prompt: str | None = None
    guidance_scale: float | None = None


class OpenAIApi:
    """OpenAI's image endpoints."""

    def __init__(self, generation: Generation) -> None:
        """Answer through ``generation``."""
        self._generation = generation
        self._errors = OpenAIErrors()

    def register(self, routes: Routes) -> None:
        """Add the routes (a token, when set, is needed for every one)."""
        for path, handler in (
            ("/v1/models", self.models),
            ("/v1/models/(?P<model>.+)", self.model),
        ):
            routes.add("GET", path, handler, access=Access.TOKEN, shape=self._errors)
        routes.add(
            "POST", "/v1/images/generations", self.generate, access=Access.TOKEN, shape=self._errors
        )

    def _model_entry(self) -> dict[str, object]:
        return {
            "id": self._generation.settings.model,
            "object": "model",
            "created": 0,
            "owned_by": "edgeai-agent",
        }

    async def models(self, _request: Request) -> Response:
        """``GET /v1/models``: the one loaded model."""
        return Response.json(200, {"object": "list", "data": [self._model_entry()]})

    async def model(self, request: Request) -> Response:
        """``GET /v1/models/<id>``: the loaded model, whatever id is asked for."""
        del request
        return Response.json(200, self._model_entry())

    async def generate(self, request: Request) -> Response:
        """``POST /v1/images/generations``."""
        try:
            body = self._parse(request)
            settings = self._generation.settings
            count = 1 if body.n is None else body.n
            self._generation.check_count(count, "n")
            width, height = parse_size(body.size, settings)
            fields = {
                "prompt": body.prompt,
                "negative_prompt": body.negative_prompt,
                "width": width,
                "height": height,
                "steps": body.steps,
                "guidance_scale": body.guidance_scale,
                "seed": body.seed,
                "format": body.output_format or "png",
                "output": "url",
            }
            specs = self._generation.specs(
                {key: value for key, value in fields.items() if value is not None}, count
            )
            pictures = await self._generation.run(specs, api="openai")
        except ApiError as exc:
            return self._errors.error(exc.status, exc.code, exc.message, _openai_param(exc.param))
        data = []
        for picture in pictures:
            entry: dict[str, object] = {"revised_prompt": picture.spec.prompt}
            if body.response_format == "url":
                entry["url"] = picture.reply["image"]["url"]
            else:
                entry["b64_json"] = base64.b64encode(picture.data).decode("ascii")
            data.append(entry)
        return Response.json(200, {"created": int(time.time()), "data": data})

    @staticmethod
    def _parse(request: Request) -> ImageRequest:
        body = parse_body(ImageRequest, request)
        if body.stream:
            raise ApiError(400, "invalid_request", "streaming is not supported", "stream")
        return body


def _openai_param(param: str | None) -> str | None:
    """Name a field as the client sent it: width and height came in as ``size``."""
    return "size" if param in ("width", "height") else param
