"""The web page's JSON API over real HTTP, and the page itself in headless Chromium."""

from __future__ import annotations

import functools
import http.client
import http.server
import json
import shutil
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from tests import pictures
from tests.conftest import ARTIFACTS
from tests.threaded_server import ThreadedServer


def call(agent, method: str, path: str, body: dict | bytes | None = None, token: str | None = None):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(agent.url + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_done(agent, job_id: str, timeout: float = 60, token: str | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, body = call(agent, "GET", f"/api/jobs/{job_id}", token=token)
        assert status == 200
        data = json.loads(body)
        if data["status"] == "done":
            return data
        assert time.monotonic() < deadline, data
        time.sleep(0.1)


def read_events(agent, job_id: str) -> list[tuple[str, dict]]:
    events = []
    with urllib.request.urlopen(f"{agent.url}/api/jobs/{job_id}/events", timeout=60) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        name = None
        for raw in response:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def test_api_creates_a_job_that_goes_through_the_same_queue_and_mqtt(shared_agent, client):
    client.subscribe(f"{shared_agent.base}/jobs/web-1", f"{shared_agent.base}/result/web-1")
    status, body = call(
        shared_agent,
        "POST",
        "/api/jobs",
        {"prompt": "a web apple", "id": "web-1", "steps": 3, "output": "url"},
    )
    assert status == 202
    assert json.loads(body)["id"] == "web-1"
    events = read_events(shared_agent, "web-1")
    names = [(name, data.get("event") or data.get("status")) for name, data in events]
    assert names[-1] == ("status", "done")
    steps = [data["step"] for name, data in events if name == "job" and data["event"] == "running"]
    assert steps[-1] == 3
    reply = wait_done(shared_agent, "web-1")["reply"]
    assert reply["status"] == "ok"
    path = reply["image"]["url"].removeprefix(shared_agent.url)
    image_status, _, image = shared_agent.http_get(path)
    assert image_status == 200
    assert image.startswith(b"\x89PNG")
    # Announced on MQTT like any job, and answered there too.
    client.wait_for(f"{shared_agent.base}/jobs/web-1", lambda m: m.json()["event"] == "done")
    assert client.wait_for(f"{shared_agent.base}/result/web-1").json()["status"] == "ok"
    gallery = json.loads(call(shared_agent, "GET", "/api/images")[1])["images"]
    assert gallery[0]["id"] == "web-1"
    assert gallery[0]["prompt"] == "a web apple"


def test_api_refusals_are_clear_and_counted(shared_agent):
    status, body = call(shared_agent, "POST", "/api/jobs", {"prompt": "x", "width": 513})
    assert status == 400
    assert json.loads(body)["error"]["code"] == "bad_size"
    status, body = call(shared_agent, "POST", "/api/jobs", b"{not json")
    assert status == 400
    assert json.loads(body)["error"]["code"] == "invalid_json"
    status, body = call(shared_agent, "POST", "/api/jobs", b"x" * 20000)
    assert status == 413
    assert call(shared_agent, "GET", "/api/jobs/no-such-job")[0] == 404
    assert 'edgeai_requests_total{mode="txt2img",outcome="bad_size"}' in shared_agent.metrics()


def test_api_cancel(shared_agent):
    status, _ = call(
        shared_agent, "POST", "/api/jobs", {"prompt": "long", "id": "web-long", "steps": 50}
    )
    assert status == 202
    status, _ = call(shared_agent, "POST", "/api/jobs/web-long/cancel")
    assert status == 202
    reply = wait_done(shared_agent, "web-long")["reply"]
    assert reply["error"]["code"] == "cancelled"


def test_token_guards_writes_and_private_reads(broker, make_agent):
    agent = make_agent(broker, EDGEAI_API_TOKEN="s3cret", EDGEAI_HTTP_AUTH="true")
    assert call(agent, "POST", "/api/jobs", {"prompt": "x"})[0] == 401
    assert call(agent, "POST", "/api/jobs", {"prompt": "x"}, token="wrong")[0] == 401
    status, _body = call(
        agent, "POST", "/api/jobs", {"prompt": "x", "id": "guarded"}, token="s3cret"
    )
    assert status == 202
    reply = wait_done(agent, "guarded", token="s3cret")["reply"]
    signed = reply["image"]["url"].removeprefix(agent.url)
    path, _, signature = signed.partition("?sig=")
    assert signature  # the URL the agent hands out opens this one image ...
    assert agent.http_get(signed)[0] == 200
    assert agent.http_get(path)[0] == 401  # ... the bare name does not
    assert agent.http_get(f"{path}?sig={'0' * len(signature)}")[0] == 401
    assert agent.http_get("/api/images")[0] == 401
    # A token in a URL opens nothing: URLs are copied, logged and shared.
    assert agent.http_get(path + "?token=s3cret")[0] == 401
    assert agent.http_get("/api/images?token=s3cret")[0] == 401
    # A job's status and events (its prompt, seed and image URL) need the token too.
    assert call(agent, "GET", "/api/jobs/guarded")[0] == 401
    assert call(agent, "GET", "/api/jobs/guarded/events")[0] == 401
    assert call(agent, "GET", "/api/jobs/guarded", token="s3cret")[0] == 200
    assert agent.http_get("/healthz")[0] == 200  # health and metrics stay open
    assert agent.http_get("/")[0] == 200  # so does the page, which then asks for the token


def chromium_driver(download_dir: Path):
    for command in ("chromium", "chromedriver"):
        if shutil.which(command) is None:
            pytest.fail(f"{command} is not installed; scripts/test installs it")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1100,1400",
    ):
        options.add_argument(argument)
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(download_dir), "download.prompt_for_download": False},
    )
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    return webdriver.Chrome(options=options, service=service)


PAGE_TOKEN = "page-test-token"


def loaded_size(driver, wait, image) -> list[int]:
    """Wait until a picture on the page has loaded; return its [width, height]."""
    wait.until(
        lambda d: d.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", image
        )
    )
    return driver.execute_script(
        "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image
    )


def test_the_page_generates_shows_and_downloads_an_image(module_broker, make_agent, tmp_path):
    # As installed: the token on, the page opened at the address scripts/run prints.
    shared_agent = make_agent(module_broker, EDGEAI_API_TOKEN=PAGE_TOKEN, EDGEAI_HTTP_AUTH="true")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = chromium_driver(downloads)
    try:
        driver.get(shared_agent.url + f"/?token={PAGE_TOKEN}")
        assert driver.current_url == shared_agent.url + "/"  # taken off the address bar
        prompt = driver.find_element(By.ID, "prompt")
        assert "dog" in prompt.get_attribute("value")  # prefilled example
        prompt.clear()
        prompt.send_keys("a lighthouse at dusk")
        driver.find_element(By.ID, "generate").click()
        wait = WebDriverWait(driver, 90)
        try:
            wait.until(expected_conditions.visibility_of_element_located((By.ID, "result")))
        except TimeoutException:
            # What the page showed instead, and what the agent knew of its jobs.
            shown = {
                name: driver.find_element(By.ID, name).text
                for name in ("error", "progress-text", "gallery")
            }
            jobs = call(shared_agent, "GET", "/api/images", token=PAGE_TOKEN)
            health = shared_agent.http_get("/healthz")[2]
            pytest.fail(
                f"no result shown in 90 s: page {shown}, agent's images {jobs}, health {health!r}"
                f"\nagent's log:\n{shared_agent.log()[-6000:]}"
            )
        image = driver.find_element(By.ID, "result-image")
        size = loaded_size(driver, wait, image)
        assert size == [512, 512]
        assert "seed" in driver.find_element(By.ID, "result-info").text
        wait.until(lambda d: "a lighthouse at dusk" in d.find_element(By.ID, "gallery").text)
        ARTIFACTS.mkdir(exist_ok=True)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1100, height + 40)
        driver.save_screenshot(str(ARTIFACTS / "web-page.png"))
        driver.find_element(By.ID, "download").click()
        deadline = time.monotonic() + 30
        while not [p for p in downloads.iterdir() if p.suffix == ".png"]:
            assert time.monotonic() < deadline, "nothing was downloaded"
            time.sleep(0.2)
        downloaded = next(p for p in downloads.iterdir() if p.suffix == ".png")
        url_path = (
            driver.find_element(By.ID, "download")
            .get_attribute("href")
            .removeprefix(shared_agent.url)
        )
        assert downloaded.read_bytes() == shared_agent.http_get(url_path)[2]
        assert driver.find_element(By.ID, "error").is_displayed() is False
        # Every link and picture on the page opens by its signature; none carries the token.
        links = [driver.find_element(By.ID, "download").get_attribute("href")] + [
            picture.get_attribute("src")
            for picture in driver.find_elements(By.CSS_SELECTOR, "#result-image, #gallery img")
        ]
        assert len(links) >= 3
        for link in links:
            assert "?sig=" in link, link
            assert PAGE_TOKEN not in link, link
    finally:
        driver.quit()


EVIL_PAGE = """<!doctype html><html><body>
<form id="f" method="post" enctype="text/plain" action="{agent}/api/jobs">
<input name='{{"prompt": "from another site", "id": "evil-form", "x": "' value='"}}'>
</form>
<script>
fetch("{agent}/api/jobs", {{method: "POST", mode: "no-cors",
  headers: {{"Content-Type": "text/plain"}},
  body: JSON.stringify({{prompt: "from another site", id: "evil-fetch"}})}})
  .finally(() => document.getElementById("f").submit());
</script></body></html>"""


def test_another_sites_page_cannot_create_jobs_in_a_real_browser(shared_agent, tmp_path):
    """Authentication off: a page on another origin posts a form and a fetch to the agent."""
    (tmp_path / "evil.html").write_text(EVIL_PAGE.format(agent=shared_agent.url))
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0),
        functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path)),
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    accepted = shared_agent.metric("edgeai_requests_total", outcome="accepted", mode="txt2img")
    driver = chromium_driver(tmp_path)
    try:
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/evil.html")
        # The form's submission lands on the agent's answer: a refusal.
        WebDriverWait(driver, 30).until(lambda d: "cross_site" in d.page_source)
    finally:
        driver.quit()
        server.shutdown()
    for job_id in ("evil-form", "evil-fetch"):
        assert call(shared_agent, "GET", f"/api/jobs/{job_id}")[0] == 404
    after = shared_agent.metric("edgeai_requests_total", outcome="accepted", mode="txt2img")
    assert after == accepted
    assert shared_agent.metric("edgeai_http_refusals_total", reason="cross_site") >= 2


class IngressProxy:
    """What Home Assistant's ingress does in front of an app, small enough for a test.

    ``/api/hassio_ingress/<session>/<path>`` is forwarded to the agent's ``/<path>`` with the
    prefix in ``X-Ingress-Path`` and the browser's host in ``X-Forwarded-Host``; answers are
    streamed back (the page's event streams go through it too). Its connections to the agent
    come from 127.0.0.1, the address the agent is told to trust.
    """

    def __init__(self, agent_url: str) -> None:
        self.agent_url = agent_url
        app = web.Application()
        app.router.add_route("*", "/api/hassio_ingress/{session}/{path:.*}", self._forward)
        self._server = ThreadedServer(app)
        self.port = self._server.port

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        prefix = f"/api/hassio_ingress/{request.match_info['session']}"
        headers = {
            name: value
            for name, value in request.headers.items()
            if name.lower() not in ("host", "content-length", "transfer-encoding")
        }
        headers.update({"X-Ingress-Path": prefix, "X-Forwarded-Host": request.host})
        target = f"{self.agent_url}/{request.match_info['path']}"
        if request.query_string:
            target += "?" + request.query_string
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                request.method, target, headers=headers, data=await request.read()
            ) as answer,
        ):
            response = web.StreamResponse(status=answer.status)
            response.content_type = answer.content_type
            for name in ("Content-Security-Policy", "Cache-Control"):
                if name in answer.headers:
                    response.headers[name] = answer.headers[name]
            await response.prepare(request)
            async for chunk in answer.content.iter_any():
                await response.write(chunk)
            return response

    def stop(self) -> None:
        self._server.stop()


def direct_get(agent, path: str, headers: dict[str, str] | None = None) -> int:
    """A request from another address than the ingress gateway's (127.0.0.2)."""
    connection = http.client.HTTPConnection(
        "127.0.0.1", agent.http_port, timeout=10, source_address=("127.0.0.2", 0)
    )
    try:
        connection.request("GET", path, headers=headers or {})
        return connection.getresponse().status
    finally:
        connection.close()


def test_the_page_works_through_home_assistant_ingress_with_no_token(module_broker, make_agent):
    agent = make_agent(
        module_broker,
        EDGEAI_API_TOKEN=PAGE_TOKEN,
        EDGEAI_HTTP_AUTH="true",
        EDGEAI_INGRESS_PEER="127.0.0.1",
    )
    # Straight to the agent, from anywhere but the gateway, the token is still needed.
    assert direct_get(agent, "/api/images") == 401
    assert direct_get(agent, "/healthz") == 200
    # Headers that say "ingress" prove nothing: only the connection's address counts.
    spoofed = {"X-Ingress-Path": "/api/hassio_ingress/x", "X-Forwarded-For": "127.0.0.1"}
    assert direct_get(agent, "/api/images", spoofed) == 401
    proxy = IngressProxy(agent.url)
    driver = chromium_driver(Path(tempfile.mkdtemp()))
    try:
        driver.get(f"http://127.0.0.1:{proxy.port}/api/hassio_ingress/s3ssion/")
        driver.find_element(By.ID, "prompt").clear()
        driver.find_element(By.ID, "prompt").send_keys("through ingress")
        driver.find_element(By.ID, "generate").click()
        wait = WebDriverWait(driver, 90)
        wait.until(expected_conditions.visibility_of_element_located((By.ID, "result")))
        image = driver.find_element(By.ID, "result-image")
        wait.until(
            lambda d: d.execute_script(
                "return arguments[0].complete && arguments[0].naturalWidth", image
            )
        )
        assert "/api/hassio_ingress/s3ssion/images/" in image.get_attribute("src")
        wait.until(lambda d: "through ingress" in d.find_element(By.ID, "gallery").text)
        assert driver.find_element(By.ID, "error").is_displayed() is False
    finally:
        driver.quit()
        proxy.stop()


def test_the_page_restyles_a_chosen_picture_and_the_gallery_shows_its_source(
    module_broker, make_agent, tmp_path
):
    agent = make_agent(module_broker, EDGEAI_API_TOKEN=PAGE_TOKEN, EDGEAI_HTTP_AUTH="true")
    photo = tmp_path / "doorbell.jpg"
    photo.write_bytes(pictures.picture(640, 360, seed=3, fmt="JPEG"))
    driver = chromium_driver(tmp_path)
    try:
        driver.get(agent.url + f"/?token={PAGE_TOKEN}")
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("a watercolour doorbell")
        strength = driver.find_element(By.ID, "strength")
        assert not strength.is_enabled()  # no picture yet: text-to-image
        driver.find_element(By.ID, "init_image").send_keys(str(photo))
        wait = WebDriverWait(driver, 90)
        wait.until(lambda d: d.find_element(By.ID, "picture").is_displayed())
        assert strength.is_enabled()
        # The slider, moved as a user moves it: 0.5 -> 0.7.
        for _ in range(4):
            strength.send_keys(Keys.ARROW_RIGHT)
        assert driver.find_element(By.ID, "strength-value").text == "0.7"
        driver.find_element(By.ID, "generate").click()
        wait.until(expected_conditions.visibility_of_element_located((By.ID, "result")))
        image = driver.find_element(By.ID, "result-image")
        size = loaded_size(driver, wait, image)
        assert size == [640, 360]  # the picture's own size
        assert "from a picture at strength 0.7" in driver.find_element(By.ID, "result-info").text
        source = wait.until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery img.source") or False
        )[0]
        assert max(loaded_size(driver, wait, source)) == 256  # the source's thumbnail
        assert "?sig=" in source.get_attribute("src")
        assert "strength 0.7" in driver.find_element(By.ID, "gallery").text
        ARTIFACTS.mkdir(exist_ok=True)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1100, height + 40)
        driver.save_screenshot(str(ARTIFACTS / "web-page-restyle.png"))
        # Removing the picture goes back to text-to-image at the chosen size.
        driver.find_element(By.ID, "picture-remove").click()
        assert not strength.is_enabled()
        assert driver.find_element(By.ID, "width").get_attribute("value") == "512"
    finally:
        driver.quit()
