"""Image-to-image over HTTP: OpenAI's edits (the openai package, Open WebUI's form),
AUTOMATIC1111's img2img, the page's API, and what a hostile client sends them."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import socket
import uuid

import aiohttp
import openai
import pytest
from PIL import Image

from tests.pictures import b64, picture
from tests.test_apis import TOKEN, basic, call, openai_client

BEARER = {"Authorization": f"Bearer {TOKEN}"}


def size_of(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def test_the_openai_package_edits_a_picture(token_agent, tmp_path):
    client = openai_client(token_agent)
    photo = tmp_path / "doorbell.png"
    photo.write_bytes(picture(640, 480, seed=4))
    with photo.open("rb") as file:
        first = client.images.edit(
            image=file, prompt="a watercolour", extra_body={"seed": 11, "strength": 0.6}
        )
    with photo.open("rb") as file:
        again = client.images.edit(
            image=file, prompt="a watercolour", extra_body={"seed": 11, "strength": 0.6}
        )
    other = tmp_path / "other.png"
    other.write_bytes(picture(640, 480, seed=5))
    with other.open("rb") as file:
        different = client.images.edit(
            image=file, prompt="a watercolour", extra_body={"seed": 11, "strength": 0.6}
        )
    data = base64.b64decode(first.data[0].b64_json)
    assert size_of(data) == (640, 480)  # the picture's own size
    assert data == base64.b64decode(again.data[0].b64_json)
    assert data != base64.b64decode(different.data[0].b64_json)
    with photo.open("rb") as file:
        sized = client.images.edit(
            image=file, prompt="x", size="512x512", n=2, response_format="url"
        )
    assert len(sized.data) == 2
    for entry in sized.data:
        status, _, body = token_agent.http_get(entry.url.removeprefix(token_agent.url))
        assert status == 200
        assert size_of(body) == (512, 512)
    assert token_agent.metric("edgeai_requests_total", outcome="accepted", mode="img2img") >= 5


def test_the_openai_package_hears_why_an_edit_is_refused(token_agent, tmp_path):
    client = openai_client(token_agent)
    photo = tmp_path / "doorbell.png"
    photo.write_bytes(picture())
    with photo.open("rb") as file, pytest.raises(openai.BadRequestError) as masked:
        client.images.edit(image=file, mask=io.BytesIO(picture()), prompt="x")
    assert masked.value.body["param"] == "mask"
    assert "inpainting" in masked.value.body["message"]
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a picture at all")
    with junk.open("rb") as file, pytest.raises(openai.BadRequestError) as bad:
        client.images.edit(image=file, prompt="x")
    assert (bad.value.body["code"], bad.value.body["param"]) == ("bad_image", "image")
    with photo.open("rb") as file, pytest.raises(openai.BadRequestError) as strength:
        client.images.edit(image=file, prompt="x", extra_body={"strength": 3})
    assert (strength.value.body["code"], strength.value.body["param"]) == (
        "out_of_range",
        "strength",
    )
    with photo.open("rb") as file, pytest.raises(openai.AuthenticationError):
        openai_client(token_agent, token="wrong").images.edit(image=file, prompt="x")


def test_what_open_webui_sends_when_it_edits_an_image(token_agent):
    """Open WebUI's image_edits (backend/open_webui/routers/images.py), OpenAI engine: an
    aiohttp form of model, prompt, n, size and response_format, the picture as a file named
    after a uuid, Bearer auth. The model is the one its settings page offers from /v1/models."""
    snapshot = picture(800, 600, seed=8, fmt="JPEG")

    async def send() -> tuple[int, dict]:
        form = aiohttp.FormData()
        for key, value in {
            "model": token_agent.model.name,  # the tiny model's name, as listed
            "prompt": "turn it into a watercolour",
            "n": 1,
            "size": "768x576",
            "response_format": "b64_json",
        }.items():
            form.add_field(key, str(value))
        form.add_field(
            "image", io.BytesIO(snapshot), filename=f"{uuid.uuid4()}.jpg", content_type="image/jpeg"
        )
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{token_agent.url}/v1/images/edits", headers=BEARER, data=form) as r,
        ):
            return r.status, await r.json(content_type=None)

    status, answer = asyncio.run(send())
    assert status == 200, answer
    assert size_of(base64.b64decode(answer["data"][0]["b64_json"])) == (768, 576)


def test_automatic1111_img2img_answers_like_txt2img(token_agent):
    body = {
        "init_images": ["data:image/png;base64," + b64(picture(512, 384, seed=3))],
        "denoising_strength": 0.5,
        "prompt": "a watercolour",
        "negative_prompt": "blurry",
        "steps": 2,
        "seed": 21,
        "batch_size": 2,
        "n_iter": 1,
        "sampler_name": "Euler a",  # AUTOMATIC1111's own, accepted and ignored
        "resize_mode": 0,
    }
    status, answer = call(token_agent, "POST", "/sdapi/v1/img2img", body, basic())
    assert status == 200, answer
    assert len(answer["images"]) == 2
    info = json.loads(answer["info"])
    assert info["all_seeds"] == [21, 22]
    assert (info["width"], info["height"], info["steps"]) == (512, 384, 1)
    assert info["denoising_strength"] == 0.5
    assert size_of(base64.b64decode(answer["images"][0])) == (512, 384)
    again = call(token_agent, "POST", "/sdapi/v1/img2img", body, basic())[1]
    assert again["images"] == answer["images"]
    for broken, param in (
        ({**body, "mask": b64(picture())}, "mask"),
        ({**body, "init_images": []}, "init_images"),
        ({**body, "init_images": ["bm90IGEgcGljdHVyZQ=="]}, "init_images"),
        ({**body, "denoising_strength": 0}, "denoising_strength"),
    ):
        status, refused = call(token_agent, "POST", "/sdapi/v1/img2img", broken, basic())
        assert status == 400, refused
        assert refused["detail"].startswith(param), refused


def test_the_page_api_restyles_and_the_gallery_shows_the_source(token_agent):
    body = {"prompt": "a watercolour", "init_image": b64(picture(400, 300)), "strength": 0.7}
    status, created = call(token_agent, "POST", "/api/jobs", body, BEARER)
    assert status == 202, created
    job_id = created["id"]
    for _ in range(600):
        status, found = call(token_agent, "GET", f"/api/jobs/{job_id}", headers=BEARER)
        if found.get("status") == "done":
            break
        asyncio.run(asyncio.sleep(0.1))
    reply = found["reply"]
    assert (reply["mode"], reply["strength"]) == ("img2img", 0.7)
    _, gallery = call(token_agent, "GET", "/api/images", headers=BEARER)
    entry = next(image for image in gallery["images"] if image["id"] == job_id)
    source = entry["source_url"].removeprefix(token_agent.url)
    status, headers, thumbnail = token_agent.http_get(source)
    assert status == 200
    assert headers["Content-Type"] == "image/jpeg"
    assert max(size_of(thumbnail)) == 256
    text = call(
        token_agent,
        "POST",
        "/api/jobs",
        {"prompt": "x" * 900, "negative_prompt": " " * 16_000},
        BEARER,
    )
    assert text[0] == 413, text  # text alone keeps the tight bound on a route that takes pictures


# --- what a hostile client sends


def raw_post(agent, head: str, body: bytes, *, send_all: bool = True) -> bytes:
    """Send a POST by hand; return what the agent answered before it closed."""
    with socket.create_connection(("127.0.0.1", agent.http_port), timeout=20) as sock:
        sock.sendall(head.encode() + b"\r\n")
        try:
            if send_all:
                sock.sendall(body)
            else:
                sock.sendall(body[:65536])
        except (BrokenPipeError, ConnectionResetError):
            pass
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
    return b"".join(chunks)


def form_head(path: str, length: int, boundary: str = "b0undary", **extra: str) -> str:
    headers = {
        "Host": "agent",
        "Authorization": f"Bearer {TOKEN}",
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(length),
        # The answer is read until the agent closes: not kept alive for the idle timeout.
        "Connection": "close",
        **extra,
    }
    lines = [f"POST {path} HTTP/1.1", *(f"{name}: {value}" for name, value in headers.items())]
    return "\r\n".join(lines) + "\r\n"


def form_body(fields: dict[str, bytes], boundary: str = "b0undary") -> bytes:
    parts = []
    for name, value in fields.items():
        disposition = f'form-data; name="{name}"'
        if name == "image":
            disposition += '; filename="p.png"'
        parts.append(
            f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def test_an_oversized_upload_is_refused_unread(token_agent):
    huge = form_body({"prompt": b"x", "image": b"\0" * (5 * 1024 * 1024)})
    answer = raw_post(token_agent, form_head("/v1/images/edits", len(huge)), huge, send_all=False)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # Declared small, sent big (chunked): stopped once past the bound.
    head = form_head("/v1/images/edits", 0).replace(
        "Content-Length: 0", "Transfer-Encoding: chunked"
    )
    chunks = b"".join(
        f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        for piece in (huge[i : i + 1 << 20] for i in range(0, len(huge), 1 << 20))
    )
    answer = raw_post(token_agent, head, chunks + b"0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


@pytest.mark.parametrize(
    ("body", "head_extra", "status"),
    [
        (b"--nope\r\n\r\nnothing", {}, 400),  # no boundary that matches
        (form_body({"prompt": b"x"}), {}, 400),  # no image
        (form_body({f"f{n}": b"1" for n in range(80)}), {}, 400),  # too many fields
        (form_body({"prompt": b"x", "image": picture(), "n": b"many"}), {}, 400),
        (form_body({"prompt": b"x", "image": picture(), "size": b"huge"}), {}, 400),
        (form_body({"prompt": b"", "image": picture()}), {}, 400),
        (form_body({"prompt": b"x", "image": picture()}), {"Origin": "http://evil.example"}, 403),
    ],
    ids=[
        "bad-boundary",
        "no-image",
        "many-fields",
        "bad-n",
        "bad-size",
        "empty-prompt",
        "cross-site",
    ],
)
def test_a_broken_or_hostile_form_is_answered_and_runs_nothing(
    token_agent, body, head_extra, status
):
    accepted = token_agent.metric("edgeai_requests_total", outcome="accepted", mode="img2img")
    head = form_head("/v1/images/edits", len(body), **head_extra)
    answer = raw_post(token_agent, head, body)
    assert answer.startswith(f"HTTP/1.1 {status}".encode()), answer[:300]
    error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["message"]
    assert (
        token_agent.metric("edgeai_requests_total", outcome="accepted", mode="img2img") == accepted
    )


def test_a_form_is_taken_only_where_a_picture_is_expected(token_agent):
    body = form_body({"prompt": b"x", "image": picture(32, 32)})  # within every route's bound
    for path in ("/v1/images/generations", "/sdapi/v1/img2img", "/api/jobs"):
        answer = raw_post(token_agent, form_head(path, len(body)), body)
        assert answer.startswith(b"HTTP/1.1 415"), (path, answer[:200])


def test_the_same_picture_gives_the_same_bytes_through_every_api(token_agent, client):
    """MQTT, the page, OpenAI's edits and AUTOMATIC1111's img2img run the one path."""
    photo = picture(384, 384, seed=6)
    fields = {"prompt": "a watercolour", "seed": 5, "strength": 0.5, "steps": 2}
    openai_answer = openai_client(token_agent).images.edit(
        image=("p.png", photo, "image/png"),
        prompt=fields["prompt"],
        extra_body={"seed": 5, "strength": 0.5, "steps": 2},
    )
    a1111 = call(
        token_agent,
        "POST",
        "/sdapi/v1/img2img",
        {
            "init_images": [b64(photo)],
            "denoising_strength": 0.5,
            "prompt": fields["prompt"],
            "seed": 5,
            "steps": 2,
        },
        basic(),
    )[1]
    from tests.conftest import generate  # noqa: PLC0415

    mqtt = generate(client, token_agent, init_image=b64(photo), **fields)
    digests = {
        hashlib.sha256(base64.b64decode(data)).hexdigest()
        for data in (openai_answer.data[0].b64_json, a1111["images"][0], mqtt["image"]["b64"])
    }
    assert len(digests) == 1
