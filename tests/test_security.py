"""The shipped broker config: no anonymous access, the ACL, TLS with client certificates."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import free_port, generate, require_command, start_broker


def mosquitto_pub(
    broker,
    *args: str,
    user: str | None = "edgeai-client",
    password: str | None = None,
    port: int | None = None,
):
    """Run mosquitto_pub as a user would; ``user=None`` connects anonymously."""
    credentials = ["-u", user, "-P", password or broker.password(user)] if user else []
    return subprocess.run(
        [
            require_command("mosquitto_pub"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port or broker.port),
            "-V",
            "5",
            "-q",
            "1",
            *credentials,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def nothing_arrives(client, topic: str, seconds: float = 1.5) -> bool:
    time.sleep(seconds)
    return client.messages(topic) == []


def test_anonymous_clients_are_refused(broker):
    refused = mosquitto_pub(broker, "-t", "edgeai/x/generate", "-m", "hello", user=None)
    assert refused.returncode != 0
    assert "not authori" in (refused.stderr + refused.stdout).lower()


def test_a_wrong_password_is_refused(broker):
    refused = mosquitto_pub(broker, "-t", "edgeai/x/generate", "-m", "x", password="wrong")
    assert refused.returncode != 0


def test_a_client_cannot_write_results(broker):
    watcher = broker.client()
    watcher.subscribe("edgeai/pi/result/+")
    mosquitto_pub(broker, "-t", "edgeai/pi/result/forged", "-m", '{"status": "ok"}')
    assert nothing_arrives(watcher, "edgeai/pi/result/forged")
    watcher.close()


def test_a_client_cannot_read_another_nodes_requests(broker):
    snoop = broker.client()
    snoop.client.subscribe("edgeai/other-node/generate", qos=1)
    mosquitto_pub(broker, "-t", "edgeai/other-node/generate", "-m", "a secret prompt")
    assert nothing_arrives(snoop, "edgeai/other-node/generate")
    snoop.close()


def test_the_agent_user_cannot_send_requests(broker):
    agent_like = broker.client("edgeai-agent")
    agent_like.subscribe("edgeai/pi/generate")  # the agent may read requests ...
    mosquitto_pub(
        broker, "-t", "edgeai/pi/generate", "-m", "x", user="edgeai-agent"
    )  # ... not write
    assert nothing_arrives(agent_like, "edgeai/pi/generate")
    mosquitto_pub(broker, "-t", "edgeai/pi/generate", "-m", "x")
    agent_like.wait_for("edgeai/pi/generate", timeout=10)
    agent_like.close()


def openssl(*args: str, cwd) -> None:
    subprocess.run([require_command("openssl"), *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def certificates(tmp_path):
    folder = tmp_path / "pki"
    folder.mkdir()
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=edgeai test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        cwd=folder,
    )
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=folder,
        )
        extension = ["-extfile", "server.ext"] if name == "server" else []
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            f"{name}.crt",
            *extension,
            cwd=folder,
        )
    return folder


def test_tls_listener_with_client_certificates(tmp_path, certificates, make_agent):
    tls_port = free_port()
    broker = start_broker(
        tmp_path / "tls-broker",
        env={
            "BROKER_TLS_PORT": str(tls_port),
            "BROKER_TLS_CA": str(certificates / "ca.crt"),
            "BROKER_TLS_CERT": str(certificates / "server.crt"),
            "BROKER_TLS_KEY": str(certificates / "server.key"),
        },
    )
    try:
        agent = make_agent(
            broker,
            EDGEAI_MQTT_PORT=str(tls_port),
            EDGEAI_MQTT_TLS_CA=str(certificates / "ca.crt"),
            EDGEAI_MQTT_TLS_CERT=str(certificates / "client.crt"),
            EDGEAI_MQTT_TLS_KEY=str(certificates / "client.key"),
        )
        client = broker.client()  # on the plain listener: both listeners share the topics
        assert generate(client, agent)["status"] == "ok"
        client.close()
        # Without a client certificate the TLS listener refuses the connection.
        ca = ["--cafile", str(certificates / "ca.crt")]
        topic = ["-t", f"{agent.base}/generate", "-m", "x"]
        refused = mosquitto_pub(broker, *ca, *topic, port=tls_port)
        assert refused.returncode != 0
        client_certificate = [
            "--cert",
            str(certificates / "client.crt"),
            "--key",
            str(certificates / "client.key"),
        ]
        with_certificate = mosquitto_pub(broker, *ca, *client_certificate, *topic, port=tls_port)
        assert with_certificate.returncode == 0, with_certificate.stderr
    finally:
        broker.stop()


def test_models_load_from_safetensors_only(broker, make_agent, tiny_model, tmp_path):
    pickled = tmp_path / "pickled-model"
    shutil.copytree(tiny_model, pickled)
    weights = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), pickled / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()  # only a pickle is left: it could run code when loaded, so it must not load
    agent = make_agent(broker, start=False, EDGEAI_MODEL=str(pickled))
    agent.start(wait=False)
    state = agent.wait_state("error")
    assert "safetensors" in state["error"]
