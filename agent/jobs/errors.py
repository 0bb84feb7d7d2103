"""The error codes every reply uses, the error a refused request raises, and its reply body."""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError


class ErrorCode(StrEnum):
    """Stable error codes: clients and metrics key on these, so never rename one."""

    PAYLOAD_TOO_LARGE = "payload_too_large"
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    INVALID_REQUEST = "invalid_request"
    UNKNOWN_FIELD = "unknown_field"
    EMPTY_PROMPT = "empty_prompt"
    OUT_OF_RANGE = "out_of_range"
    BAD_SIZE = "bad_size"
    BAD_IMAGE = "bad_image"
    BAD_REPLY_TO = "bad_reply_to"
    DUPLICATE_ID = "duplicate_id"
    BUSY = "busy"
    UNKNOWN_JOB = "unknown_job"
    CANCELLED = "cancelled"
    GENERATION_FAILED = "generation_failed"
    WORKER_CRASHED = "worker_crashed"
    MODEL_UNAVAILABLE = "model_unavailable"
    UNKNOWN_MODEL = "unknown_model"
    UNKNOWN_LORA = "unknown_lora"
    BAD_LORA = "bad_lora"
    SHUTTING_DOWN = "shutting_down"
    RETAINED_REQUEST = "retained_request"
    EXPIRED = "expired"
    NO_PROMPT = "no_prompt"
    STORAGE_FULL = "storage_full"
    STORAGE_ERROR = "storage_error"
    INTERNAL_ERROR = "internal_error"


class RequestError(Exception):
    """A request cannot be served; carries what the error reply needs."""

    def __init__(  # noqa: PLR0913 - what an error reply and its metric need
        self,
        code: ErrorCode,
        message: str,
        *,
        job_id: str | None = None,
        reply_to: str | None = None,
        field: str | None = None,
        mode: str = "txt2img",
    ) -> None:
        """Create the error.

        Args:
            code: The stable error code.
            message: A sentence a person understands.
            job_id: The request's id, when one could be read.
            reply_to: The request's reply topic, when one could be read and is valid.
            field: The request field at fault, when one is (HTTP APIs name it).
            mode: txt2img, or img2img when the request carried an init image (for metrics).
        """
        super().__init__(message)
        self.code = code
        self.message = message
        self.job_id = job_id
        self.reply_to = reply_to
        self.field = field
        self.mode = mode


def field_error(exc: ValidationError) -> RequestError:
    """Return the request error for a pydantic validation error: its first problem, named."""
    first = exc.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "request"
    if first["type"] == "extra_forbidden":
        return RequestError(ErrorCode.UNKNOWN_FIELD, f"unknown field {field!r}", field=field)
    if first["type"] == "missing":
        return RequestError(
            ErrorCode.INVALID_REQUEST, f"the field {field!r} is required", field=field
        )
    return RequestError(ErrorCode.INVALID_REQUEST, f"{field}: {first['msg']}", field=field)


def error_body(job_id: str | None, code: ErrorCode, message: str) -> dict[str, Any]:
    """Return the JSON body of an error reply."""
    return {"id": job_id, "status": "error", "error": {"code": code.value, "message": message}}
