"""The web page's JSON API over real HTTP, and the page itself in headless Chromium."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import ARTIFACTS


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


def wait_done(agent, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, body = call(agent, "GET", f"/api/jobs/{job_id}")
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
    assert 'edgeai_requests_total{outcome="bad_size"}' in shared_agent.metrics()


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
    reply = wait_done(agent, "guarded")["reply"]
    signed = reply["image"]["url"].removeprefix(agent.url)
    path, _, signature = signed.partition("?sig=")
    assert signature  # the URL the agent hands out opens this one image ...
    assert agent.http_get(signed)[0] == 200
    assert agent.http_get(path)[0] == 401  # ... the bare name does not
    assert agent.http_get(f"{path}?sig={'0' * len(signature)}")[0] == 401
    assert agent.http_get("/api/images")[0] == 401
    assert agent.http_get(path + "?token=s3cret")[0] == 200
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


def test_the_page_generates_shows_and_downloads_an_image(shared_agent, tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = chromium_driver(downloads)
    try:
        driver.get(shared_agent.url + "/")
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
            jobs = call(shared_agent, "GET", "/api/images")
            health = shared_agent.http_get("/healthz")[2]
            pytest.fail(
                f"no result shown in 90 s: page {shown}, agent's images {jobs}, health {health!r}"
                f"\nagent's log:\n{shared_agent.log()[-6000:]}"
            )
        image = driver.find_element(By.ID, "result-image")
        wait.until(
            lambda d: d.execute_script(
                "return arguments[0].complete && arguments[0].naturalWidth", image
            )
        )
        size = driver.execute_script(
            "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image
        )
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
    finally:
        driver.quit()
