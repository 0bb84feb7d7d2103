"""AUTOMATIC1111's web UI API, the part image clients use: ``/sdapi/v1/txt2img``, ``img2img``...

What Open WebUI's "Automatic1111" engine sends (read from its source: ``prompt``,
``batch_size``, ``width``, ``height``, ``steps``, ``negative_prompt``, with HTTP Basic when
``AUTOMATIC1111_API_AUTH`` is set) and what it reads back (``images`` as bare base64 PNG,
``info``). Like AUTOMATIC1111 itself, fields it does not know (samplers, hires fix, scripts) are
accepted and ignored. The checkpoints are the installed models: ``POST /sdapi/v1/options``
(``sd_model_checkpoint``) chooses the default, ``override_settings`` one request's;
``<lora:name:weight>`` in a prompt applies a LoRA style (``GET /sdapi/v1/loras`` lists them).

``/sdapi/v1/img2img`` takes AUTOMATIC1111's own fields: ``init_images`` (base64, data URLs too;
the first is used), ``denoising_strength`` (its default, 0.75, as in AUTOMATIC1111), and the
txt2img fields; a ``mask`` is refused (inpainting is not built).
"""

from __future__ import annotations

import base64
import json
import time
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ConfigDict

from agent.jobs.errors import RequestError
from agent.jobs.requests import MAX_SEED
from agent.web.a1111_models import (
    checkpoint_name,
    model_hash,
    prompt_loras,
    sd_loras,
    sd_models,
    title,
)
from agent.web.generation import ApiError, Generation, parse_body
from agent.web.routing import Access, Body, Request, Response, Routes, json_body

if TYPE_CHECKING:
    from agent.jobs.service import JobService
    from agent.model.catalog import InstalledModel

Form = TypeVar("Form", bound="Txt2ImgRequest")


class A1111Errors:
    """Errors as AUTOMATIC1111's API middleware words them."""

    def error(self, status: int, code: str, message: str, param: str | None = None) -> Response:
        """Return ``{"error", "detail", "body", "errors"}``."""
        detail = f"{param}: {message}" if param and not message.startswith(param) else message
        return Response.json(
            status, {"error": code, "detail": detail, "body": "", "errors": message}
        )


class Txt2ImgRequest(BaseModel):
    """The fields of ``/sdapi/v1/txt2img`` the agent uses; the rest are accepted and ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    prompt: str = ""
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    seed: int = -1
    batch_size: int = 1
    n_iter: int = 1
    override_settings: dict[str, Any] | None = None
    """AUTOMATIC1111's settings for this request alone: ``sd_model_checkpoint`` is used."""

    def checkpoint(self) -> str | None:
        """Return the model ``override_settings`` names for this request, if it names one."""
        wanted = (self.override_settings or {}).get("sd_model_checkpoint")
        return checkpoint_name(wanted) if isinstance(wanted, str) and wanted else None


class Img2ImgRequest(Txt2ImgRequest):
    """The fields of ``/sdapi/v1/img2img`` the agent uses, on top of txt2img's."""

    init_images: list[str] = []
    denoising_strength: float = 0.75
    mask: str | None = None


class A1111Api:
    """AUTOMATIC1111's endpoints."""

    def __init__(self, generation: Generation, *, jobs: JobService) -> None:
        """Answer through ``generation``; progress and interruptions through ``jobs``."""
        self._generation = generation
        self._jobs = jobs
        self._errors = A1111Errors()
        self._choice = generation.choice

    def register(self, routes: Routes) -> None:
        """Add the routes (a token, when set, is needed for every one, as with ``--api-auth``)."""
        for method, path, handler in (
            ("POST", "/sdapi/v1/txt2img", self.txt2img),
            ("GET", "/sdapi/v1/options", self.options),
            ("POST", "/sdapi/v1/options", self.set_options),
            ("GET", "/sdapi/v1/sd-models", self.sd_models),
            ("GET", "/sdapi/v1/loras", self.loras),
            ("GET", "/sdapi/v1/progress", self.progress),
            ("POST", "/sdapi/v1/interrupt", self.interrupt),
        ):
            routes.add(method, path, handler, access=Access.TOKEN, shape=self._errors)
        routes.add(
            "POST",
            "/sdapi/v1/img2img",
            self.img2img,
            access=Access.TOKEN,
            shape=self._errors,
            body=Body(pictures=True),
        )

    def _default(self) -> InstalledModel:
        return self._choice.model(None)

    async def options(self, _request: Request) -> Response:
        """``GET /sdapi/v1/options``: the checkpoint requests get when they name none."""
        model = self._default()
        return Response.json(
            200, {"sd_model_checkpoint": title(model), "sd_checkpoint_hash": model_hash(model)}
        )

    async def set_options(self, request: Request) -> Response:
        """``POST /sdapi/v1/options``: ``sd_model_checkpoint`` chooses the default model.

        It is loaded ahead when nothing waits; the other options are accepted and ignored.
        """
        try:
            options = json_body(request)
        except RequestError as exc:
            return self._errors.error(400, exc.code.value, exc.message)
        wanted = options.get("sd_model_checkpoint") if isinstance(options, dict) else None
        chosen = checkpoint_name(wanted) if isinstance(wanted, str) and wanted else None
        if chosen is not None and self._choice.catalog.choose(chosen) is None:
            names = ", ".join(title(model) for model in self._choice.catalog)
            message = f"no checkpoint {str(wanted)[:80]!r}; installed: {names}"
            return self._errors.error(400, "unknown_model", message, "sd_model_checkpoint")
        return Response.json(200, {"sd_model_checkpoint": title(self._default())})

    async def sd_models(self, _request: Request) -> Response:
        """``GET /sdapi/v1/sd-models``: the installed models."""
        return Response.json(200, sd_models(self._choice))

    async def loras(self, _request: Request) -> Response:
        """``GET /sdapi/v1/loras``: the LoRA styles in the folder."""
        return Response.json(200, sd_loras(self._choice))

    async def progress(self, _request: Request) -> Response:
        """``GET /sdapi/v1/progress``: how far the running job is, as clients poll it."""
        now = await self._jobs.progress()
        running = bool(now.get("job"))
        return Response.json(
            200,
            {
                "progress": now["progress"],
                "eta_relative": now["eta_s"],
                "state": {
                    "skipped": False,
                    "interrupted": False,
                    "job": now.get("job", ""),
                    "job_count": now["queued"] + (1 if running else 0),
                    "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
                    "job_no": 0,
                    "sampling_step": now["step"],
                    "sampling_steps": now["steps"],
                },
                "current_image": None,
                "textinfo": None,
            },
        )

    async def interrupt(self, _request: Request) -> Response:
        """``POST /sdapi/v1/interrupt``: stop the running job after its current step."""
        now = await self._jobs.progress()
        if now.get("job"):
            await self._jobs.cancel(now["job"])
        return Response.json(200, None)

    async def txt2img(self, request: Request) -> Response:
        """``POST /sdapi/v1/txt2img``: bare base64 PNGs, the parameters, and info with the seeds."""
        try:
            body = self._parse(request, Txt2ImgRequest)
        except ApiError as exc:
            return self._error(exc)
        return await self._answer(body, {})

    async def img2img(self, request: Request) -> Response:
        """``POST /sdapi/v1/img2img``: the first init image restyled, answered like txt2img."""
        try:
            body = self._parse(request, Img2ImgRequest)
            _check_img2img(body)
        except ApiError as exc:
            return self._error(exc)
        extra = {"init_image": body.init_images[0], "strength": body.denoising_strength}
        return await self._answer(body, extra)

    async def _answer(self, body: Txt2ImgRequest, extra: dict[str, Any]) -> Response:
        """Generate a request's images and answer them as AUTOMATIC1111 does."""
        try:
            count = body.batch_size * body.n_iter
            self._generation.check_count(count, "batch_size")
            prompt, loras = prompt_loras(body.prompt)
            fields: dict[str, Any] = {
                "prompt": prompt,
                "loras": loras or None,
                "model": body.checkpoint(),
                "negative_prompt": body.negative_prompt,
                "width": body.width,
                "height": body.height,
                "steps": body.steps,
                "guidance_scale": body.cfg_scale,
                "seed": None if body.seed == -1 else body.seed,
                "format": "png",
                "output": "url",
                **extra,
            }
            specs = self._generation.specs(
                {key: value for key, value in fields.items() if value is not None}, count
            )
            pictures = await self._generation.run(specs, api="a1111")
        except ApiError as exc:
            return self._error(exc)
        first = pictures[0].spec
        drawn = self._choice.model(first.model)
        parameters = {
            **body.model_dump(exclude={"init_images"}),
            "seed": first.seed,
            "width": first.width,
            "height": first.height,
            "steps": first.steps,
            "cfg_scale": first.guidance_scale,
        }
        info = {
            "prompt": first.prompt,
            "all_prompts": [picture.spec.prompt for picture in pictures],
            "negative_prompt": first.negative_prompt or "",
            "seed": first.seed,
            "all_seeds": [picture.spec.seed for picture in pictures],
            "width": first.width,
            "height": first.height,
            "steps": first.steps_run,
            "cfg_scale": first.guidance_scale,
            "batch_size": body.batch_size,
            "n_iter": body.n_iter,
            "sd_model_name": drawn.name,
            "sd_model_hash": model_hash(drawn),
            "job_ids": [picture.spec.id for picture in pictures],
        }
        if first.strength is not None:
            info["denoising_strength"] = first.strength
        return Response.json(
            200,
            {
                "images": [base64.b64encode(picture.data).decode("ascii") for picture in pictures],
                "parameters": parameters,
                "info": json.dumps(info),
            },
        )

    def _error(self, exc: ApiError) -> Response:
        """Answer an error, naming each field as AUTOMATIC1111's clients sent it."""
        param = {
            "guidance_scale": "cfg_scale",
            "strength": "denoising_strength",
            "init_image": "init_images",
        }.get(exc.param or "", exc.param)
        return self._errors.error(exc.status, exc.code, exc.message, param)

    @staticmethod
    def _parse(request: Request, model: type[Form]) -> Form:
        body = parse_body(model, request)
        if not -1 <= body.seed <= MAX_SEED:
            raise ApiError(400, "out_of_range", f"seed is outside -1..{MAX_SEED}", "seed")
        return body


def _check_img2img(body: Img2ImgRequest) -> None:
    """Refuse an img2img request with no picture, or with a mask.

    Raises:
        ApiError: What is wrong, the field named.
    """
    if body.mask:
        message = "masks (inpainting) are not supported: send init_images only"
        raise ApiError(400, "unsupported_parameter", message, "mask")
    if not body.init_images:
        raise ApiError(400, "invalid_request", "init_images is empty", "init_images")
