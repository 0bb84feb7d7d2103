"""What an operator sees: the log of a real run, a quiet start, a clean Ctrl-C, health."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from tests import mqtt_client
from tests.conftest import ARTIFACTS, ROOT, Node, free_port, generate, wait_for_port

TIMESTAMPED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


def wait_for_text(path: Path, text: str, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        output = path.read_text(errors="replace") if path.exists() else ""
        if text in output:
            return output
        assert time.monotonic() < deadline, f"{text!r} never appeared:\n{output[-4000:]}"
        time.sleep(0.2)


def http_json(url: str, body: dict | None, token: str) -> tuple[int, dict]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_scripts_run_tells_the_story_and_stops_cleanly_on_ctrl_c(tiny_model, tmp_path):
    """As a newcomer runs it: scripts/run in a terminal, three jobs, a broker restart, Ctrl-C."""
    state, output = tmp_path / "state", tmp_path / "terminal.log"
    mqtt_port, http_port, node = free_port(), free_port(), "story"
    env = {key: value for key, value in os.environ.items() if not key.startswith("EDGEAI_")}
    env.update(
        EDGEAI_STATE_DIR=str(state),
        EDGEAI_MQTT_PORT=str(mqtt_port),
        EDGEAI_HTTP_HOST="127.0.0.1",
        EDGEAI_HTTP_PORT=str(http_port),
        EDGEAI_PUBLIC_URL=f"http://127.0.0.1:{http_port}",
        EDGEAI_NODE_ID=node,
        EDGEAI_MODEL=str(tiny_model),
        EDGEAI_TINY_VAE=str(tiny_model / "taesd"),
        EDGEAI_TORCH_THREADS="1",
        EDGEAI_THERMAL_GLOB=str(tmp_path / "no-thermal-zone"),
        EDGEAI_VCGENCMD="edgeai-no-vcgencmd",
    )
    with output.open("wb") as terminal:
        # Its own process group, as a terminal's foreground job: Ctrl-C signals all of it.
        run = subprocess.Popen(
            [str(ROOT / "scripts" / "run")],
            cwd=ROOT,
            env=env,
            stdout=terminal,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    restarted: subprocess.Popen[bytes] | None = None
    try:
        wait_for_text(output, "model ready:", timeout=300)
        token = (state / "api-token").read_text().strip()
        password = (state / "credentials" / "edgeai-client.password").read_text().strip()
        client = mqtt_client.TestClient(mqtt_port, "edgeai-client", password)
        url = f"http://127.0.0.1:{http_port}"

        agent = Node(f"edgeai/{node}")
        assert generate(client, agent, id="story-mqtt")["status"] == "ok"
        status, created = http_json(url + "/api/jobs", {"prompt": "x", "id": "story-page"}, token)
        assert status == 202, created
        status, answer = http_json(url + "/v1/images/generations", {"prompt": "x"}, token)
        assert status == 200, answer
        wait_for_text(output, "job story-page done")
        # The broker goes away and comes back; /healthz does not flip over the blip.
        config = state / "mosquitto" / "mosquitto.conf"
        subprocess.run(["pkill", "-f", f"mosquitto -c {config}"], check=True)
        wait_for_text(output, "disconnected from the broker")
        assert urllib.request.urlopen(url + "/healthz", timeout=10).status == 200
        restarted = subprocess.Popen(["mosquitto", "-c", str(config)])
        wait_for_port(mqtt_port)
        wait_for_text(output, "reconnected to the broker", timeout=60)
        assert generate(client, agent, id="story-after")["status"] == "ok"
        client.close()
        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C
        assert run.wait(90) == 0
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        if restarted is not None:
            restarted.terminate()
            restarted.wait(10)
    log = output.read_text(errors="replace")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "scripts-run.log").write_text(log)
    print(log)
    assert "Traceback" not in log
    assert "KeyboardInterrupt" not in log
    lines = log.splitlines()
    agent_lines = [line for line in lines if TIMESTAMPED.match(line)]
    assert f"connected to the broker at 127.0.0.1:{mqtt_port} as {node} (MQTT 5)" in log
    assert re.search(r"model ready: \S+ on cpu in \w+ \(.*\), loaded in [\d.]+ s", log)
    assert "worker memory " in log
    for job_id, source in (("story-mqtt", "mqtt"), ("story-page", "web"), ("story-after", "mqtt")):
        [line] = [line for line in agent_lines if job_id in line]  # one line, nothing per step
        assert f"job {job_id} done: from {source}, 512x512, 1 step, " in line
    assert re.search(r"job \w+ done: from openai, 512x512, 1 step, ", log)
    assert re.search(r"reconnected to the broker at 127.0.0.1:\d+ as story after [\d.]+ s", log)
    assert sum("INFO agent.app: stopping" in line for line in lines) == 1
    warnings = [line for line in agent_lines if " WARNING " in line]
    assert len(warnings) == 1, warnings  # the broker going away, and nothing else
    assert "disconnected from the broker" in warnings[0]


def test_a_healthy_start_and_stop_log_no_warning(broker, make_agent):
    env = {"EDGEAI_HTTP_AUTH": "true"}
    agent = make_agent(broker, **env)
    client = broker.client()
    assert generate(client, agent)["status"] == "ok"
    client.close()
    assert agent.stop() == 0
    log = agent.log()
    print(log)
    assert "model ready:" in log
    strays = [line for line in log.splitlines() if not TIMESTAMPED.match(line)]
    assert strays == [], "lines outside the log's format"
    assert [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line] == []
    assert "Traceback" not in log


def test_a_broker_blip_keeps_health_but_an_outage_does_not(broker, make_agent):
    agent = make_agent(broker, EDGEAI_HEALTH_BROKER_GRACE_S="3")
    assert agent.http_get("/healthz")[0] == 200
    broker.kill()
    started = time.monotonic()
    while time.monotonic() - started < 1.5:
        assert agent.http_get("/healthz")[0] == 200  # a blip: supervisors leave it alone
        time.sleep(0.1)
    time.sleep(3.0)
    status, _, body = agent.http_get("/healthz")
    assert status == 503
    assert json.loads(body)["mqtt_connected"] is False
    broker.start()
    deadline = time.monotonic() + 60
    while agent.http_get("/healthz")[0] != 200:
        assert time.monotonic() < deadline, "healthy again once the broker is back"
        time.sleep(0.2)


def test_a_broker_that_is_not_there_is_said_once_and_the_agent_waits_for_it(broker, make_agent):
    """An app started without the Mosquitto app (``mqtt:want``), or a broker down at boot: one
    line says where the agent is trying, not one per retry; the HTTP side serves meanwhile."""
    broker.kill()
    agent = make_agent(broker, start=False)
    agent.start(wait=False)
    deadline = time.monotonic() + 60
    while "model ready:" not in agent.log():
        assert time.monotonic() < deadline, agent.log()
        time.sleep(0.2)
    time.sleep(3)  # paho retries every second or two meanwhile
    assert agent.http_get("/api/images")[0] == 200
    said = [line for line in agent.log().splitlines() if "cannot reach the broker" in line]
    assert len(said) == 1, agent.log()
    assert f"at 127.0.0.1:{broker.port}; trying again until it answers" in said[0]
    broker.start()
    deadline = time.monotonic() + 60  # paho's retry interval has grown meanwhile
    while "connected to the broker" not in agent.log():
        assert time.monotonic() < deadline, agent.log()
        time.sleep(0.2)
    client = broker.client()
    try:
        assert generate(client, agent)["status"] == "ok"
    finally:
        client.close()
    assert len([line for line in agent.log().splitlines() if "cannot reach" in line]) == 1
