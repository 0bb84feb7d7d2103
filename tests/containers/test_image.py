"""The container image as its users run it: the Dockerfile's stage container, unchanged,
started with a state volume and a model folder, asked for a picture over MQTT, stopped with
SIGTERM and started again. Slow (a build takes minutes): run by scripts/test-containers."""

from __future__ import annotations

import json
import uuid

from tests.conftest import Node, free_port, generate
from tests.containers.conftest import RUN_ON_HOST, container_log, podman, wait_healthy


def test_the_image_answers_over_mqtt_and_stops_cleanly_with_sigterm(
    image, broker, model_for_containers
):
    node, http_port = f"box-{uuid.uuid4().hex[:6]}", free_port()
    broker.add_node(node)
    volume = f"edgeai-test-{node}"
    podman("volume", "create", volume)
    name = f"edgeai-test-{node}"
    run = [
        *RUN_ON_HOST,
        *("--name", name, "-v", f"{volume}:/data", "-v", f"{model_for_containers}:/model:ro"),
        *("-e", "EDGEAI_MODEL=/model", "-e", "EDGEAI_TINY_VAE=/model/taesd"),
        *("-e", f"EDGEAI_NODE_ID={node}", "-e", "EDGEAI_MQTT_HOST=127.0.0.1"),
        *("-e", f"EDGEAI_MQTT_PORT={broker.port}", "-e", f"EDGEAI_MQTT_USERNAME={node}"),
        *("-e", f"EDGEAI_MQTT_PASSWORD={broker.password(node)}"),
        *("-e", f"EDGEAI_HTTP_PORT={http_port}", "-e", "EDGEAI_TORCH_THREADS=1"),
        *("-e", "EDGEAI_MAX_STEPS=50", "-e", "EDGEAI_SHUTDOWN_GRACE_S=60"),
        image,
    ]
    client = broker.client()

    agent = Node(f"edgeai/{node}")
    try:
        podman(*run)
        wait_healthy(f"http://127.0.0.1:{http_port}", name)
        assert generate(client, agent, id="boxed-1")["status"] == "ok"
        # A long job running, one queued; SIGTERM: the first finishes, the second waits.
        client.subscribe(f"{agent.base}/result/+", f"{agent.base}/jobs/boxed-long")
        client.publish(
            f"{agent.base}/generate", json.dumps({"prompt": "x", "id": "boxed-long", "steps": 50})
        )
        client.publish(f"{agent.base}/generate", json.dumps({"prompt": "x", "id": "boxed-queued"}))
        client.wait_for(f"{agent.base}/jobs/boxed-long", lambda m: m.json().get("step") == 1)
        podman("kill", "--signal", "TERM", name)
        assert podman("wait", name, timeout=120) == "0"
        assert client.wait_for(f"{agent.base}/result/boxed-long").json()["status"] == "ok"
        logs = container_log(name)
        assert "Traceback" not in logs
        assert "INFO agent.app: stopping" in logs
        assert " WARNING " not in logs
        # Started again on the same volume: the queued job is answered.
        podman("start", name)
        queued = client.wait_for(f"{agent.base}/result/boxed-queued", timeout=300).json()
        assert queued["status"] == "ok"
        user = podman("exec", name, "id", "-u")
        assert user == "1000"  # not root
        files = podman("exec", name, "ls", "-A", "/data")
        assert "journal.sqlite3" in files
        assert "api-token" in files
    finally:
        client.close()
        podman("rm", "-f", name, check=False)
        podman("volume", "rm", "-f", volume, check=False)
