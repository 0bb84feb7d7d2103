"""Every class of bad input gets a clear error reply and a metric, and the agent keeps serving."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import generate

# (payload, error code, where the reply goes: "result" when an id can be read, else "errors")
CASES = [
    pytest.param(b"\xff\xfe not utf-8", "invalid_utf8", "errors", id="invalid-utf8"),
    pytest.param(b'{"prompt": "x",', "invalid_json", "errors", id="invalid-json"),
    pytest.param(b'{"prompt": NaN}', "invalid_json", "errors", id="nan"),
    pytest.param(b'{"prompt": "x", "prompt": "y"}', "invalid_json", "errors", id="duplicate-key"),
    pytest.param(b"[" * 5000, "invalid_json", "errors", id="deep-nesting"),
    pytest.param(b'["a list"]', "invalid_request", "errors", id="not-an-object"),
    pytest.param(
        b'{"id": "bad1", "prompt": "x", "colour": "red"}',
        "unknown_field",
        "result",
        id="unknown-field",
    ),
    pytest.param(b'{"id": "bad2"}', "invalid_request", "result", id="missing-prompt"),
    pytest.param(b'{"id": "bad3", "prompt": "   "}', "empty_prompt", "result", id="empty-prompt"),
    pytest.param(b"   ", "empty_prompt", "errors", id="empty-bare-prompt"),
    pytest.param(
        b'{"id": "bad4", "prompt": "x", "width": 513}',
        "bad_size",
        "result",
        id="size-not-multiple-of-8",
    ),
    pytest.param(
        b'{"id": "bad5", "prompt": "x", "height": 4096}',
        "out_of_range",
        "result",
        id="size-too-large",
    ),
    pytest.param(
        b'{"id": "bad6", "prompt": "x", "steps": 0}', "out_of_range", "result", id="zero-steps"
    ),
    pytest.param(
        b'{"id": "bad7", "prompt": "x", "steps": 51}', "out_of_range", "result", id="too-many-steps"
    ),
    pytest.param(
        b'{"id": "bad8", "prompt": "x", "guidance_scale": -1}',
        "out_of_range",
        "result",
        id="negative-guidance",
    ),
    pytest.param(
        b'{"id": "bad9", "prompt": "x", "seed": 99999999999999999999999}',
        "out_of_range",
        "result",
        id="huge-seed",
    ),
    pytest.param(
        b'{"id": "bad10", "prompt": "x", "width": "512"}',
        "invalid_request",
        "result",
        id="wrong-type",
    ),
    pytest.param(
        b'{"id": "bad11", "prompt": "x", "format": "gif"}',
        "invalid_request",
        "result",
        id="unknown-format",
    ),
    pytest.param(
        b'{"id": "bad12", "prompt": "x", "reply_to": "edgeai/reply/#"}',
        "bad_reply_to",
        "result",
        id="wildcard-reply-to",
    ),
    pytest.param(
        b'{"id": "bad13", "prompt": "x", "reply_to": "$SYS/x"}',
        "bad_reply_to",
        "result",
        id="system-reply-to",
    ),
    pytest.param(
        b'{"id": "bad14", "prompt": "x", "reply_to": "elsewhere/x"}',
        "bad_reply_to",
        "result",
        id="reply-to-outside-prefix",
    ),
    pytest.param(
        b'{"id": "bad/15", "prompt": "x"}', "invalid_request", "errors", id="id-with-slash"
    ),
    pytest.param(
        json.dumps({"id": "bad16", "prompt": "x" * 1001}).encode(),
        "out_of_range",
        "result",
        id="prompt-too-long",
    ),
    pytest.param(b"x" * 20000, "payload_too_large", "errors", id="payload-over-limit"),
]


def requests_counter(metrics: str, outcome: str) -> float:
    match = re.search(
        rf'^edgeai_requests_total{{mode="txt2img",outcome="{outcome}"}} (\S+)$',
        metrics,
        re.MULTILINE,
    )
    assert match, f"no edgeai_requests_total for {outcome}"
    return float(match.group(1))


@pytest.mark.parametrize(("payload", "code", "where"), CASES)
def test_bad_request_gets_an_error_reply_and_a_metric(shared_agent, client, payload, code, where):
    base = shared_agent.base
    before = requests_counter(shared_agent.metrics(), code)
    client.subscribe(f"{base}/errors", f"{base}/result/+")
    seen = len(client.seen)
    client.publish(f"{base}/generate", payload)
    topic_prefix = f"{base}/result/" if where == "result" else f"{base}/errors"

    def is_reply(message):
        return message in client.seen[seen:] and message.topic.startswith(topic_prefix)

    reply = client.wait_for(
        f"{base}/errors" if where == "errors" else f"{base}/result/{json.loads(payload)['id']}",
        is_reply,
    ).json()
    assert reply["status"] == "error"
    assert reply["error"]["code"] == code
    assert len(reply["error"]["message"]) > 5
    assert requests_counter(shared_agent.metrics(), code) == before + 1


def test_agent_keeps_serving_after_a_burst_of_bad_input(shared_agent, client):
    for param in CASES:
        client.publish(f"{shared_agent.base}/generate", param.values[0])
    assert generate(client, shared_agent)["status"] == "ok"
    assert shared_agent.process.poll() is None
