"""Request parsing on its own: defaults, bounds, and no unhandled exception for any input."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.jobs.errors import ErrorCode, RequestError
from agent.jobs.requests import parse_cancel, parse_generate
from agent.mqtt.topics import reply_topic_problem
from agent.settings import Settings

SETTINGS = Settings(node_id="test")


def test_a_bare_string_is_the_prompt():
    spec = parse_generate(b"  a red apple \n", SETTINGS)
    assert spec.prompt == "a red apple"
    assert (spec.width, spec.height, spec.steps, spec.guidance_scale) == (512, 512, 1, 0.0)
    assert (spec.output, spec.format) == ("b64", "png")
    assert 0 <= spec.seed < 2**32
    assert len(spec.id) == 32


def test_every_field_is_taken():
    payload = {
        "prompt": "p",
        "negative_prompt": "n",
        "width": 768,
        "height": 256,
        "steps": 4,
        "guidance_scale": 1.5,
        "seed": 42,
        "output": "both",
        "format": "webp",
        "id": "job-1",
        "reply_to": "edgeai/reply/me",
    }
    spec = parse_generate(json.dumps(payload).encode(), SETTINGS)
    assert (spec.prompt, spec.negative_prompt, spec.width, spec.height) == ("p", "n", 768, 256)
    assert (spec.steps, spec.guidance_scale, spec.seed) == (4, 1.5, 42)
    assert (spec.output, spec.format, spec.id, spec.reply_to) == (
        "both",
        "webp",
        "job-1",
        "edgeai/reply/me",
    )


def test_bounds_are_settings():
    strict = Settings(node_id="test", max_size=512, max_steps=2, max_prompt_chars=5)
    for payload, code in (
        ({"prompt": "p", "width": 520}, ErrorCode.OUT_OF_RANGE),
        ({"prompt": "p", "steps": 3}, ErrorCode.OUT_OF_RANGE),
        ({"prompt": "123456"}, ErrorCode.OUT_OF_RANGE),
    ):
        with pytest.raises(RequestError) as caught:
            parse_generate(json.dumps(payload).encode(), strict)
        assert caught.value.code is code


@pytest.mark.parametrize(
    "topic",
    [
        "edgeai/reply/+",
        "edgeai/reply/#",
        "$SYS/x",
        "edgeai/reply/\x00",
        "edgeai/reply/\x1b",
        "other/x",
        "edgeai/reply/" + "x" * 300,
        "",
    ],
)
def test_unsafe_reply_topics_are_refused(topic):
    assert reply_topic_problem(topic, "edgeai/reply/") is not None
    with pytest.raises(RequestError) as caught:
        parse_generate(
            json.dumps({"prompt": "p", "id": "x1", "reply_to": topic}).encode(), SETTINGS
        )
    assert caught.value.code is ErrorCode.BAD_REPLY_TO
    assert caught.value.reply_to is None  # never published to
    assert caught.value.job_id == "x1"


def test_an_unsafe_response_topic_is_refused_too():
    with pytest.raises(RequestError) as caught:
        parse_generate(b"p", SETTINGS, response_topic="edgeai/reply/#")
    assert caught.value.code is ErrorCode.BAD_REPLY_TO
    assert caught.value.reply_to is None


def test_cancel_needs_an_id():
    assert parse_cancel(b'{"id": "abc"}', 1000) == "abc"
    with pytest.raises(RequestError):
        parse_cancel(b'{"job": "abc"}', 1000)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=20,
)
field_names = st.sampled_from(
    [
        "prompt",
        "negative_prompt",
        "width",
        "height",
        "steps",
        "guidance_scale",
        "seed",
        "output",
        "format",
        "id",
        "reply_to",
        "x",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_but_a_request_error(payload):
    try:
        parse_generate(payload, SETTINGS)
    except RequestError as error:
        assert error.code in ErrorCode


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(field_names, json_values, max_size=8))
def test_random_requests_never_raise_anything_but_a_request_error(data):
    payload = json.dumps(data, allow_nan=True).encode()
    try:
        spec = parse_generate(payload, SETTINGS)
    except RequestError as error:
        assert error.code in ErrorCode
    else:
        assert spec.prompt
        assert spec.width % 8 == 0
