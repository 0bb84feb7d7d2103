"""The MQTT contract end to end: a real broker, the agent as a process, the tiny real pipeline."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import time
import uuid

import paho.mqtt.client as paho
from PIL import Image

from tests.conftest import generate, require_command

MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff", "webp": b"RIFF"}


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))


def test_bare_prompt_with_the_mosquitto_command_line_clients(shared_agent, module_broker):
    """What a user types: mosquitto_pub a prompt, mosquitto_sub the image as base64."""
    password = module_broker.password("edgeai-client")
    common = [
        "-h",
        "127.0.0.1",
        "-p",
        str(module_broker.port),
        "-u",
        "edgeai-client",
        "-P",
        password,
    ]
    subscriber = subprocess.Popen(
        [
            require_command("mosquitto_sub"),
            *common,
            "-t",
            f"{shared_agent.base}/image",
            "-C",
            "1",
            "-R",
            "-W",
            "60",
        ],
        stdout=subprocess.PIPE,
    )
    time.sleep(0.5)  # let the subscription reach the broker before the request
    subprocess.run(
        [
            require_command("mosquitto_pub"),
            *common,
            "-t",
            f"{shared_agent.base}/generate",
            "-m",
            "a red apple",
        ],
        check=True,
    )
    output, _ = subscriber.communicate(timeout=90)
    assert subscriber.returncode == 0
    image = decode(output.strip().decode())
    assert image.format == "PNG"
    assert image.size == (512, 512)


def test_json_request_returns_seed_timings_and_a_png(shared_agent, client):
    result = generate(client, shared_agent, prompt="a dog on a beach", width=256, height=320)
    assert result["status"] == "ok"
    assert result["prompt"] == "a dog on a beach"
    assert (result["width"], result["height"]) == (256, 320)
    assert result["steps"] == 1
    assert result["guidance_scale"] == 0.0
    assert isinstance(result["seed"], int)
    assert result["model"] == str(shared_agent.model)
    timings = result["timings"]
    for key in ("queue_wait_s", "generation_s", "encoding_s", "total_s"):
        assert timings[key] >= 0
    assert timings["total_s"] >= timings["generation_s"]
    assert result["latency_s"] == timings["total_s"]
    assert result["image"]["format"] == "png"
    assert "url" not in result["image"]
    image = decode(result["image"]["b64"])
    assert (image.format, image.size) == ("PNG", (256, 320))


def test_same_seed_gives_identical_bytes(shared_agent, client):
    first = generate(client, shared_agent, prompt="a cat", seed=1234)
    second = generate(client, shared_agent, prompt="a cat", seed=1234)
    other = generate(client, shared_agent, prompt="a cat", seed=1235)
    assert first["seed"] == second["seed"] == 1234
    assert first["image"]["b64"] == second["image"]["b64"]
    assert other["image"]["b64"] != first["image"]["b64"]


def test_url_output_serves_the_same_bytes_over_http(shared_agent, client):
    both = generate(client, shared_agent, output="both", seed=7)
    url = both["image"]["url"]
    assert url.startswith(shared_agent.url + "/images/")
    status, headers, body = shared_agent.http_get(url.removeprefix(shared_agent.url))
    assert status == 200
    assert headers["Content-Type"] == "image/png"
    assert body == base64.b64decode(both["image"]["b64"])
    only_url = generate(client, shared_agent, output="url", seed=7)
    assert set(only_url["image"]) == {"format", "url"}
    status, _, body_again = shared_agent.http_get(
        only_url["image"]["url"].removeprefix(shared_agent.url)
    )
    assert status == 200
    assert body_again == body


def test_jpeg_and_webp(shared_agent, client):
    for image_format, content_type in (("jpeg", "image/jpeg"), ("webp", "image/webp")):
        result = generate(client, shared_agent, format=image_format, output="both")
        data = base64.b64decode(result["image"]["b64"])
        assert data.startswith(MAGIC[image_format])
        assert Image.open(io.BytesIO(data)).size == (512, 512)
        status, headers, _ = shared_agent.http_get(
            result["image"]["url"].removeprefix(shared_agent.url)
        )
        assert status == 200
        assert headers["Content-Type"] == content_type


def test_job_events_queued_running_per_step_done(shared_agent, client):
    job_id = uuid.uuid4().hex[:8]
    client.subscribe(f"{shared_agent.base}/jobs/{job_id}")
    result = generate(client, shared_agent, id=job_id, steps=3)
    assert result["status"] == "ok"
    client.wait_for(f"{shared_agent.base}/jobs/{job_id}", lambda m: m.json()["event"] == "done")
    events = [m.json() for m in client.messages(f"{shared_agent.base}/jobs/{job_id}")]
    assert events[0] == {"id": job_id, "event": "queued", "position": 1}
    steps = [(e["step"], e["steps"]) for e in events if e["event"] == "running"]
    assert steps == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert events[-1]["event"] == "done"


def test_latest_image_topics_are_retained(shared_agent, client):
    result = generate(client, shared_agent, prompt="a retained picture", seed=99)
    late = shared_agent.broker.client()
    try:
        base = shared_agent.base
        late.subscribe(f"{base}/image", f"{base}/image/url", f"{base}/image/attributes")
        image = late.wait_for(f"{base}/image", lambda m: m.retain)
        assert image.payload.decode() == result["image"]["b64"]  # bare base64, no JSON around it
        url = late.wait_for(f"{base}/image/url", lambda m: m.retain).payload.decode()
        assert re.search(rf"/images/{result['id']}\.[0-9a-f]{{16}}\.png$", url), url
        attributes = late.wait_for(f"{base}/image/attributes", lambda m: m.retain).json()
        assert attributes["prompt"] == "a retained picture"
        assert attributes["seed"] == 99
        assert attributes["latency_s"] > 0
    finally:
        late.close()


def test_availability_and_state_are_retained(shared_agent, client):
    client.subscribe(f"{shared_agent.base}/availability", f"{shared_agent.base}/state")
    assert (
        client.wait_for(f"{shared_agent.base}/availability", lambda m: m.retain).payload
        == b"online"
    )
    state = client.wait_for(f"{shared_agent.base}/state", lambda m: m.retain).json()
    assert set(state) >= {
        "state",
        "queue_depth",
        "job",
        "temperature_c",
        "throttled",
        "last_latency_s",
        "model",
    }
    assert state["model"] == str(shared_agent.model)


def test_state_goes_generating_then_idle(shared_agent, client):
    client.subscribe(f"{shared_agent.base}/state")
    generate(client, shared_agent, steps=20)
    states = [m.json()["state"] for m in client.messages(f"{shared_agent.base}/state")]
    assert "generating" in states
    final = client.wait_for(
        f"{shared_agent.base}/state",
        lambda m: m.json()["state"] == "idle" and m.json()["last_latency_s"],
    )
    assert final.json()["queue_depth"] == 0


def test_reply_to_for_an_mqtt_311_client(shared_agent, module_broker):
    old = module_broker.client(protocol=paho.MQTTv311)
    try:
        reply_topic = f"edgeai/reply/{uuid.uuid4().hex[:8]}"
        old.subscribe(reply_topic)
        old.publish(
            f"{shared_agent.base}/generate",
            json.dumps({"prompt": "an apple", "reply_to": reply_topic, "id": "old-client"}),
        )
        reply = old.wait_for(reply_topic).json()
        assert reply["status"] == "ok"
        assert reply["id"] == "old-client"
    finally:
        old.close()


def test_mqtt5_response_topic_and_correlation_data(shared_agent, client):
    reply_topic = f"edgeai/reply/{uuid.uuid4().hex[:8]}"
    client.subscribe(reply_topic)
    client.publish(
        f"{shared_agent.base}/generate",
        "an apple",
        response_topic=reply_topic,
        correlation_data=b"\x00corr-42",
    )
    reply = client.wait_for(reply_topic)
    assert reply.correlation_data == b"\x00corr-42"
    assert reply.json()["status"] == "ok"
    # Errors go back the same way.
    client.publish(
        f"{shared_agent.base}/generate", "{", response_topic=reply_topic, correlation_data=b"bad"
    )
    error = client.wait_for(reply_topic, lambda m: m.correlation_data == b"bad")
    assert error.json()["error"]["code"] == "invalid_json"


def test_cancel_a_running_job_and_a_queued_one(shared_agent, client):
    base = shared_agent.base
    client.subscribe(f"{base}/jobs/+", f"{base}/result/+")
    client.publish(
        f"{base}/generate", json.dumps({"prompt": "long", "id": "long-run", "steps": 50})
    )
    client.publish(f"{base}/generate", json.dumps({"prompt": "next", "id": "waiting"}))
    client.wait_for(f"{base}/jobs/long-run", lambda m: m.json().get("step") == 1)
    client.publish(f"{base}/cancel", json.dumps({"id": "waiting"}))
    client.publish(f"{base}/cancel", json.dumps({"id": "long-run"}))
    running = client.wait_for(f"{base}/result/long-run").json()
    waiting = client.wait_for(f"{base}/result/waiting").json()
    assert running["status"] == waiting["status"] == "error"
    assert running["error"]["code"] == waiting["error"]["code"] == "cancelled"
    steps_run = [
        m.json()["step"]
        for m in client.messages(f"{base}/jobs/long-run")
        if m.json()["event"] == "running"
    ]
    assert max(steps_run) < 50  # stopped part way, not run to the end
    assert client.wait_for(f"{base}/jobs/long-run", lambda m: m.json()["event"] == "cancelled")
    assert client.wait_for(f"{base}/jobs/waiting", lambda m: m.json()["event"] == "cancelled")
    # A cancel for a job that does not exist is answered too.
    client.subscribe(f"{base}/errors")
    client.publish(f"{base}/cancel", json.dumps({"id": "no-such-job"}))
    assert client.wait_for(f"{base}/errors", lambda m: m.json()["error"]["code"] == "unknown_job")
    # And the agent still serves.
    assert generate(client, shared_agent)["status"] == "ok"


def test_a_cancel_sent_right_behind_its_request_is_never_lost(shared_agent, client):
    base = shared_agent.base
    client.subscribe(f"{base}/result/+", f"{base}/errors")
    for index in range(3):
        job_id = f"sent-then-cancelled-{index}"
        request = {"prompt": "long", "id": job_id, "steps": 50}
        client.publish(f"{base}/generate", json.dumps(request))
        client.publish(f"{base}/cancel", json.dumps({"id": job_id}))  # no wait between
        assert client.wait_for(f"{base}/result/{job_id}").json()["error"]["code"] == "cancelled"
    unknown = [m.json() for m in client.messages(f"{base}/errors")]
    assert not [e for e in unknown if "sent-then-cancelled" in e["error"]["message"]], unknown


def test_retained_requests_are_refused_not_run(shared_agent, client):
    base = shared_agent.base
    client.subscribe(f"{base}/errors", f"{base}/jobs/retained-job", f"{base}/result/retained-job")
    client.publish(
        f"{base}/generate", json.dumps({"prompt": "x", "id": "retained-job"}), retain=True
    )
    # The refusal carries the id it could read, on that id's result topic.
    refusal = client.wait_for(f"{base}/result/retained-job").json()
    assert refusal["error"]["code"] == "retained_request"
    assert refusal["id"] == "retained-job"
    client.publish(f"{base}/generate", "", retain=True)  # clear it from the broker again
    client.publish(f"{base}/generate", "a bare retained prompt", retain=True)
    assert client.wait_for(f"{base}/errors").json()["error"]["code"] == "retained_request"
    client.publish(f"{base}/generate", "", retain=True)
    assert generate(client, shared_agent, id="after-retained")["status"] == "ok"
    assert client.messages(f"{base}/jobs/retained-job") == []


def test_a_retained_cancel_is_refused_and_cancels_nothing(shared_agent, client):
    base = shared_agent.base
    client.subscribe(f"{base}/errors", f"{base}/result/kept-running")
    client.publish(
        f"{base}/generate", json.dumps({"prompt": "long", "id": "kept-running", "steps": 20})
    )
    client.publish(f"{base}/cancel", json.dumps({"id": "kept-running"}), retain=True)
    refusal = client.wait_for(f"{base}/errors", lambda m: m.json()["id"] == "kept-running")
    assert refusal.json()["error"]["code"] == "retained_request"
    client.publish(f"{base}/cancel", "", retain=True)  # clear it from the broker again
    assert client.wait_for(f"{base}/result/kept-running", timeout=120).json()["status"] == "ok"


def test_errors_carry_the_id_whenever_it_could_be_read(shared_agent, client):
    base = shared_agent.base
    client.subscribe(f"{base}/errors", f"{base}/result/bad-topic-1")
    # A bad MQTT 5 Response Topic: the error goes to the id's result topic, never to that topic.
    client.publish(
        f"{base}/generate",
        json.dumps({"prompt": "x", "id": "bad-topic-1"}),
        response_topic="edgeai/reply/#",
    )
    error = client.wait_for(f"{base}/result/bad-topic-1").json()
    assert error["id"] == "bad-topic-1"
    assert error["error"]["code"] == "bad_reply_to"
    # Cancels: answered on <base>/errors (result/<id> is the job's own answer), with the id.
    client.publish(f"{base}/cancel", json.dumps({"id": "no-such-job-2"}))
    unknown = client.wait_for(f"{base}/errors", lambda m: m.json()["id"] == "no-such-job-2")
    assert unknown.json()["error"]["code"] == "unknown_job"
    client.publish(f"{base}/cancel", json.dumps({"id": "odd-cancel", "extra": 1}))
    odd = client.wait_for(f"{base}/errors", lambda m: m.json()["id"] == "odd-cancel")
    assert odd.json()["error"]["code"] != "unknown_job"


def test_a_reused_id_never_changes_what_an_issued_url_serves(shared_agent, client):
    first = generate(client, shared_agent, id="reused-1", output="url", seed=1)
    first_path = first["image"]["url"].removeprefix(shared_agent.url)
    status, _, first_bytes = shared_agent.http_get(first_path)
    assert status == 200
    # The same id again, another request (the journal replaces a finished job's row).
    request = {"id": "reused-1", "output": "url", "seed": 2, "prompt": "a pear"}
    client.publish(f"{shared_agent.base}/generate", json.dumps(request))
    second = client.wait_for(
        f"{shared_agent.base}/result/reused-1", lambda m: m.json().get("seed") == 2
    ).json()
    assert second["status"] == "ok"
    second_path = second["image"]["url"].removeprefix(shared_agent.url)
    assert second_path != first_path
    status, _, second_bytes = shared_agent.http_get(second_path)
    assert status == 200
    assert second_bytes != first_bytes
    # The URL handed out for the first job still serves the first picture.
    assert shared_agent.http_get(first_path)[2] == first_bytes


def test_an_id_is_never_run_twice(shared_agent, client):
    base = shared_agent.base
    client.subscribe(f"{base}/result/twice", f"{base}/jobs/twice")
    request = json.dumps({"prompt": "x", "id": "twice", "steps": 30})
    client.publish(f"{base}/generate", request)
    client.publish(f"{base}/generate", request)  # a resend while it runs: answered once
    client.publish(f"{base}/generate", json.dumps({"prompt": "y", "id": "twice"}))
    refusal = client.wait_for(f"{base}/result/twice").json()
    assert refusal["error"]["code"] == "duplicate_id"  # another request under a busy id
    first = client.wait_for(f"{base}/result/twice", lambda m: m.json()["status"] == "ok").json()
    queued = [m for m in client.messages(f"{base}/jobs/twice") if m.json()["event"] == "queued"]
    assert len(queued) == 1
    # Sent again after it finished, the same request gets the stored result, not a new image.
    client.publish(f"{base}/generate", request)
    deadline = time.monotonic() + 30
    while len(results := [m.json() for m in client.messages(f"{base}/result/twice")]) < 3:
        assert time.monotonic() < deadline, "the stored result was not sent again"
        time.sleep(0.05)
    assert results[2] == first
    assert (
        len([m for m in client.messages(f"{base}/jobs/twice") if m.json()["event"] == "queued"])
        == 1
    )
