"""What a hostile LAN costs the agent and its broker, in figures: a connection flood, the worst
picture accepted, a 40 MB publish, a client filling the broker for an agent that is away.

The same steps as tests/test_hostile_lan.py and tests/test_hostile_pictures.py, printed rather
than asserted, so that any two checkouts can be compared the same way (run from each one's
root, with this project's virtual environment; the daemon's open-files limit is 1,024 soft and
4,096 hard, as systemd's default soft limit):

    .venv/bin/python tests/bench/hostile_lan.py
"""

from __future__ import annotations

import base64
import http.client
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, ".")

from tests.conftest import AgentProcess, Broker, generate, start_broker
from tests.mqtt_client import TestClient
from tests.pictures import deep_png
from tests.tiny_pipeline import build_tiny_pipeline

MIB = 2**20


def status(pid: int, field: str) -> int:
    """A memory field of a process's /proc status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def healthz(agent: AgentProcess) -> str:
    """How /healthz answers a request from another host (127.0.0.2)."""
    began = time.monotonic()
    try:
        connection = http.client.HTTPConnection(
            "127.0.0.1", agent.http_port, timeout=5, source_address=("127.0.0.2", 0)
        )
        connection.request("GET", "/healthz")
        code = connection.getresponse().status
        connection.close()
    except OSError as exc:
        return f"no answer ({type(exc).__name__}) after {(time.monotonic() - began) * 1000:.0f} ms"
    return f"{code} in {(time.monotonic() - began) * 1000:.0f} ms"


def flood(broker: Broker, client: TestClient, model: Path, root: Path) -> None:
    agent = AgentProcess(broker, model, root / "flood", {"EDGEAI_HTTP_IDLE_TIMEOUT_S": "60"})
    agent.prefix = ["prlimit", "--nofile=1024:4096", "--"]
    agent.start()
    generate(client, agent)
    pid = agent.process.pid
    lines = len(agent.log().splitlines())
    held = []
    for _ in range(2000):
        try:
            held.append(socket.create_connection(("127.0.0.1", agent.http_port), timeout=2))
        except OSError:
            break
    time.sleep(2)
    descriptors = sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
    health = healthz(agent)
    began = time.monotonic()
    try:
        job = generate(client, agent, timeout=30)
        answered = f"{job['status']} in {time.monotonic() - began:.2f} s"
    except AssertionError:
        answered = "no answer in 30 s"
    time.sleep(3)
    added = len(agent.log().splitlines()) - lines
    print(
        f"1. flood: {len(held)} connections opened; daemon fds {descriptors}; /healthz {health};"
        f" MQTT job {answered}; log +{added} lines"
    )
    for sock in held:
        sock.close()
    agent.stop()


def pictures(broker: Broker, client: TestClient, model: Path, root: Path) -> None:
    agent = AgentProcess(broker, model, root / "pixels", {})
    agent.start()
    worst = base64.b64encode(deep_png()).decode()
    generate(client, agent, init_image=worst, width=512, height=512)
    pid = agent.process.pid
    before = status(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    for seed in range(4):
        generate(client, agent, init_image=worst, width=512, height=512, seed=seed)
    print(
        f"2. 4 x 4096x4096 RGBA16 PNG: daemon RSS {before / MIB:.0f} MiB, peak "
        f"+{(status(pid, 'VmHWM') - before) / MIB:.0f} MiB, after "
        f"+{(status(pid, 'VmRSS') - before) / MIB:.0f} MiB"
    )
    agent.stop()


def huge_publish(model: Path, root: Path) -> None:
    roomy = start_broker(root / "roomy", extra_config="max_packet_size 67108864")
    client = roomy.client()
    agent = AgentProcess(roomy, model, root / "packet", {})
    agent.start()
    generate(client, agent)
    pid = agent.process.pid
    before = status(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    client.publish(f"{agent.base}/generate", b"{" + b" " * (40 * 10**6) + b"}")
    generate(client, agent)
    print(
        f"4. a 40 MB publish: daemon peak +{(status(pid, 'VmHWM') - before) / MIB:.0f} MiB, "
        f"after +{(status(pid, 'VmRSS') - before) / MIB:.0f} MiB"
    )
    agent.stop()
    client.close()
    roomy.stop()


def absent_agent(broker: Broker, client: TestClient) -> None:
    broker.add_node("pi-away")
    away = broker.client("pi-away", persistent=True, client_id="pi-away")
    away.subscribe("edgeai/pi-away/generate")
    away.close()
    before = status(broker.process.pid, "VmRSS")
    database = broker.state_dir / "mosquitto" / "data" / "mosquitto.db"
    began = time.monotonic()
    for index in range(16):
        client.publish("edgeai/pi-away/generate", bytes([65 + index]) * (3 * MIB))
    size = database.stat().st_size / MIB if database.exists() else 0
    print(
        f"5. 48 MiB to an absent agent in {time.monotonic() - began:.1f} s: broker RSS "
        f"{before / MIB:.0f} -> {status(broker.process.pid, 'VmRSS') / MIB:.0f} MiB, "
        f"database {size:.0f} MiB"
    )
    back = broker.client("pi-away", persistent=True, client_id="pi-away")
    time.sleep(3)
    print(f"   the agent back receives {len(back.messages('edgeai/pi-away/generate'))} of 16")
    back.close()


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 6000), hard), hard))
    root = Path(tempfile.mkdtemp(prefix="hostile-lan-"))
    model = build_tiny_pipeline(root / "model")
    broker = start_broker(root / "broker")
    client = broker.client()
    try:
        flood(broker, client, model, root)
        pictures(broker, client, model, root)
        huge_publish(model, root)
        absent_agent(broker, client)
    finally:
        client.close()
        broker.stop()


if __name__ == "__main__":
    main()
