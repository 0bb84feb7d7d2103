"""Strict decoding of a request's payload: its size first, then UTF-8, then JSON."""

from __future__ import annotations

import json
from typing import Any

from agent.jobs.errors import ErrorCode, RequestError


def _reject_constant(name: str) -> Any:  # noqa: ANN401 - json's hook signature
    raise ValueError(f"{name} is not a number JSON allows")


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key!r} appears twice")
        result[key] = value
    return result


def decode_json(payload: bytes, limit: int) -> Any:  # noqa: ANN401 - any JSON value
    """Decode a JSON payload strictly: size first, then UTF-8, then JSON without NaN or repeats.

    Args:
        payload: The raw MQTT payload.
        limit: The largest payload accepted, in bytes.

    Returns:
        The decoded JSON value.

    Raises:
        RequestError: The payload is too large, not UTF-8 or not strict JSON.
    """
    text = decode_text(payload, limit)
    try:
        return json.loads(
            text, parse_constant=_reject_constant, object_pairs_hook=_reject_duplicate_keys
        )
    except (ValueError, RecursionError) as exc:
        raise RequestError(ErrorCode.INVALID_JSON, f"the payload is not valid JSON: {exc}") from exc


def decode_text(payload: bytes, limit: int) -> str:
    """Check a payload's size, then decode it as UTF-8.

    Raises:
        RequestError: The payload is over ``limit`` bytes or not UTF-8.
    """
    if len(payload) > limit:
        raise RequestError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"the payload is {len(payload)} bytes; the limit is {limit}",
        )
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(
            ErrorCode.INVALID_UTF8, f"the payload is not UTF-8 text: {exc.reason}"
        ) from exc
