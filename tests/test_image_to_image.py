"""Image-to-image over MQTT: a picture to start from, its bounds, its journal, its metric."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import signal
import time

import pytest
from aiohttp import web
from PIL import Image

from tests.conftest import fill_up, generate
from tests.pictures import b64, picture, png_header_only, zip_bomb_png
from tests.threaded_server import ThreadedServer


def image_of(result: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(result["image"]["b64"])))


def digest(result: dict) -> str:
    return hashlib.sha256(base64.b64decode(result["image"]["b64"])).hexdigest()


def test_a_picture_is_restyled_the_same_way_twice_and_differently_from_another(
    shared_agent, client
):
    first = b64(picture(seed=1))
    a = generate(client, shared_agent, init_image=first, seed=5, prompt="a watercolour")
    b = generate(client, shared_agent, init_image=first, seed=5, prompt="a watercolour")
    other = generate(
        client, shared_agent, init_image=b64(picture(seed=2)), seed=5, prompt="a watercolour"
    )
    text = generate(client, shared_agent, seed=5, prompt="a watercolour", width=320, height=256)
    assert a["status"] == "ok", a
    assert digest(a) == digest(b)
    assert digest(a) != digest(other)
    assert digest(a) != digest(text)
    # The picture's size is the output's; 1 step at the default strength 0.5 runs one step.
    assert (a["width"], a["height"]) == (320, 256)
    assert image_of(a).size == (320, 256)
    assert (a["mode"], a["strength"], a["steps"]) == ("img2img", 0.5, 1)
    assert text["mode"] == "txt2img"
    assert "strength" not in text


def test_the_output_takes_the_pictures_size_within_the_bounds(shared_agent, client):
    """A 1920x1080 JPEG comes out 1024x576; a 200x100 one is scaled up to 512x256."""
    wide = generate(client, shared_agent, init_image=b64(picture(1920, 1080, fmt="JPEG")))
    small = generate(client, shared_agent, init_image=b64(picture(200, 100, fmt="WEBP")))
    given = generate(
        client, shared_agent, init_image=b64(picture(1920, 1080, fmt="JPEG")), width=512, height=512
    )
    one_side = generate(
        client, shared_agent, init_image=b64(picture(1920, 1080, fmt="JPEG")), width=768
    )
    assert (wide["width"], wide["height"]) == (1024, 576), wide
    assert (small["width"], small["height"]) == (512, 256), small
    assert (given["width"], given["height"]) == (512, 512), given
    assert image_of(given).size == (512, 512)
    assert (one_side["width"], one_side["height"]) == (768, 432), one_side
    # A phone's photo, stored sideways with its EXIF orientation: turned upright first.
    upright = generate(
        client, shared_agent, init_image=b64(picture(320, 256, fmt="JPEG", orientation=6))
    )
    assert (upright["width"], upright["height"]) == (256, 320), upright


def test_steps_and_strength_decide_the_steps_run_and_progress_counts_them(shared_agent, client):
    job_id = "img2img-steps"
    client.subscribe(f"{shared_agent.base}/jobs/{job_id}")
    result = generate(
        client,
        shared_agent,
        id=job_id,
        init_image=b64(picture()),
        steps=8,
        strength=0.75,
    )
    assert result["steps"] == 6
    running = [
        m.json()
        for m in client.messages(f"{shared_agent.base}/jobs/{job_id}")
        if m.json()["event"] == "running" and m.json()["step"] > 0
    ]
    assert [event["step"] for event in running] == [1, 2, 3, 4, 5, 6]
    assert {event["steps"] for event in running} == {6}


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"init_image": b64(b"this is not a picture")}, "bad_image"),
        ({"init_image": b64(picture()[:300])}, "bad_image"),  # truncated
        ({"init_image": b64(picture(fmt="GIF"))}, "bad_image"),  # not PNG, JPEG or WebP
        ({"init_image": b64(png_header_only(100_000, 100_000))}, "bad_image"),  # Pillow's bomb
        ({"init_image": b64(zip_bomb_png())}, "bad_image"),  # 36 megapixels in 100 KB
        ({"init_image": "not base64 at all!"}, "bad_image"),
        ({"init_image": ""}, "bad_image"),
        ({"init_image": "http://camera.local/snapshot.jpg"}, "bad_image"),  # no host allowed
        ({"init_image": "file:///etc/passwd"}, "bad_image"),
        ({"init_image": b64(picture()), "strength": 0}, "out_of_range"),
        ({"init_image": b64(picture()), "strength": 1.5}, "out_of_range"),
        ({"init_image": b64(picture()), "strength": "half"}, "invalid_request"),
        ({"strength": 0.5}, "invalid_request"),  # no picture to start from
        ({"init_image": b64(picture()), "width": 100}, "out_of_range"),
        ({"init_image": 42}, "invalid_request"),
    ],
    ids=[
        "not-an-image",
        "truncated",
        "gif",
        "declared-huge",
        "zip-bomb",
        "not-base64",
        "empty",
        "url-not-allowed",
        "file-url",
        "strength-zero",
        "strength-over-one",
        "strength-text",
        "strength-alone",
        "width-out-of-range",
        "not-a-string",
    ],
)
def test_a_bad_picture_gets_a_clear_error_and_a_metric(shared_agent, client, fields, code):
    result = generate(client, shared_agent, **fields)
    assert result["status"] == "error", result
    assert result["error"]["code"] == code, result
    assert result["id"]
    assert result["error"]["message"]
    # The agent goes on answering, and the refusal is counted as image-to-image.
    assert generate(client, shared_agent)["status"] == "ok"
    mode = "img2img" if "init_image" in fields else "txt2img"
    assert shared_agent.metric("edgeai_requests_total", outcome=code, mode=mode) >= 1


def test_a_snapshot_passes_the_image_bound_and_text_alone_keeps_the_tight_one(shared_agent, client):
    snapshot = b64(picture(1024, 1024, fmt="JPEG"))  # random noise: a worst-case JPEG
    assert 150_000 < len(snapshot) < 4 * 1024 * 1024
    assert generate(client, shared_agent, init_image=snapshot)["status"] == "ok"
    padded = generate(client, shared_agent, prompt="x" * 500, negative_prompt=" " * 17_000)
    assert padded["error"]["code"] == "payload_too_large"
    # Over the image bound the request is not even parsed: its id is unknown, so the error
    # goes to <base>/errors.
    client.subscribe(f"{shared_agent.base}/errors")
    marker = "A" * (4 * 1024 * 1024 + 4)
    client.publish(f"{shared_agent.base}/generate", json.dumps({"init_image": marker}))
    too_big = client.wait_for(
        f"{shared_agent.base}/errors",
        lambda m: (
            m.json()["error"]["code"] == "payload_too_large"
            and "with an init_image" in m.json()["error"]["message"]
        ),
    ).json()
    assert too_big["id"] is None


def test_the_regenerate_button_restyles_the_last_picture_again(shared_agent, client):
    base = shared_agent.base
    first = generate(client, shared_agent, init_image=b64(picture(384, 256)), seed=1)
    assert first["status"] == "ok"
    client.subscribe(f"{base}/image/attributes")
    client.publish(f"{base}/regenerate", "")
    attributes = client.wait_for(
        f"{base}/image/attributes", lambda m: m.json()["id"] != first["id"]
    ).json()
    assert (attributes["width"], attributes["height"]) == (384, 256)


class PictureServer:
    """A camera's snapshot URL: the file, a slow answer, a huge one, a redirect."""

    def __init__(self) -> None:
        self.snapshot = picture(400, 300, fmt="JPEG")
        app = web.Application()
        app.router.add_get("/snapshot.jpg", self.file)
        app.router.add_get("/slow.jpg", self.slow)
        app.router.add_get("/huge.jpg", self.huge)
        app.router.add_get("/moved.jpg", self.moved)
        app.router.add_get("/missing.jpg", self.missing)
        self.server = ThreadedServer(app)

    async def file(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.snapshot, content_type="image/jpeg")

    async def slow(self, _request: web.Request) -> web.Response:
        await asyncio_sleep(30)
        return web.Response(body=self.snapshot, content_type="image/jpeg")

    async def huge(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # chunked: no length to refuse it by
        await response.prepare(request)
        for _ in range(80):
            await response.write(b"\0" * 65536)  # 5 MiB, over the 4 MiB bound
        return response

    async def moved(self, _request: web.Request) -> web.Response:
        raise web.HTTPFound("http://127.0.0.2/snapshot.jpg")

    async def missing(self, _request: web.Request) -> web.Response:
        raise web.HTTPNotFound


async def asyncio_sleep(seconds: float) -> None:
    import asyncio  # noqa: PLC0415

    await asyncio.sleep(seconds)


def test_a_picture_is_fetched_only_from_an_allowed_host_within_bounds(broker, make_agent):
    server = PictureServer()
    try:
        agent = make_agent(
            broker,
            EDGEAI_INIT_IMAGE_HOSTS=f'["127.0.0.1:{server.server.port}"]',
            EDGEAI_INIT_IMAGE_FETCH_TIMEOUT_S="2",
        )
        client = broker.client()
        url = f"http://127.0.0.1:{server.server.port}"
        fetched = generate(client, agent, init_image=f"{url}/snapshot.jpg", seed=3)
        sent = generate(client, agent, init_image=b64(server.snapshot), seed=3)
        assert fetched["status"] == "ok", fetched
        assert (fetched["width"], fetched["height"]) == (400, 304)
        assert digest(fetched) == digest(sent)
        began = time.monotonic()
        slow = generate(client, agent, init_image=f"{url}/slow.jpg")
        assert time.monotonic() - began < 10
        for name, result in (
            ("slow", slow),
            ("huge", generate(client, agent, init_image=f"{url}/huge.jpg")),
            ("moved", generate(client, agent, init_image=f"{url}/moved.jpg")),
            ("missing", generate(client, agent, init_image=f"{url}/missing.jpg")),
            ("other host", generate(client, agent, init_image="http://localhost:1/a.jpg")),
        ):
            assert result["error"]["code"] == "bad_image", (name, result)
        # The client hears one reason; the log says which (the slow one: the timeout).
        assert "did not answer within 2 s" in agent.log()
        client.close()
    finally:
        server.server.stop()


def test_a_journaled_picture_survives_kill_9_and_goes_once_answered(broker, make_agent):
    agent = make_agent(broker)
    client = broker.client(persistent=True)
    base = agent.base
    client.subscribe(f"{base}/result/+", f"{base}/jobs/+")
    blocker = {"prompt": "blocker", "id": "blocker", "steps": 8, "width": 1024, "height": 1024}
    client.publish(f"{base}/generate", json.dumps(blocker))
    client.wait_for(f"{base}/jobs/blocker", lambda m: m.json().get("step") == 1)
    request = {"prompt": "restyle", "id": "restyle", "init_image": b64(picture()), "seed": 9}
    client.publish(f"{base}/generate", json.dumps(request))
    client.wait_for(f"{base}/jobs/restyle", lambda m: m.json()["event"] == "queued")
    stored = list((agent.state_dir / "init-images").iterdir())
    assert [path.name.split(".")[0] for path in stored] == ["restyle"]
    agent.signal(signal.SIGKILL)
    agent.process.wait()
    agent.start()
    result = client.wait_for(f"{base}/result/restyle").json()
    assert result["status"] == "ok", result
    assert result["mode"] == "img2img"
    deadline = time.monotonic() + 10
    while list((agent.state_dir / "init-images").iterdir()):
        assert time.monotonic() < deadline, "the answered job's picture was kept"
        time.sleep(0.1)
    # The same request, run by an agent that was never killed, gives the same picture.
    again = generate(client, agent, **{**request, "id": "restyle-again"})
    assert digest(again) == hashlib.sha256(base64.b64decode(result["image"]["b64"])).hexdigest()
    client.close()


def test_a_request_sent_twice_runs_once_and_keeps_no_second_picture(broker, make_agent):
    """A QoS 1 redelivery (the same payload again) is answered from the journal: its picture,
    stored again while it was checked, is removed, and the first job's once it is answered."""
    agent = make_agent(broker)
    client = broker.client()
    base = agent.base
    request = json.dumps({"id": "twice", "prompt": "x", "init_image": b64(picture())})
    client.subscribe(f"{base}/result/twice")
    client.publish(f"{base}/generate", request)
    client.publish(f"{base}/generate", request)
    assert client.wait_for(f"{base}/result/twice").json()["status"] == "ok"
    deadline = time.monotonic() + 10
    while agent.metric("edgeai_requests_total", outcome="redelivered", mode="img2img") != 1:
        assert time.monotonic() < deadline, "the second copy was not taken as a redelivery"
        time.sleep(0.1)
    while list((agent.state_dir / "init-images").iterdir()):
        assert time.monotonic() < deadline, "a picture was kept after its job was answered"
        time.sleep(0.1)
    client.close()


def test_a_full_disk_refuses_the_picture_and_room_again_restyles_it(
    broker, make_agent, small_disk, tmp_path
):
    agent = make_agent(
        broker,
        EDGEAI_STATE_DIR=str(small_disk / "state"),
        EDGEAI_IMAGE_DIR=str(tmp_path / "images"),
    )
    client = broker.client()
    fill_up(small_disk)
    refused = generate(client, agent, id="full", init_image=b64(picture()))
    print("a picture on a full disk:", refused)
    assert refused["error"]["code"] == "storage_full"
    folder = small_disk / "state" / "init-images"
    assert f"cannot write the init image in {folder}" in refused["error"]["message"]
    assert not list(folder.iterdir())  # no half-written file
    status, _, body = agent.http_get("/healthz")  # told as every storage failure is
    assert status == 503
    assert "the init image" in json.loads(body)["storage"]
    (small_disk / "other-data").unlink()
    assert generate(client, agent, id="room", init_image=b64(picture()))["status"] == "ok"
    assert agent.http_get("/healthz")[0] == 200
    client.close()
