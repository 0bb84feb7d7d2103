"""The Home Assistant app as the Supervisor runs it, with stand-ins for the Supervisor's parts.

The image is built from the repository's root Dockerfile as the Supervisor builds it (no
build.yaml: the Dockerfile's BUILD_FROM default, BUILD_ARCH and BUILD_VERSION passed); /data
holds the options.json the Supervisor writes; /share is mapped read-only as config.yaml's ``map``
asks; the container's host name is the app's (``local-edgeai-agent``); a small HTTP server
answers the Supervisor's services and discovery APIs at http://supervisor in their documented
shape (tests/supervisor.py); the page is loaded in Chromium through an ingress-style proxy. A
stop is ``podman stop -t <config.yaml's timeout>``, as the Supervisor's ``docker stop``; a backup
is config.yaml's ``backup_pre`` run with ``podman exec`` and the Supervisor's tar walk over /data.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import ROOT, Node, free_port, generate
from tests.containers.conftest import RUN_ON_HOST, container_log, podman, wait_healthy
from tests.supervisor import SUPERVISOR_TOKEN, SupervisorStandIn
from tests.test_app_backups import EXCLUDES, hub_cache, members, restore, supervisor_backup
from tests.test_web import IngressProxy, chromium_driver

APP_IMAGE = "localhost/edgeai-agent-app:test"
CONFIG = yaml.safe_load((ROOT / "config.yaml").read_text())
APP_HOSTNAME = "local-edgeai-agent"
"""The Supervisor names an app's container after its slug (local_edgeai_agent, _ as -)."""
SHARED_MODEL = "/share/models/tiny-sdxl"


@pytest.fixture(scope="session")
def app_image():
    build = ["build", "--pull=never", "--format", "docker", "-t", APP_IMAGE]
    # What the Supervisor passes (apps/build.py); BUILD_FROM only with a build.yaml, gone.
    build += [
        "--build-arg",
        "BUILD_ARCH=amd64",
        "--build-arg",
        f"BUILD_VERSION={CONFIG['version']}",
    ]
    wheels = Path(os.environ.get("PIP_FIND_LINKS") or "/nonexistent")
    if wheels.is_dir():
        build += ["-v", f"{wheels}:{wheels}:ro", "--build-arg", f"PIP_FIND_LINKS={wheels}"]
    started = time.monotonic()
    podman(*build, str(ROOT))
    size = int(podman("image", "inspect", "--format", "{{.Size}}", APP_IMAGE))
    print(f"built {APP_IMAGE} in {time.monotonic() - started:.0f} s: {size / 1e9:.2f} GB")
    return APP_IMAGE


@pytest.fixture
def supervisor():
    stand_in = SupervisorStandIn(None, port=80)
    yield stand_in
    stand_in.stop()


class App:
    """One app container: its data folder, its node, its port."""

    def __init__(self, image: str, broker, supervisor, share: Path, data: Path) -> None:
        self.image, self.share, self.data = image, share, data
        self.node = f"app-{uuid.uuid4().hex[:6]}"
        self.name = f"edgeai-app-{self.node}"
        self.http_port = free_port()
        self.agent = Node(f"edgeai/{self.node}")
        broker.add_node(self.node)
        supervisor.broker = {
            "host": "127.0.0.1",
            "port": broker.port,
            "ssl": False,
            "protocol": "3.1.1",
            "username": self.node,
            "password": broker.password(self.node),
            "addon": "core_mosquitto",
        }
        data.mkdir(exist_ok=True)
        options = {
            **CONFIG["options"],
            "model": SHARED_MODEL,
            "tiny_vae": f"{SHARED_MODEL}/taesd",
            "node_id": self.node,
        }
        (data / "options.json").write_text(json.dumps(options))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def run(self, **env: str) -> None:
        extra = [item for key, value in env.items() for item in ("-e", f"{key}={value}")]
        podman(
            *RUN_ON_HOST,
            *("--name", self.name, "--hostname", APP_HOSTNAME),
            *("--add-host", "supervisor:127.0.0.1"),
            *("-e", f"SUPERVISOR_TOKEN={SUPERVISOR_TOKEN}"),
            # The ingress gateway is 172.30.32.2 in Home Assistant; here the proxy is local.
            *("-e", "EDGEAI_INGRESS_PEER=127.0.0.1", "-e", f"EDGEAI_HTTP_PORT={self.http_port}"),
            *("-e", "EDGEAI_TORCH_THREADS=1", *extra),
            *("-v", f"{self.data}:/data", "-v", f"{self.share}:/share:ro"),
            self.image,
        )
        wait_healthy(self.url, self.name)

    def stop(self) -> tuple[str, float]:
        """Stop as the Supervisor does; return the exit code and the seconds it took."""
        started = time.monotonic()
        podman("stop", "-t", str(CONFIG["timeout"]), self.name, timeout=CONFIG["timeout"] + 60)
        code = podman("inspect", "--format", "{{.State.ExitCode}}", self.name)
        return code, time.monotonic() - started

    def remove(self) -> None:
        podman("rm", "-f", self.name, check=False)


@pytest.fixture
def share(model_for_containers, tmp_path):
    """The /share folder with a model in it, as a user copies one there."""
    folder = tmp_path / "share"
    shutil.copytree(model_for_containers, folder / "models" / "tiny-sdxl")
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder


def test_the_app_takes_its_options_the_supervisors_broker_and_announces_itself(
    app_image, broker, supervisor, share, tmp_path
):
    app = App(app_image, broker, supervisor, share, tmp_path / "data")
    client = broker.client()
    client.subscribe(f"homeassistant/+/{app.node}/+/config")
    proxy = None
    try:
        app.run()
        log = container_log(app.name)
        assert "running as a Home Assistant app; the MQTT broker from the Supervisor" in log
        # The broker the Supervisor handed out works; MQTT discovery goes on as before.
        client.wait_for(f"homeassistant/image/{app.node}/image/config")
        assert generate(client, app.agent, id="app-1")["status"] == "ok"
        assert f"model ready: {SHARED_MODEL} on cpu" in container_log(app.name)  # from /share
        # Home Assistant is told the app's address and token (the integration's hassio step).
        token = (app.data / "api-token").read_text().strip()
        assert supervisor.announcement() == {
            "service": "edgeai",
            "config": {
                "host": APP_HOSTNAME,
                "port": app.http_port,
                "token": token,
                "node_id": app.node,
            },
        }
        assert (app.data / "journal.sqlite3").exists()
        # Through ingress, the page needs no token.
        proxy = IngressProxy(app.url)
        driver = chromium_driver(tmp_path / "downloads")
        try:
            driver.get(f"http://127.0.0.1:{proxy.port}/api/hassio_ingress/app-session/")
            driver.find_element(By.ID, "generate").click()
            wait = WebDriverWait(driver, 90)
            wait.until(expected_conditions.visibility_of_element_located((By.ID, "result")))
            assert driver.find_element(By.ID, "error").is_displayed() is False
        finally:
            driver.quit()
        code, _ = app.stop()
        assert code == "0"
        assert "Traceback" not in container_log(app.name)
    finally:
        client.close()
        if proxy is not None:
            proxy.stop()
        app.remove()


def test_a_stop_finishes_the_picture_and_a_backup_restores_the_queue(
    app_image, broker, supervisor, share, tmp_path
):
    """A picture longer than Docker's default 10 s stop is running, another queued: the stop
    with config.yaml's timeout lets it finish (exit 0); the stopped app's backup leaves out the
    model it downloaded and, restored into a fresh /data, answers the queued job. A hot backup
    of the running app opens cleanly."""
    app = App(app_image, broker, supervisor, share, tmp_path / "data")
    # The model as the first start leaves it: downloaded into the app's own Hugging Face cache.
    tiny_model = share / "models" / "tiny-sdxl"
    hub_cache(app.data / "huggingface", "edgeai/tiny-sdxl", tiny_model, variant="fp16")
    hub_cache(app.data / "huggingface", "edgeai/tiny-taesd", tiny_model / "taesd")
    for path in [app.data, *app.data.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    options = json.loads((app.data / "options.json").read_text())
    options.update(model="edgeai/tiny-sdxl", tiny_vae="edgeai/tiny-taesd")
    (app.data / "options.json").write_text(json.dumps(options))
    client = broker.client()
    base = app.agent.base
    try:
        app.run(EDGEAI_MAX_STEPS="50", HF_HUB_OFFLINE="1")
        client.subscribe(f"{base}/result/+", f"{base}/jobs/+")
        long_job = {"prompt": "x", "id": "app-long", "steps": 50, "width": 1024, "height": 1024}
        client.publish(f"{base}/generate", json.dumps(long_job))
        client.publish(f"{base}/generate", json.dumps({"prompt": "x", "id": "app-queued"}))
        client.wait_for(f"{base}/jobs/app-long", lambda m: m.json().get("step") == 1)
        client.wait_for(f"{base}/jobs/app-queued", lambda m: m.json().get("event") == "queued")
        code, seconds = app.stop()
        answer = client.wait_for(f"{base}/result/app-long", timeout=10).json()
        print(
            f"stop with a {answer.get('latency_s')} s picture running: {seconds:.1f} s, exit {code}"
        )
        assert answer["status"] == "ok"
        assert code == "0"
        assert seconds > 10, "the picture must outlast Docker's default stop for this to prove it"
        logs = container_log(app.name)
        assert "waiting up to 280 s for the running job" in logs
        assert "Traceback" not in logs
        assert not client.messages(f"{base}/result/app-queued")

        # The stopped app's backup (no backup_pre runs for a stopped app), restored.
        archive, everything = tmp_path / "backup.tar.gz", tmp_path / "everything.tar.gz"
        supervisor_backup(app.data, archive, EXCLUDES)
        supervisor_backup(app.data, everything, [])
        print(
            f"backup of the stopped app: {archive.stat().st_size:,} bytes, "
            f"{everything.stat().st_size:,} without backup_exclude"
        )
        assert not [name for name in members(archive) if name.startswith("data/huggingface")]
        app.remove()
        restored = restore(archive, tmp_path / "restored")
        # The first start after a restore downloads the model again; here, the cache put back.
        hub_cache(restored / "huggingface", "edgeai/tiny-sdxl", tiny_model, variant="fp16")
        hub_cache(restored / "huggingface", "edgeai/tiny-taesd", tiny_model / "taesd")
        app.data = restored
        app.run(HF_HUB_OFFLINE="1")
        queued = client.wait_for(f"{base}/result/app-queued", timeout=300).json()
        assert queued["status"] == "ok"
        assert "journal: started from the backup's copy" in container_log(app.name)

        # A hot backup: backup_pre inside the running app, as the Supervisor's docker exec.
        said = podman("exec", app.name, *CONFIG["backup_pre"].split())
        assert "journal copied to /data/journal-backup.sqlite3" in said
        supervisor_backup(app.data, tmp_path / "hot.tar.gz", EXCLUDES)
        hot = restore(tmp_path / "hot.tar.gz", tmp_path / "hot")
        with sqlite3.connect(hot / "journal-backup.sqlite3") as copy:
            assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            ids = {row[0] for row in copy.execute("SELECT id FROM jobs")}
        assert {"app-long", "app-queued"} <= ids
    finally:
        client.close()
        app.remove()


def test_the_supervisors_own_validator_accepts_the_repository():
    """scripts/check-app with the Supervisor's source (EDGEAI_SUPERVISOR_SOURCE: a checkout of
    github.com/home-assistant/supervisor; none can be fetched from here by the suite itself)."""
    source = os.environ.get("EDGEAI_SUPERVISOR_SOURCE")
    if not source:
        pytest.skip("EDGEAI_SUPERVISOR_SOURCE names no checkout of the Supervisor")
    completed = subprocess.run(
        [str(ROOT / "scripts" / "check-app"), source],
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    print(completed.stdout[-3000:], completed.stderr[-3000:])
    assert completed.returncode == 0
    assert "0 warnings or errors" in completed.stdout


def test_without_a_broker_the_app_runs_and_the_watchdog_leaves_it_alone(
    app_image, broker, supervisor, share, tmp_path
):
    """``mqtt:want`` with no Mosquitto app: the Supervisor hands out no broker. The app serves
    its page and APIs, says once that it has no broker, and its port answers the TCP watchdog
    (config.yaml's ``tcp://[HOST]:[PORT:8080]``) although /healthz says 503."""
    app = App(app_image, broker, supervisor, share, tmp_path / "data")
    supervisor.broker = None
    try:
        podman(
            *RUN_ON_HOST,
            *("--name", app.name, "--hostname", APP_HOSTNAME),
            *("--add-host", "supervisor:127.0.0.1"),
            *("-e", f"SUPERVISOR_TOKEN={SUPERVISOR_TOKEN}"),
            *("-e", f"EDGEAI_HTTP_PORT={app.http_port}", "-e", "EDGEAI_TORCH_THREADS=1"),
            *("-e", "EDGEAI_HEALTH_BROKER_GRACE_S=1"),
            *("-v", f"{app.data}:/data", "-v", f"{app.share}:/share:ro"),
            app.image,
        )
        deadline = time.monotonic() + 120
        while "model ready:" not in container_log(app.name):
            assert time.monotonic() < deadline, container_log(app.name)
            time.sleep(0.5)
        time.sleep(2)
        watchdog = CONFIG["watchdog"].replace("[PORT:8080]", str(app.http_port))
        assert watchdog.startswith("tcp://[HOST]:")
        with socket.create_connection(("127.0.0.1", app.http_port), timeout=5):
            pass  # what the Supervisor's TCP watchdog checks
        try:
            urllib.request.urlopen(app.url + "/healthz", timeout=5)
            health = 200
        except urllib.error.HTTPError as exc:
            health = exc.code
        assert health == 503
        log = container_log(app.name)
        assert "the MQTT broker from nowhere: install the Mosquitto app or set mqtt_host" in log
        assert log.count("cannot reach the broker") == 1
        assert "announced to Home Assistant" in log  # the AI Task integration still works
        code, _ = app.stop()
        assert code == "0"
    finally:
        app.remove()
