"""deploy/compose.yaml as a compose user runs it: the broker and the agent, a picture over MQTT."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests import mqtt_client
from tests.conftest import ROOT, Node, free_port, generate
from tests.containers.conftest import podman, wait_healthy

DEPLOY = ROOT / "deploy"


def compose(project: str, *args: str, files: list[Path], check: bool = True) -> None:
    command = shutil.which("podman-compose")  # resolved: compose runs in deploy/
    if command is None:
        pytest.fail("podman-compose is not installed; scripts/test-containers installs it")
    chosen = [argument for path in files for argument in ("-f", str(path))]
    executable = str(Path(command).resolve())
    subprocess.run(
        [executable, "-p", project, *chosen, *args], check=True, cwd=DEPLOY, timeout=1800
    )


def test_compose_brings_up_the_broker_and_the_agent(image, model_for_containers, tmp_path):
    env_file = DEPLOY / ".env"
    if env_file.exists():
        pytest.fail(f"{env_file} exists (a user's settings): not overwriting it")
    project, node = f"edgeai-{uuid.uuid4().hex[:6]}", "composed"
    mqtt_port, http_port = free_port(), free_port()
    env_file.write_text(
        f"EDGEAI_NODE_ID={node}\nEDGEAI_MQTT_PORT={mqtt_port}\nEDGEAI_HTTP_PORT={http_port}\n"
        "EDGEAI_TORCH_THREADS=1\nEDGEAI_MODEL=/model\nEDGEAI_TINY_VAE=/model/taesd\n"
    )
    # The test's model, mounted as a user mounts a model folder.
    override = tmp_path / "compose.model.yaml"
    override.write_text(
        f"services:\n  agent:\n    volumes:\n      - {model_for_containers}:/model:ro\n"
    )
    # The broker's image, built as compose would (the agent's is the one the image fixture made).
    podman(
        "build",
        "--pull=never",
        "-f",
        "deploy/container/broker.Dockerfile",
        "-t",
        "localhost/edgeai-broker",
        str(ROOT),
    )
    podman("tag", image, "localhost/edgeai-agent")
    files = [DEPLOY / "compose.yaml", override]
    try:
        compose(project, "up", "-d", files=files)
        wait_healthy(f"http://127.0.0.1:{http_port}", f"{project}_agent_1", f"{project}_broker_1")
        volume = podman("volume", "inspect", "--format", "{{.Mountpoint}}", f"{project}_broker")
        password = (Path(volume) / "credentials" / "edgeai-client.password").read_text().strip()
        client = mqtt_client.TestClient(mqtt_port, "edgeai-client", password)

        agent = Node(f"edgeai/{node}")
        assert generate(client, agent, id="composed-1")["status"] == "ok"
        client.close()
    finally:
        env_file.unlink(missing_ok=True)
        compose(project, "down", "-v", files=files, check=False)
