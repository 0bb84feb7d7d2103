"""OpenAI's image API: ``POST /v1/images/generations``, ``/v1/images/edits``, ``GET /v1/models``.

What Open WebUI, LibreChat, SillyTavern and any OpenAI SDK send, answered in OpenAI's own shapes,
errors included (``{"error": {"message", "type", "param", "code"}}``). ``model`` names an
installed model (``GET /v1/models`` lists them); OpenAI's own names (``dall-e-3``,
``gpt-image-1``), which clients send by default, get the default model. The agent's own fields
(``seed``, ``steps``, ``negative_prompt``, ``guidance_scale``, ``loras``, and ``strength`` for
edits) ride along as extra body fields.

An edit is image-to-image: the uploaded ``image`` (the first, when several are sent as
``image[]``) is the picture to start from, the prompt says what to make of it. Inpainting is not
built, so a ``mask`` is refused rather than ignored.
"""

from __future__ import annotations

import base64
import json
import time
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from agent.jobs.errors import field_error
from agent.web.generation import ApiError, Generation, Picture, parse_body, parse_size
from agent.web.routing import Access, Body, Request, Response, Routes

if TYPE_CHECKING:
    from agent.jobs.model_choice import ModelChoice
    from agent.model.catalog import InstalledModel

OPENAI_MODEL_PREFIXES = ("dall-e-", "gpt-image-")
"""OpenAI's own image models: clients send these by default, and get the default model."""

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


class OpenAIImageFields(BaseModel):
    """The fields generations and edits share (OpenAI's and the agent's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str
    model: str | None = None
    n: int | None = None
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    # OpenAI's, accepted and not used: one model, one quality.
    quality: str | None = None
    user: str | None = None
    background: str | None = None
    moderation: str | None = None
    output_compression: int | None = None
    partial_images: int | None = None
    stream: bool | None = None
    # The agent's own.
    seed: int | None = None
    steps: int | None = None
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    loras: list[dict[str, Any]] | str | None = None
    """LoRA styles, ``[{"name", "weight"}]`` (JSON text in an edit's form)."""

    def job_fields(self, choice: ModelChoice) -> dict[str, object]:
        """Return the MQTT request's fields this body sets (the rest take their defaults)."""
        fields: dict[str, object] = {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "seed": self.seed,
            "format": self.output_format or "png",
            "output": "url",
            "model": self._installed_model(choice),
            "loras": self._loras(),
        }
        return {key: value for key, value in fields.items() if value is not None}

    def _installed_model(self, choice: ModelChoice) -> str | None:
        """Return the installed model ``model`` names; None for OpenAI's own names (the default).

        Raises:
            ApiError: It names neither an installed model nor one of OpenAI's.
        """
        if self.model is None or self.model.startswith(OPENAI_MODEL_PREFIXES):
            return None
        if choice.catalog.find(self.model) is None:
            names = ", ".join(choice.catalog.names)
            message = f"the model {self.model[:64]!r} does not exist; installed: {names}"
            raise ApiError(400, "unknown_model", message, "model")
        return self.model

    def _loras(self) -> object:
        """Return ``loras`` as the request's field: a form carries it as JSON text."""
        if not isinstance(self.loras, str):
            return self.loras
        try:
            return json.loads(self.loras)
        except ValueError as exc:
            message = 'loras is not JSON: send [{"name": ..., "weight": ...}]'
            raise ApiError(400, "invalid_request", message, "loras") from exc


class ImageRequest(OpenAIImageFields):
    """The JSON body of ``POST /v1/images/generations``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    style: str | None = None
    safety_identifier: str | None = None


class EditRequest(OpenAIImageFields):
    """The text fields of ``POST /v1/images/edits`` (a form: numbers come as text)."""

    input_fidelity: str | None = None
    strength: float | None = None


IMAGE_FIELDS = ("image", "image[]")
"""Where OpenAI's clients put the picture: ``image``, or ``image[]`` for several."""


class OpenAIApi:
    """OpenAI's image endpoints."""

    def __init__(self, generation: Generation) -> None:
        """Answer through ``generation``."""
        self._generation = generation
        self._catalog = generation.choice.catalog
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
        routes.add(
            "POST",
            "/v1/images/edits",
            self.edit,
            access=Access.TOKEN,
            shape=self._errors,
            body=Body(pictures=True, multipart=True),
        )

    def _model_entry(self, model: InstalledModel) -> dict[str, object]:
        return {
            "id": model.name,
            "object": "model",
            "created": 0,
            "owned_by": "edgeai-agent",
            "source": model.source,
            "family": model.family.name if model.family else None,
            "default": model.name == self._catalog.default,
        }

    async def models(self, _request: Request) -> Response:
        """``GET /v1/models``: the installed models, the default first."""
        data = [self._model_entry(model) for model in self._catalog]
        return Response.json(200, {"object": "list", "data": data})

    async def model(self, request: Request) -> Response:
        """``GET /v1/models/<id>``: an installed model (OpenAI's own names: the default)."""
        wanted = request.params.get("model", "")
        if wanted.startswith(OPENAI_MODEL_PREFIXES):
            wanted = self._catalog.default
        found = self._catalog.find(wanted)
        if found is None:
            message = f"the model {wanted[:64]!r} does not exist"
            return self._errors.error(404, "model_not_found", message, "model")
        return Response.json(200, self._model_entry(found))

    async def generate(self, request: Request) -> Response:
        """``POST /v1/images/generations``."""
        try:
            body = self._parse(request)
            fields = body.job_fields(self._generation.choice)
            fields["width"], fields["height"] = parse_size(body.size, self._generation.settings)
            pictures = await self._run(body, fields)
        except ApiError as exc:
            return self._errors.error(exc.status, exc.code, exc.message, _openai_param(exc.param))
        return _images(pictures, body.response_format)

    async def _run(self, body: OpenAIImageFields, fields: dict[str, object]) -> list[Picture]:
        """Generate ``n`` pictures of one request's fields."""
        count = 1 if body.n is None else body.n
        self._generation.check_count(count, "n")
        specs = self._generation.specs(fields, count)
        return await self._generation.run(specs, api="openai")

    async def edit(self, request: Request) -> Response:
        """``POST /v1/images/edits``: the uploaded picture restyled as the prompt says."""
        try:
            body, picture = self._parse_edit(request)
            fields = body.job_fields(self._generation.choice)
            fields["init_image"] = base64.b64encode(picture).decode("ascii")
            if body.strength is not None:
                fields["strength"] = body.strength
            if body.size not in (None, "", "auto"):
                # Otherwise the picture's own size, within the bounds.
                fields["width"], fields["height"] = parse_size(body.size, self._generation.settings)
            pictures = await self._run(body, fields)
        except ApiError as exc:
            return self._errors.error(exc.status, exc.code, exc.message, _openai_param(exc.param))
        return _images(pictures, body.response_format)

    @staticmethod
    def _parse_edit(request: Request) -> tuple[EditRequest, bytes]:
        """Return an edit's fields and its picture.

        Raises:
            ApiError: Not a form, no picture, a mask, or a field that is not what it should be.
        """
        form = request.form
        if form is None:
            message = "send the edit as multipart/form-data, with the picture as the image file"
            raise ApiError(400, "invalid_request", message, "image")
        if "mask" in form or "mask[]" in form:
            message = "masks (inpainting) are not supported: send the image and the prompt only"
            raise ApiError(400, "unsupported_parameter", message, "mask")
        images = [field for name in IMAGE_FIELDS for field in form.get(name, [])]
        if not images:
            raise ApiError(400, "invalid_request", "the image file is required", "image")
        texts = {
            name: fields[0].decode("utf-8", "replace")
            for name, fields in form.items()
            if name not in IMAGE_FIELDS
        }
        try:
            body = EditRequest.model_validate(texts)
        except ValidationError as exc:
            raise ApiError.of(field_error(exc)) from exc
        if body.stream:
            raise ApiError(400, "invalid_request", "streaming is not supported", "stream")
        return body, images[0]

    @staticmethod
    def _parse(request: Request) -> ImageRequest:
        body = parse_body(ImageRequest, request)
        if body.stream:
            raise ApiError(400, "invalid_request", "streaming is not supported", "stream")
        return body


def _images(pictures: list[Picture], response_format: str | None) -> Response:
    """Return OpenAI's answer: each picture as base64 (its default) or as a URL."""
    data = []
    for picture in pictures:
        entry: dict[str, object] = {"revised_prompt": picture.spec.prompt}
        if response_format == "url":
            entry["url"] = picture.reply["image"]["url"]
        else:
            entry["b64_json"] = base64.b64encode(picture.data).decode("ascii")
        data.append(entry)
    # "model" is the agent's own: the installed model that drew them (OpenAI's has none).
    answer = {"created": int(time.time()), "data": data, "model": pictures[0].spec.model}
    return Response.json(200, answer)


def _openai_param(param: str | None) -> str | None:
    """Name a field as the client sent it.

    Width and height came in as ``size``, the picture as ``image``.
    """
    return {"width": "size", "height": "size", "init_image": "image"}.get(param or "", param)
