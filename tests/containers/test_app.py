"""The Home Assistant app as the Supervisor runs it, with stand-ins for the Supervisor's parts.

The image is built from the repository's root Dockerfile with BUILD_FROM set (a local Debian
base stands in for Home Assistant's); /data holds the options.json the Supervisor writes; a small
HTTP server answers the Supervisor's services API at http://supervisor/services/mqtt in the
documented shape; the page is loaded in Chromium through an ingress-style proxy.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest
from aiohttp import web
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import ROOT, Node, free_port, generate
from tests.containers.conftest import RUN_ON_HOST, container_log, podman, wait_healthy
from tests.test_web import IngressProxy, chromium_driver
from tests.threaded_server import ThreadedServer

APP_IMAGE = "localhost/edgeai-agent-app:test"
SUPERVISOR_TOKEN = "supervisor-test-token"


class SupervisorStandIn:
    """``GET /services/mqtt`` as the Supervisor answers it, on 127.0.0.1:80 (``supervisor``)."""

    def __init__(self, broker: dict) -> None:
        self.broker = broker
        self.asked: list[str] = []
        app = web.Application()
        app.router.add_get("/services/mqtt", self._mqtt)
        self._server = ThreadedServer(app, port=80)

    async def _mqtt(self, request: web.Request) -> web.Response:
        self.asked.append(request.headers.get("Authorization", ""))
        if request.headers.get("Authorization") != f"Bearer {SUPERVISOR_TOKEN}":
            return web.json_response({"result": "error", "message": "unauthorized"}, status=401)
        return web.json_response({"result": "ok", "data": self.broker})

    def stop(self) -> None:
        self._server.stop()


@pytest.fixture(scope="session")
def app_image():
    build = ["build", "--pull=never", "--format", "docker", "-t", APP_IMAGE]
    build += ["--build-arg", "BUILD_FROM=debian:bookworm-slim"]
    wheels = Path(os.environ.get("PIP_FIND_LINKS") or "/nonexistent")
    if wheels.is_dir():
        build += ["-v", f"{wheels}:{wheels}:ro", "--build-arg", f"PIP_FIND_LINKS={wheels}"]
    started = time.monotonic()
    podman(*build, str(ROOT))
    size = int(podman("image", "inspect", "--format", "{{.Size}}", APP_IMAGE))
    print(f"built {APP_IMAGE} in {time.monotonic() - started:.0f} s: {size / 1e9:.2f} GB")
    return APP_IMAGE


def test_the_app_takes_its_options_and_the_supervisors_broker_and_serves_ingress(
    app_image, broker, model_for_containers, tmp_path
):
    node = f"app-{uuid.uuid4().hex[:6]}"
    broker.add_node(node)
    supervisor = SupervisorStandIn(
        {
            "host": "127.0.0.1",
            "port": broker.port,
            "ssl": False,
            "protocol": "3.1.1",
            "username": node,
            "password": broker.password(node),
            "addon": "core_mosquitto",
        }
    )
    data = tmp_path / "data"
    data.mkdir()
    options = {
        "model": "/model",
        "tiny_vae": "/model/taesd",
        "default_width": 512,
        "default_height": 512,
        "default_steps": 1,
        "node_id": node,
    }
    (data / "options.json").write_text(json.dumps(options))
    http_port, name = free_port(), f"edgeai-app-{node}"
    client = broker.client()
    client.subscribe(f"homeassistant/+/{node}/+/config")
    proxy = None
    try:
        podman(
            *RUN_ON_HOST,
            *("--name", name, "--add-host", "supervisor:127.0.0.1"),
            *("-e", f"SUPERVISOR_TOKEN={SUPERVISOR_TOKEN}"),
            # The ingress gateway is 172.30.32.2 in Home Assistant; here the proxy is local.
            *("-e", "EDGEAI_INGRESS_PEER=127.0.0.1", "-e", f"EDGEAI_HTTP_PORT={http_port}"),
            *("-e", "EDGEAI_TORCH_THREADS=1"),
            *("-v", f"{data}:/data", "-v", f"{model_for_containers}:/model:ro"),
            app_image,
        )
        url = f"http://127.0.0.1:{http_port}"
        wait_healthy(url, name)
        log = container_log(name)
        assert "running as a Home Assistant app; the MQTT broker from the Supervisor" in log
        assert supervisor.asked == [f"Bearer {SUPERVISOR_TOKEN}"]
        # The broker the Supervisor handed out works; discovery goes on as before.
        client.wait_for(f"homeassistant/image/{node}/image/config")

        agent = Node(f"edgeai/{node}")
        assert generate(client, agent, id="app-1")["status"] == "ok"
        # All state is the app's, under /data.
        assert (data / "journal.sqlite3").exists()
        assert (data / "api-token").exists()
        # Through ingress, the page needs no token.
        proxy = IngressProxy(url)
        driver = chromium_driver(tmp_path / "downloads")
        try:
            driver.get(f"http://127.0.0.1:{proxy.port}/api/hassio_ingress/app-session/")
            driver.find_element(By.ID, "generate").click()
            wait = WebDriverWait(driver, 90)
            wait.until(expected_conditions.visibility_of_element_located((By.ID, "result")))
            assert driver.find_element(By.ID, "error").is_displayed() is False
        finally:
            driver.quit()
        podman("kill", "--signal", "TERM", name)
        assert podman("wait", name, timeout=120) == "0"
        assert "Traceback" not in container_log(name)
    finally:
        client.close()
        supervisor.stop()
        if proxy is not None:
            proxy.stop()
        podman("rm", "-f", name, check=False)
