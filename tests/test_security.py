"""The shipped broker config: no anonymous access, the ACL, TLS with client certificates."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import fill_up, free_port, generate, require_command, start_broker


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
    broker.add_node("pi")
    agent_like = broker.client("pi")
    agent_like.subscribe("edgeai/pi/generate")  # the agent may read requests ...
    mosquitto_pub(broker, "-t", "edgeai/pi/generate", "-m", "x", user="pi")  # ... not write
    assert nothing_arrives(agent_like, "edgeai/pi/generate")
    mosquitto_pub(broker, "-t", "edgeai/pi/generate", "-m", "x")
    agent_like.wait_for("edgeai/pi/generate", timeout=10)
    agent_like.close()


def mosquitto_sub(broker, user: str, *topics: str) -> subprocess.Popen[str]:
    """Run mosquitto_sub as ``user``, printing topic and payload, until it is terminated."""
    filters = [argument for topic in topics for argument in ("-t", topic)]
    return subprocess.Popen(
        [
            require_command("mosquitto_sub"),
            *("-h", "127.0.0.1", "-p", str(broker.port), "-V", "5", "-q", "1", "-v"),
            *("-u", user, "-P", broker.password(user), *filters),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )


def seen(process: subprocess.Popen[str]) -> str:
    time.sleep(1.5)
    process.terminate()
    return process.communicate(timeout=10)[0]


def test_each_agent_reads_only_its_own_requests_and_writes_only_its_own_outputs(broker):
    """As pi-b's user, with mosquitto_pub and mosquitto_sub, against pi-a's topics."""
    broker.add_node("pi-a")
    broker.add_node("pi-b")
    # pi-b listens on pi-a's requests and its own; a client sends one to each.
    snoop = mosquitto_sub(broker, "pi-b", "edgeai/pi-a/generate", "edgeai/pi-b/generate")
    time.sleep(0.5)
    mosquitto_pub(broker, "-t", "edgeai/pi-a/generate", "-m", "for pi-a")
    mosquitto_pub(broker, "-t", "edgeai/pi-b/generate", "-m", "for pi-b")
    received = seen(snoop)
    assert "edgeai/pi-b/generate for pi-b" in received
    assert "for pi-a" not in received
    # pi-b writes a result and an image for itself (seen) and forges them for pi-a (dropped).
    watcher = mosquitto_sub(broker, "edgeai-client", "edgeai/+/result/+", "edgeai/+/image")
    time.sleep(0.5)
    for node in ("pi-a", "pi-b"):
        mosquitto_pub(
            broker, "-t", f"edgeai/{node}/result/x", "-m", f"from pi-b as {node}", user="pi-b"
        )
        mosquitto_pub(broker, "-t", f"edgeai/{node}/image", "-m", f"image as {node}", user="pi-b")
    received = seen(watcher)
    assert "edgeai/pi-b/result/x from pi-b as pi-b" in received
    assert "edgeai/pi-b/image image as pi-b" in received
    assert "as pi-a" not in received
    # Both share the fleet: pi-b reads fleet requests and writes fleet results under its own
    # name, never as pi-a, nor at the old nameless topic.
    fleet = mosquitto_sub(broker, "pi-b", "$share/workers/edgeai/fleet/generate")
    results = mosquitto_sub(broker, "edgeai-client", "edgeai/fleet/result/#")
    time.sleep(0.5)
    mosquitto_pub(broker, "-t", "edgeai/fleet/generate", "-m", "a fleet job")
    for topic in ("pi-b/f1", "pi-a/f1", "f1"):
        mosquitto_pub(
            broker, "-t", f"edgeai/fleet/result/{topic}", "-m", f"done at {topic}", user="pi-b"
        )
    assert "edgeai/fleet/generate a fleet job" in seen(fleet)
    received = seen(results)
    assert "edgeai/fleet/result/pi-b/f1 done at pi-b/f1" in received
    assert "pi-a/f1" not in received
    assert "done at f1" not in received


def test_a_node_writes_only_its_own_home_assistant_discovery(broker):
    """A compromised pi-b cannot add a lock to Home Assistant, nor restyle pi-a's entities."""
    broker.add_node("pi-a")
    broker.add_node("pi-b")
    watcher = mosquitto_sub(broker, "edgeai-client", "homeassistant/#")
    time.sleep(0.5)
    for topic in (
        "homeassistant/sensor/pi-b/state/config",
        "homeassistant/sensor/pi-a/state/config",
        "homeassistant/lock/front_door/config",
        "homeassistant/lock/pi-b/config",
    ):
        mosquitto_pub(broker, "-t", topic, "-m", f"by pi-b at {topic}", user="pi-b")
    received = seen(watcher)
    assert "homeassistant/sensor/pi-b/state/config by pi-b" in received
    assert "pi-a" not in received
    assert "front_door" not in received
    assert "lock/pi-b/config" not in received


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


def post_job(agent, body: dict, token: str | None = None) -> int:
    request = urllib.request.Request(
        agent.url + "/api/jobs",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_agent_is_secure_by_default(broker, make_agent):
    # No token configured, nothing turned off: the agent makes one, and HTTP needs it.
    agent = make_agent(broker, EDGEAI_HTTP_AUTH="true")
    token_file = agent.state_dir / "api-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 24
    assert post_job(agent, {"prompt": "x"}) == 401
    assert post_job(agent, {"prompt": "x"}, token="wrong") == 401
    assert agent.http_get("/v1/models")[0] == 401
    assert post_job(agent, {"prompt": "x", "id": "secure"}, token=token) == 202
    # The image URL handed out (to Home Assistant's image entity, say) opens that image alone.
    client = broker.client()
    result = generate(client, agent, output="url")
    client.close()
    url = result["image"]["url"]
    assert "?sig=" in url
    assert agent.http_get(url.removeprefix(agent.url))[0] == 200
    assert agent.http_get(url.removeprefix(agent.url).split("?")[0])[0] == 401
    # The same token after a restart; the page's address carries it.
    agent.stop()
    agent.start()
    assert token_file.read_text().strip() == token
    page = subprocess.run(
        [sys.executable, "-m", "agent", "--page-url"],
        env=agent.env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert page == f"{agent.url}/?token={token}"


def test_turning_http_auth_off_is_said_in_the_log(broker, make_agent):
    agent = make_agent(broker, EDGEAI_HTTP_AUTH="false")
    assert post_job(agent, {"prompt": "x"}) == 202
    assert "HTTP authentication is off" in agent.log()
    assert not (agent.state_dir / "api-token").exists()


def start_and_wait_exit(agent, timeout: float = 60) -> int:
    agent.start(wait=False)
    return agent.process.wait(timeout)


def test_an_empty_token_setting_stops_the_start_with_a_message(broker, make_agent):
    agent = make_agent(broker, start=False, EDGEAI_HTTP_AUTH="true", EDGEAI_API_TOKEN=" ")
    assert start_and_wait_exit(agent) == 2
    log = agent.log()
    assert "cannot start: api_token is set but empty" in log
    assert "Traceback" not in log


def test_an_empty_token_file_is_replaced_never_taken_as_no_token(broker, make_agent, tmp_path):
    agent = make_agent(broker, start=False, EDGEAI_HTTP_AUTH="true")
    agent.state_dir.mkdir(parents=True)
    token_file = agent.state_dir / "api-token"
    token_file.write_text("")  # what a full disk leaves at the first start
    agent.start()
    token = token_file.read_text().strip()
    assert len(token) >= 24
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert "is empty; generating a new token" in agent.log()
    assert post_job(agent, {"prompt": "x"}) == 401
    assert post_job(agent, {"prompt": "x"}, token="") == 401
    assert agent.http_get("/api/images")[0] == 401
    assert post_job(agent, {"prompt": "x"}, token=token) == 202


def test_a_token_that_cannot_be_read_or_written_stops_the_start(broker, make_agent):
    agent = make_agent(broker, start=False, EDGEAI_HTTP_AUTH="true")
    (agent.state_dir / "api-token").mkdir(parents=True)  # unreadable as a file
    assert start_and_wait_exit(agent) == 2
    assert "cannot start: cannot read the API token file" in agent.log()
    assert "Traceback" not in agent.log()


def test_a_full_disk_at_the_first_start_leaves_no_empty_token(broker, make_agent, small_disk):
    state = small_disk / "state"
    state.mkdir()
    (state / "images").mkdir()
    fill_up(small_disk, leave=0)
    agent = make_agent(broker, start=False, EDGEAI_HTTP_AUTH="true", EDGEAI_STATE_DIR=str(state))
    assert start_and_wait_exit(agent) == 2
    assert "cannot write the API token" in agent.log()
    assert not (state / "api-token").exists()


def test_a_state_folder_that_cannot_be_made_is_one_clear_line(broker, make_agent, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    agent = make_agent(broker, start=False, EDGEAI_STATE_DIR=str(blocker / "state"))
    agent.state_dir.mkdir(parents=True)  # where the test keeps the agent's log
    assert start_and_wait_exit(agent) == 2
    log = agent.log()
    assert f"cannot start: state_dir {blocker / 'state'} cannot be used: Not a directory" in log
    assert "Traceback" not in log


def test_prompts_images_and_the_token_are_private_to_the_agent(broker, make_agent):
    agent = make_agent(broker, EDGEAI_HTTP_AUTH="true")
    agent.state_dir.chmod(0o755)  # as the old unit left it: the agent tightens it at start
    agent.stop()
    agent.start()
    client = broker.client()
    generate(client, agent, output="url")
    client.close()
    state = agent.state_dir
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "images").stat().st_mode) == 0o700
    private = [state / "api-token", *state.glob("journal.sqlite3*"), *state.glob("images/*")]
    assert len(private) >= 3
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
