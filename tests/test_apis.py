"""The image APIs other tools speak: OpenAI's (with the official client) and AUTOMATIC1111's.

The agent runs as a user runs it (a process, a real broker, the tiny model), and the clients
send what they send in the wild: the ``openai`` package, and the requests Open WebUI's
Automatic1111 engine makes (HTTP Basic with the token as the password).
"""

from __future__ import annotations

import base64
import io
import json
import socket
import time
import urllib.request

import openai
import pytest
from PIL import Image

from tests.conftest import API_TOKEN, AgentProcess

TOKEN = API_TOKEN


@pytest.fixture(scope="module")
def api_agent(module_broker, tiny_model, tmp_path_factory):
    env = {
        "EDGEAI_API_TOKEN": TOKEN,
        "EDGEAI_HTTP_AUTH": "true",
        "EDGEAI_MAX_STEPS": "50",
        "EDGEAI_MAX_QUEUE": "2",
    }
    agent = AgentProcess(module_broker, tiny_model, tmp_path_factory.mktemp("api-agent"), env)
    agent.start()
    yield agent
    agent.stop()


def openai_client(agent, token: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{agent.url}/v1", api_key=token, max_retries=0, timeout=120)


def picture(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def call(agent, method: str, path: str, body=None, headers=None, *, timeout=120):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(agent.url + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def basic(token: str = TOKEN) -> dict[str, str]:
    """What Open WebUI sends for AUTOMATIC1111_API_AUTH = "user:<token>"."""
    return {"authorization": "Basic " + base64.b64encode(f"user:{token}".encode()).decode()}


def occupy(agent, jobs: int) -> list[str]:
    """Hold the agent busy: slow jobs through the page's API (asynchronous, 202 at once)."""
    ids = []
    for index in range(jobs):
        job_id = f"slow-{time.monotonic_ns()}-{index}"
        body = {"id": job_id, "prompt": "slow", "steps": 50, "width": 1024, "height": 1024}
        status, _ = call(agent, "POST", "/api/jobs", body, {"Authorization": f"Bearer {TOKEN}"})
        assert status == 202
        ids.append(job_id)
    return ids


def wait_done(agent, job_ids: list[str]) -> None:
    for job_id in job_ids:
        deadline = time.monotonic() + 120
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        while call(agent, "GET", f"/api/jobs/{job_id}", None, bearer)[1]["status"] != "done":
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_the_openai_client_generates_images_as_base64_and_as_urls(api_agent):
    client = openai_client(api_agent)
    answer = client.images.generate(
        model="dall-e-3",  # any name: the loaded model answers
        prompt="a red apple",
        n=2,
        size="320x256",
        response_format="b64_json",
        extra_body={"seed": 42, "steps": 2},
    )
    print("openai b64_json:", [len(item.b64_json) for item in answer.data], answer.created)
    assert len(answer.data) == 2
    images = [picture(base64.b64decode(item.b64_json)) for item in answer.data]
    assert [image.size for image in images] == [(320, 256), (320, 256)]
    assert {item.revised_prompt for item in answer.data} == {"a red apple"}
    again = client.images.generate(
        prompt="a red apple", size="320x256", extra_body={"seed": 42, "steps": 2}
    )
    assert again.data[0].b64_json == answer.data[0].b64_json  # same seed, same image
    linked = client.images.generate(
        prompt="a lighthouse", response_format="url", output_format="jpeg"
    )
    url = linked.data[0].url
    print("openai url:", url)
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"] == "image/jpeg"
        assert picture(response.read()).size == (512, 512)


def test_the_openai_client_lists_the_model_and_gets_openai_errors(api_agent, tiny_model):
    client = openai_client(api_agent)
    models = client.models.list()
    print("openai models:", [model.id for model in models.data])
    assert [model.id for model in models.data] == [tiny_model.name]
    with pytest.raises(openai.BadRequestError) as bad_size:
        client.images.generate(prompt="x", size="513x512")
    error = bad_size.value.body
    print("openai bad size:", bad_size.value.status_code, error)
    assert bad_size.value.status_code == 400
    assert error["param"] == "size"
    assert error["code"] == "bad_size"
    assert "multiple of 8" in error["message"]
    assert error["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as too_many:
        client.images.generate(prompt="x", n=5)
    assert too_many.value.body["param"] == "n"
    with pytest.raises(openai.AuthenticationError) as wrong:
        openai_client(api_agent, token="wrong").images.generate(prompt="x")
    assert wrong.value.status_code == 401
    assert wrong.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai_client(api_agent, token="wrong").models.list()


def test_a_full_queue_answers_busy_in_each_api_and_nothing_is_lost(api_agent):
    slow = occupy(api_agent, 3)  # one running, two waiting: the queue (2) is full
    client = openai_client(api_agent)
    with pytest.raises(openai.RateLimitError) as busy:
        client.images.generate(prompt="x")
    assert busy.value.status_code == 429
    assert busy.value.body["code"] == "busy"
    status, body = call(api_agent, "POST", "/sdapi/v1/txt2img", {"prompt": "x"}, basic())
    assert status == 429
    assert body["error"] == "busy"
    for job_id in slow:  # done with them: cancelled, and answered as such
        status, _ = call(
            api_agent,
            "POST",
            f"/api/jobs/{job_id}/cancel",
            {},
            {"Authorization": f"Bearer {TOKEN}"},
        )
        assert status == 202
    wait_done(api_agent, slow)
    assert api_agent.metric("edgeai_api_requests_total", api="openai", outcome="busy") >= 1
    assert api_agent.metric("edgeai_api_requests_total", api="a1111", outcome="busy") == 1


def test_a_client_that_hangs_up_leaves_its_job_to_finish(api_agent, client):
    done = api_agent.metric("edgeai_jobs_total", status="done")
    client.subscribe(f"{api_agent.base}/result/+")
    body = json.dumps({"prompt": "a client that leaves", "steps": 20}).encode()
    with socket.create_connection(("127.0.0.1", api_agent.http_port)) as connection:
        connection.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: agent\r\n"
            + f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n".encode()
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        time.sleep(0.5)  # admitted; the client goes away while it runs

    def answered() -> list[dict]:
        return [
            m.json()
            for m in client.messages_matching(f"{api_agent.base}/result/")
            if m.json().get("prompt") == "a client that leaves"
        ]

    deadline = time.monotonic() + 120
    while not answered() or api_agent.metric("edgeai_jobs_total", status="done") < done + 1:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1)  # a second answer would arrive now
    assert len(answered()) == 1  # answered once, on MQTT like every job
    assert answered()[0]["status"] == "ok"
    assert api_agent.metric("edgeai_queue_depth") == 0
    assert openai_client(api_agent).images.generate(prompt="next").data  # and it goes on


def test_a_request_that_waits_too_long_is_answered_and_its_job_goes_on(broker, make_agent):
    agent = make_agent(broker, EDGEAI_API_WAIT_S="0.5", EDGEAI_MAX_STEPS="50")
    client = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.InternalServerError) as late:
        client.images.generate(prompt="slow", size="512x512", extra_body={"steps": 50})
    assert late.value.status_code == 503
    assert late.value.body["code"] == "timeout"
    job_id = late.value.body["message"].split("as job ")[1].split(" ")[0]
    wait_done(agent, [job_id])


def test_what_open_webui_sends_to_automatic1111(api_agent, client):
    # Open WebUI's engine: options (the default model), sd-models (the list), then txt2img.
    status, options = call(api_agent, "GET", "/sdapi/v1/options", headers=basic())
    assert status == 200
    checkpoint = options["sd_model_checkpoint"]
    status, models = call(api_agent, "GET", "/sdapi/v1/sd-models", headers=basic())
    assert status == 200
    assert [model["title"] for model in models] == [checkpoint]
    assert set(models[0]) >= {"title", "model_name", "hash", "filename"}
    client.subscribe(f"{api_agent.base}/result/+")
    request = {
        "prompt": "a fox in the snow",
        "batch_size": 2,
        "width": 256,
        "height": 320,
        "steps": 2,
        "negative_prompt": "blurry",
        "sampler_name": "Euler a",  # A1111's own fields are accepted and ignored
        "seed": 7,
    }
    status, answer = call(api_agent, "POST", "/sdapi/v1/txt2img", request, basic())
    print("a1111 txt2img:", status, answer["parameters"], answer["info"])
    assert status == 200
    images = [picture(base64.b64decode(data)) for data in answer["images"]]
    assert [image.size for image in images] == [(256, 320), (256, 320)]
    assert [image.format for image in images] == ["PNG", "PNG"]
    info = json.loads(answer["info"])
    assert info["all_seeds"] == [7, 8]
    assert info["negative_prompt"] == "blurry"
    assert answer["parameters"]["batch_size"] == 2
    for job_id in info["job_ids"]:  # announced on MQTT like every other job
        assert client.wait_for(f"{api_agent.base}/result/{job_id}").json()["status"] == "ok"
    # A checkpoint that is not installed: refused, naming those that are.
    status, refused = call(
        api_agent, "POST", "/sdapi/v1/options", {"sd_model_checkpoint": "other"}, basic()
    )
    assert status == 400
    assert refused["error"] == "unknown_model"
    assert checkpoint in refused["errors"]
    status, progress = call(api_agent, "GET", "/sdapi/v1/progress", headers=basic())
    assert status == 200
    assert 0.0 <= progress["progress"] <= 1.0
    assert {"eta_relative", "state"} <= set(progress)
    assert api_agent.metric("edgeai_api_requests_total", api="a1111", outcome="accepted") >= 2


def test_automatic1111_refuses_a_wrong_token_and_bad_sizes(api_agent):
    for headers in (basic("wrong"), {}, {"authorization": "Bearer wrong"}):
        status, body = call(api_agent, "POST", "/sdapi/v1/txt2img", {"prompt": "x"}, headers)
        assert status == 401
        assert body["error"] == "unauthorized"
    status, _ = call(
        api_agent, "GET", "/sdapi/v1/options", headers={"authorization": f"Bearer {TOKEN}"}
    )
    assert status == 200  # Bearer works too
    status, body = call(
        api_agent, "POST", "/sdapi/v1/txt2img", {"prompt": "x", "width": 100}, basic()
    )
    assert status == 400
    assert body["error"] == "out_of_range"
    assert "width" in body["detail"]
    status, body = call(
        api_agent, "POST", "/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": 99}, basic()
    )
    assert status == 400
    assert "cfg_scale" in body["detail"]
