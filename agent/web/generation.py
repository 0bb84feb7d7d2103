"""Synchronous image generation for the HTTP APIs that answer with the images themselves.

OpenAI's and AUTOMATIC1111's clients wait on one request for their pictures. Each picture is a
job of its own, admitted through the same admission, journal, queue and metrics as MQTT; the
call waits for all of them up to ``api_wait_s``. A client that hangs up meanwhile changes
nothing: its jobs run, are journaled and announced on MQTT like any other.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from agent.jobs.errors import ErrorCode, RequestError, field_error
from agent.jobs.requests import parse_generate
from agent.web.routing import json_body

if TYPE_CHECKING:
    from agent.jobs.requests import JobSpec
    from agent.jobs.service import JobService
    from agent.settings import Settings
    from agent.web.routing import Request

STATUS_OF = {
    ErrorCode.BUSY: 429,
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.MODEL_UNAVAILABLE: 503,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.DUPLICATE_ID: 409,
    ErrorCode.CANCELLED: 409,
    ErrorCode.GENERATION_FAILED: 500,
    ErrorCode.WORKER_CRASHED: 500,
    ErrorCode.INTERNAL_ERROR: 500,
}
"""HTTP status of each refusal; every other code is the client's mistake: 400."""
TIMED_OUT = "timeout"
Body = TypeVar("Body", bound=BaseModel)


class ApiError(Exception):
    """A refusal or failure, with what every API's error shape needs."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        """Create the error: its HTTP status, stable code, sentence and the field at fault."""
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param

    @classmethod
    def of(cls, error: RequestError) -> ApiError:
        """Return the API error of a request error."""
        return cls(STATUS_OF.get(error.code, 400), error.code.value, error.message, error.field)


@dataclass(frozen=True)
class Picture:
    """One finished image: its job, the reply the journal keeps, and the file's bytes."""

    spec: JobSpec
    reply: dict[str, Any]
    data: bytes


class Generation:
    """Admits a request's images as jobs and waits for them."""

    def __init__(self, *, settings: Settings, jobs: JobService) -> None:
        """Generate through ``jobs``."""
        self.settings = settings
        self._jobs = jobs
        self.choice = jobs.choice

    def check_count(self, count: int, param: str) -> None:
        """Refuse a request for more images than ``api_max_images``.

        Raises:
            ApiError: Fewer than one, or more than the bound.
        """
        limit = self.settings.api_max_images
        if not 1 <= count <= limit:
            raise ApiError(400, "out_of_range", f"{param} {count} is outside 1..{limit}", param)

    def specs(self, fields: dict[str, Any], count: int) -> list[JobSpec]:
        """Return ``count`` jobs of one request: consecutive seeds from its seed, new ids.

        ``fields`` are the MQTT request's own, so every bound and default is the same.

        Raises:
            ApiError: A field is invalid.
        """
        first = self._parse(fields)
        # The rest differ only in id and seed: parsed once, a picture is decoded once.
        return [first] + [
            dataclasses.replace(first, id=uuid.uuid4().hex, seed=(first.seed + index) % 2**32)
            for index in range(1, count)
        ]

    def _parse(self, fields: dict[str, Any]) -> JobSpec:
        payload = json.dumps({**fields, "id": uuid.uuid4().hex}).encode()
        try:
            return parse_generate(payload, self.settings, choice=self._jobs.choice)
        except RequestError as exc:
            raise ApiError.of(exc) from exc

    async def run(self, specs: list[JobSpec], *, api: str) -> list[Picture]:
        """Admit every job, then wait for each image, all within ``api_wait_s``.

        Raises:
            ApiError: A job was refused (those admitted before it are cancelled), failed, or
                is not finished in time (it goes on; its reply is kept under its id).
        """
        admitted: list[JobSpec] = []
        for spec in specs:
            fingerprint = hashlib.sha256(spec.id.encode()).hexdigest()
            try:
                # The admitted job: its image key is given on admission.
                admitted.append(
                    await self._jobs.submit(
                        functools.partial(_same, spec), fingerprint=fingerprint, api=api
                    )
                )
            except RequestError as exc:
                for earlier in admitted:
                    await self._jobs.cancel(earlier.id)
                raise ApiError.of(exc) from exc
        deadline = asyncio.get_running_loop().time() + self.settings.api_wait_s
        pictures = []
        for spec in admitted:
            try:
                async with asyncio.timeout_at(deadline):
                    reply = await self._jobs.result(spec.id)
            except TimeoutError as exc:
                message = (
                    f"the image is not ready after {self.settings.api_wait_s:.0f} s; it goes on"
                    f" as job {spec.id} (GET /api/jobs/{spec.id})"
                )
                raise ApiError(503, TIMED_OUT, message) from exc
            if reply.get("status") != "ok":
                error = reply["error"]
                code = ErrorCode(error["code"])
                raise ApiError(STATUS_OF.get(code, 500), code.value, error["message"])
            data = await self._jobs.image(spec)
            pictures.append(Picture(spec, reply, data))
        return pictures


def parse_body(model: type[Body], request: Request) -> Body:
    """Return a request's JSON body as ``model``; a bad body is the API's 400, the field named.

    Raises:
        ApiError: The body is not JSON, or not what ``model`` accepts.
    """
    try:
        return model.model_validate(json_body(request))
    except RequestError as exc:
        raise ApiError.of(exc) from exc
    except ValidationError as exc:
        raise ApiError.of(field_error(exc)) from exc


def _same(spec: JobSpec) -> JobSpec:
    return spec


def parse_size(size: str | None, settings: Settings, param: str = "size") -> tuple[int, int]:
    """Return (width, height) of a ``WxH`` size; ``auto`` or nothing is the default size.

    Raises:
        ApiError: Not of the form ``WxH``.
    """
    if size in (None, "", "auto"):
        return settings.default_width, settings.default_height
    width, separator, height = (size or "").partition("x")
    if not separator or not width.isdigit() or not height.isdigit():
        message = f"{param} must be WIDTHxHEIGHT (for example 512x512) or auto, not {size!r}"
        raise ApiError(400, "bad_size", message, param)
    return int(width), int(height)
