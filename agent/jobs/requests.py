"""Wire formats: parsing requests (generate, cancel) into jobs, within their bounds."""

from __future__ import annotations

import re
import secrets
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.images import file_name
from agent.jobs.errors import ErrorCode, RequestError, field_error
from agent.jobs.init_sources import InitSource, parse_init_image
from agent.jobs.model_choice import LoraRequest, ModelChoice
from agent.jobs.payloads import decode_json, decode_text
from agent.model.protocol import GenerateJob, denoising_steps
from agent.mqtt.topics import is_encodable, reply_topic_problem
from agent.settings import ImageFormat, OutputMode

if TYPE_CHECKING:
    from agent.settings import Settings

JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
"""Job ids become file names and topic levels, so only these characters are allowed."""

MAX_SEED = 2**32 - 1


class GenerateRequest(BaseModel):
    """A request as a client sends it; bounds that are settings are checked after parsing."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    output: OutputMode | None = None
    format: ImageFormat | None = None
    id: str | None = Field(default=None, pattern=JOB_ID_PATTERN)
    reply_to: str | None = None
    init_image: str | None = None
    """Image-to-image: the picture to start from, base64 (or a data URL) or an http(s) URL."""
    strength: float | None = None
    model: str | None = Field(default=None, max_length=1000)
    """An installed model's short name (or source); None: the default model."""
    loras: list[LoraRequest] | None = None


class CancelRequest(BaseModel):
    """A cancel request: the id of a queued or running job."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    id: str = Field(pattern=JOB_ID_PATTERN)


@dataclass(frozen=True)
class JobSpec:
    """A request with every default filled in: what the worker and the reply need."""

    id: str
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    output: OutputMode
    format: ImageFormat
    reply_to: str | None = None
    correlation_data: bytes | None = None
    fleet_result_topic: str | None = None
    """Where a fleet job's result goes too, so fleet clients need not know which agent ran it."""
    image_key: str = ""
    """Random, given when the job is admitted: part of its image's file name (empty in jobs
    journaled before keys existed)."""
    strength: float | None = None
    """Image-to-image: how far the picture may change; None for text-to-image."""
    init_image: str = ""
    """Image-to-image: the stored init image's file name, once admission has checked and stored
    it (journaled with the job; removed once the job is answered)."""
    init_source: InitSource | None = field(default=None, repr=False, compare=False)
    """The init image as it came (or as stored, for the regenerate button): never journaled."""
    model: str = ""
    """The installed model's short name; empty (jobs journaled before there were several): the
    default model."""
    loras: tuple[tuple[str, float], ...] = ()
    """LoRA styles: (name, weight) each."""

    @property
    def mode(self) -> str:
        """Return ``img2img`` for a job that starts from a picture, else ``txt2img``."""
        return "txt2img" if self.strength is None else "img2img"

    @property
    def steps_run(self) -> int:
        """Return the denoising steps this job runs (image-to-image runs a part of them)."""
        return denoising_steps(self.steps, self.strength)[1]

    @property
    def image_file(self) -> str:
        """Return the name of this job's image file."""
        return file_name(self.id, self.format, self.image_key)

    @property
    def source_file(self) -> str:
        """Return the name of the thumbnail of the picture an image-to-image job started from."""
        return file_name(self.id, "jpeg", self.image_key, source=True)

    def worker_job(
        self, init_image: str | None = None, loras: tuple[tuple[str, str, float], ...] = ()
    ) -> GenerateJob:
        """Return what the worker process needs to generate and encode the image.

        Args:
            init_image: The path of the stored init image, for an image-to-image job.
            loras: The LoRA styles as (name, file, weight), their files found.
        """
        return GenerateJob(
            id=self.id,
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            width=self.width,
            height=self.height,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            seed=self.seed,
            format=self.format,
            init_image=init_image,
            strength=self.strength,
            loras=loras,
        )


def _readable_id(data: dict[str, Any]) -> str | None:
    job_id = data.get("id")
    if isinstance(job_id, str) and re.fullmatch(JOB_ID_PATTERN, job_id):
        return job_id
    return None


def parse_generate(
    payload: bytes,
    settings: Settings,
    *,
    response_topic: str | None = None,
    correlation_data: bytes | None = None,
    choice: ModelChoice | None = None,
) -> JobSpec:
    """Turn a ``generate`` payload into a job, or raise the error its reply must carry.

    A payload whose first non-blank character is ``{`` or ``[`` is JSON; anything else is a bare
    prompt, as a Home Assistant ``text`` entity or ``mosquitto_pub -m`` sends it.

    Args:
        payload: The raw MQTT payload.
        settings: Bounds and defaults.
        response_topic: The MQTT 5 Response Topic, if the request had one.
        correlation_data: The MQTT 5 Correlation Data, if the request had one.
        choice: The installed models and LoRA styles (with their families read); None: those
            the settings name, as far as they are known without reading.

    Returns:
        The job, every default filled in.

    Raises:
        RequestError: The request is invalid; the error names the problem.
    """
    reply_to: str | None = None
    job_id: str | None = None
    mode = "txt2img"
    try:
        # A bad Response Topic is reported once the id is read, so the error carries it.
        topic_problem: RequestError | None = None
        try:
            reply_to = _checked_reply_to(response_topic, settings)
        except RequestError as exc:
            topic_problem = exc
        data = _decode_request(payload, settings)
        job_id = _readable_id(data)
        if "init_image" in data:
            mode = "img2img"
        else:
            _check_text_bound(payload, settings)
        if topic_problem is not None:
            raise topic_problem
        if reply_to is None and isinstance(data.get("reply_to"), str):
            reply_to = _checked_reply_to(data["reply_to"], settings)
        try:
            request = GenerateRequest.model_validate(data)
        except ValidationError as exc:
            raise field_error(exc) from exc
        return _resolve(
            request, settings, choice or ModelChoice.of(settings), reply_to, correlation_data
        )
    except RequestError as exc:
        # Whatever failed, the reply goes wherever the request could be traced back to.
        exc.job_id, exc.reply_to, exc.mode = job_id, reply_to, mode
        raise


def _decode_request(payload: bytes, settings: Settings) -> dict[str, Any]:
    """Decode a request within the image bound (the caller checks the text bound after).

    A text-only request is then held to ``max_payload_bytes``, as tightly as ever.
    """
    limit = max(settings.max_payload_bytes, settings.max_image_payload_bytes)
    if len(payload) > limit:
        raise RequestError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"the payload is {len(payload)} bytes; the limit is {settings.max_payload_bytes}"
            f" ({limit} with an init_image)",
        )
    text = decode_text(payload, limit)
    if text.lstrip()[:1] not in ("{", "["):
        data: Any = {"prompt": text.strip()}
    else:
        data = decode_json(payload, limit)
    if not isinstance(data, dict):
        raise RequestError(ErrorCode.INVALID_REQUEST, "a JSON request must be an object")
    return data


def _check_text_bound(payload: bytes, settings: Settings) -> None:
    """Hold a request without an init image to the text bound.

    Raises:
        RequestError: It is over ``max_payload_bytes``.
    """
    if len(payload) > settings.max_payload_bytes:
        raise RequestError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"the payload is {len(payload)} bytes; the limit is {settings.max_payload_bytes}"
            f" ({settings.max_image_payload_bytes} with an init_image)",
        )


def _checked_reply_to(topic: str | None, settings: Settings) -> str | None:
    if topic is None:
        return None
    problem = reply_topic_problem(topic, settings.reply_prefix)
    if problem is not None:
        raise RequestError(ErrorCode.BAD_REPLY_TO, problem)
    return topic


def _resolve(  # noqa: C901 - one check per field, in the order a client reads them
    request: GenerateRequest,
    settings: Settings,
    choice: ModelChoice,
    reply_to: str | None,
    correlation_data: bytes | None,
) -> JobSpec:
    prompt = request.prompt.strip()
    if not prompt:
        raise RequestError(ErrorCode.EMPTY_PROMPT, "the prompt is empty", field="prompt")
    for name, text in (("prompt", prompt), ("negative_prompt", request.negative_prompt or "")):
        if len(text) > settings.max_prompt_chars:
            raise RequestError(
                ErrorCode.OUT_OF_RANGE,
                f"{name} has {len(text)} characters; the limit is {settings.max_prompt_chars}",
                field=name,
            )
        if not is_encodable(text):
            raise RequestError(
                ErrorCode.INVALID_REQUEST, f"{name} is not valid Unicode", field=name
            )
    model = choice.model(request.model)
    loras = choice.styles(model, request.loras)
    catalog = choice.catalog
    source, strength = parse_init_image(request.init_image, request.strength, settings)
    # An init image gives the size a request leaves out; 0 until its picture is read.
    default_width, default_height = (0, 0) if source is not None else catalog.default_size(model)
    max_side = min(settings.max_size, model.family.max_side if model.family else settings.max_size)
    width = default_width if request.width is None else request.width
    height = default_height if request.height is None else request.height
    for name, size in (("width", width), ("height", height)):
        if size == 0 and source is not None and getattr(request, name) is None:
            continue
        if not settings.min_size <= size <= max_side:
            raise RequestError(
                ErrorCode.OUT_OF_RANGE,
                f"{name} {size} is outside {settings.min_size}..{max_side}"
                + (f" for {model.name}" if max_side < settings.max_size else ""),
                field=name,
            )
        if size % 8:
            raise RequestError(
                ErrorCode.BAD_SIZE, f"{name} {size} is not a multiple of 8", field=name
            )
    steps = catalog.default_steps(model) if request.steps is None else request.steps
    if not 1 <= steps <= settings.max_steps:
        raise RequestError(
            ErrorCode.OUT_OF_RANGE,
            f"steps {steps} is outside 1..{settings.max_steps}",
            field="steps",
        )
    guidance = request.guidance_scale
    if guidance is None:
        guidance = catalog.default_guidance(model)
    if not 0.0 <= guidance <= settings.max_guidance_scale:  # also false for NaN
        raise RequestError(
            ErrorCode.OUT_OF_RANGE,
            f"guidance_scale {guidance} is outside 0..{settings.max_guidance_scale}",
            field="guidance_scale",
        )
    seed = secrets.randbelow(MAX_SEED + 1) if request.seed is None else request.seed
    if not 0 <= seed <= MAX_SEED:
        raise RequestError(ErrorCode.OUT_OF_RANGE, f"seed is outside 0..{MAX_SEED}", field="seed")
    return JobSpec(
        id=request.id or uuid.uuid4().hex,
        prompt=prompt,
        negative_prompt=request.negative_prompt or None,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=guidance,
        seed=seed,
        output=request.output or settings.default_output,
        format=request.format or settings.default_format,
        reply_to=reply_to,
        correlation_data=correlation_data,
        strength=strength,
        init_source=source,
        model=model.name,
        loras=loras,
    )


def parse_cancel(payload: bytes, limit: int) -> str:
    """Return the job id a ``cancel`` payload names.

    Raises:
        RequestError: The payload is not ``{"id": "..."}``.
    """
    data = decode_json(payload, limit)
    try:
        return CancelRequest.model_validate(data).id
    except ValidationError as exc:
        error = field_error(exc)
        error.job_id = _readable_id(data) if isinstance(data, dict) else None
        raise error from exc


def readable_id(payload: bytes, limit: int) -> str | None:
    """Return the valid ``id`` of a JSON payload, or None: for errors about a whole message."""
    try:
        data = decode_json(payload, limit)
    except RequestError:
        return None
    return _readable_id(data) if isinstance(data, dict) else None
