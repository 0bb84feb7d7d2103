"""Fixtures with real parts: a mosquitto broker, a tiny SDXL pipeline, the agent as a process."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import cgroups
from tests.mqtt_client import TestClient
from tests.tiny_pipeline import build_tiny_pipeline

ROOT = Path(__file__).resolve().parent.parent
collect_ignore = ["homeassistant"]  # Home Assistant's own harness runs those (test_home_assistant)
if not os.environ.get("EDGEAI_CONTAINER_TESTS"):
    collect_ignore.append("containers")  # slow (image builds): scripts/test-containers runs them
if not os.environ.get("EDGEAI_SMALL_PI_TESTS"):
    collect_ignore.append("small_pi")  # slow (SDXL's size in 2 GiB): scripts/test-small-pi
ARTIFACTS = ROOT / "test-artifacts"


TEST_PORTS = range(20000, 32768)
"""Below Linux's range for outgoing connections' source ports (32768-60999): a port taken from
that range could be given to some connection's source before the test binds it."""
_PORT_CHOICE = random.SystemRandom()  # two xdist workers never share a seed


def free_port() -> int:
    """Return a port nothing listens on now, for a server a test starts next."""
    while True:
        port = _PORT_CHOICE.choice(TEST_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port}")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight SDXL pipeline in the hub's folder layout, with a tiny TAESD beside.

    The agent decodes with the tiny TAESD, as it does with TAESDXL by default.
    """
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sdxl"))


@dataclass
class Broker:
    """A mosquitto started from the project's config (auth and ACL on) on a free port."""

    state_dir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    extra_config: str = ""
    env: dict[str, str] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)
    """Agents (node ids) with a user of their own, as prepare.sh makes them."""

    def __post_init__(self) -> None:
        self._prepare()

    def _prepare(self) -> None:
        prepare = ROOT / "mosquitto" / "prepare.sh"
        subprocess.run(
            [str(prepare), str(self.state_dir), str(self.port), "127.0.0.1", *self.nodes],
            check=True,
            capture_output=True,
            env={**os.environ, **self.env},
        )
        if self.extra_config:
            with self.config.open("a") as config:
                config.write("\n" + self.extra_config + "\n")

    def add_node(self, node: str) -> None:
        """Give an agent a user of its own; a running broker reloads passwords and ACL."""
        if node in self.nodes:
            return
        self.nodes.append(node)
        self._prepare()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGHUP)
            time.sleep(0.2)  # mosquitto reloads between two network passes

    @property
    def config(self) -> Path:
        return self.state_dir / "mosquitto" / "mosquitto.conf"

    def password(self, user: str) -> str:
        return (self.state_dir / "credentials" / f"{user}.password").read_text().strip()

    def password_file(self, user: str) -> Path:
        return self.state_dir / "credentials" / f"{user}.password"

    def start(self) -> None:
        self.process = subprocess.Popen(["mosquitto", "-c", str(self.config)])
        wait_for_port(self.port)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def client(self, user: str = "edgeai-client", **kwargs) -> TestClient:
        return TestClient(self.port, user, self.password(user), **kwargs)


def start_broker(state_dir: Path, **options) -> Broker:
    broker = Broker(state_dir, **options)
    broker.start()
    return broker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    running = start_broker(tmp_path / "broker")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    running = start_broker(tmp_path_factory.mktemp("broker"))
    yield running
    running.stop()


@dataclass
class AgentProcess:
    """The agent run as a user runs it: ``python -m agent`` with EDGEAI_ settings."""

    broker: Broker
    model: Path
    state_dir: Path
    extra_env: dict[str, str]
    node_id: str = field(default_factory=lambda: f"node-{uuid.uuid4().hex[:6]}")
    http_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    cgroup: cgroups.MemoryCgroup | None = None
    """Run the agent (daemon and worker) under this memory cgroup's limit."""
    prefix: list[str] = field(default_factory=list)
    """A command the agent runs under (strace, to kill its worker at a chosen system call)."""
    unset: tuple[str, ...] = ()
    """Settings left to the agent to find (the broker, which a Home Assistant app asks for)."""

    @property
    def base(self) -> str:
        return f"edgeai/{self.node_id}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "agent.log"

    def env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("EDGEAI_")}
        env.update(
            {
                "EDGEAI_NODE_ID": self.node_id,
                "EDGEAI_MQTT_HOST": "127.0.0.1",
                "EDGEAI_MQTT_PORT": str(self.broker.port),
                "EDGEAI_MQTT_USERNAME": self.node_id,
                "EDGEAI_MQTT_PASSWORD_FILE": str(self.broker.password_file(self.node_id)),
                "EDGEAI_MODEL": str(self.model),
                "EDGEAI_TINY_VAE": str(self.model / "taesd"),
                "EDGEAI_STATE_DIR": str(self.state_dir),
                "EDGEAI_HTTP_HOST": "127.0.0.1",
                "EDGEAI_HTTP_PORT": str(self.http_port),
                "EDGEAI_PUBLIC_URL": self.url,
                "EDGEAI_TORCH_THREADS": "1",
                "EDGEAI_WORKER_RESTART_DELAY_S": "0.2",
                "EDGEAI_THERMAL_GLOB": str(self.state_dir / "thermal" / "thermal_zone*" / "temp"),
                "EDGEAI_VCGENCMD": "edgeai-no-vcgencmd",
                "EDGEAI_STATE_INTERVAL_S": "2",
                # Most tests speak to the HTTP API without a token; the token's own tests
                # (test_security, test_web, test_apis) turn it back on.
                "EDGEAI_HTTP_AUTH": "false",
            }
        )
        env.update(self.extra_env)
        for name in self.unset:
            env.pop(name, None)
        return env

    def start(self, wait: bool = True) -> None:
        self.broker.add_node(self.node_id)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        command = [*self.prefix, sys.executable, "-m", "agent"]
        if self.cgroup is not None:
            command = self.cgroup.wrap(command)
        self.process = subprocess.Popen(
            command, env=self.env(), stdout=log, stderr=subprocess.STDOUT
        )
        if wait:
            self.wait_state("idle")

    def wait_state(self, state: str, timeout: float = 120.0) -> dict:
        client = self.broker.client()
        deadline = time.monotonic() + timeout
        try:
            client.subscribe(f"{self.base}/state")
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    break
                try:
                    message = client.wait_for(
                        f"{self.base}/state", lambda m: m.json()["state"] == state, timeout=0.5
                    )
                    return message.json()
                except AssertionError:
                    continue
            raise AssertionError(f"agent never reached {state}; log:\n{self.log()}")
        finally:
            client.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def http_get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    def metrics(self) -> str:
        status, _, body = self.http_get("/metrics")
        assert status == 200
        return body.decode()

    def metric(self, name: str, **labels: str) -> float | None:
        """Return one sample of /metrics, parsed by prometheus_client's own parser."""
        for family in text_string_to_metric_families(self.metrics()):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return None

    def wait_metric(self, line: str, timeout: float = 20.0) -> None:
        """Wait until a line appears in /metrics (values change a moment after events)."""
        deadline = time.monotonic() + timeout
        while line not in self.metrics():
            assert time.monotonic() < deadline, f"{line!r} never appeared in /metrics"
            time.sleep(0.1)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


@contextlib.contextmanager
def running_agent(
    broker: Broker, model: Path, state_dir: Path, env: dict[str, str]
) -> Iterator[AgentProcess]:
    """Run an agent with ``env`` for the length of a with block (a module's shared agent)."""
    agent = AgentProcess(broker, model, state_dir, env)
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()


API_TOKEN = "s3cret-token"
"""The API token of the agents that require one (:func:`token_agent`, the API tests')."""


@pytest.fixture(scope="module")
def token_agent(
    module_broker: Broker, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AgentProcess]:
    """A module's agent that requires :data:`API_TOKEN` over HTTP."""
    env = {"EDGEAI_API_TOKEN": API_TOKEN, "EDGEAI_HTTP_AUTH": "true"}
    with running_agent(module_broker, tiny_model, tmp_path_factory.mktemp("token"), env) as agent:
        yield agent


@pytest.fixture
def make_agent(tmp_path: Path, tiny_model: Path) -> Iterator:
    agents: list[AgentProcess] = []

    def make(broker: Broker, start: bool = True, **env: str) -> AgentProcess:
        agent = AgentProcess(broker, tiny_model, tmp_path / f"agent{len(agents)}", env)
        agents.append(agent)
        if start:
            agent.start()
        return agent

    yield make
    for agent in agents:
        agent.stop()


@pytest.fixture
def memory_cgroup() -> Iterator:
    """Make memory cgroups (a limit in bytes) for a test; skipped where none can be written."""
    made: list[cgroups.MemoryCgroup] = []

    def make(limit: int) -> cgroups.MemoryCgroup:
        try:
            cgroup = cgroups.create(limit)
        except cgroups.CgroupUnavailableError as exc:
            pytest.skip(str(exc))
        made.append(cgroup)
        return cgroup

    yield make
    for cgroup in made:
        cgroup.remove()


@pytest.fixture(scope="module")
def shared_agent(
    module_broker: Broker, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AgentProcess]:
    """One agent for the contract tests that do not need a fresh one."""
    # 50 steps are allowed so that tests can hold a job running long enough to cancel it.
    env = {"EDGEAI_MAX_STEPS": "50"}
    agent = AgentProcess(module_broker, tiny_model, tmp_path_factory.mktemp("agent"), env)
    agent.start()
    yield agent
    agent.stop()


@pytest.fixture
def client(module_broker: Broker) -> Iterator[TestClient]:
    test_client = module_broker.client()
    yield test_client
    test_client.close()


def request(prompt: str = "a red apple", **fields) -> str:
    return json.dumps({"prompt": prompt, **fields})


@dataclass(frozen=True)
class Node:
    """An agent known only by its topics (one run by scripts/run, a container, compose)."""

    base: str


def generate(
    client: TestClient, agent: AgentProcess | Node, timeout: float = 60.0, **fields
) -> dict:
    """Send one JSON request and return its result (subscribing first, so nothing is missed)."""
    job_id = fields.setdefault("id", uuid.uuid4().hex[:12])
    fields.setdefault("prompt", "a red apple")
    client.subscribe(f"{agent.base}/result/{job_id}")
    client.publish(f"{agent.base}/generate", json.dumps(fields))
    return client.wait_for(f"{agent.base}/result/{job_id}", timeout=timeout).json()


def require_command(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; scripts/test installs it")
    return path


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs, as full as an SD card can get; skipped where none can be mounted."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (not root?): {mounted.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_up(disk, leave: int = 16_384) -> None:
    """Fill the disk as other data on an SD card does, leaving ``leave`` bytes free."""
    stats = os.statvfs(disk)
    free = stats.f_bavail * stats.f_frsize
    with (disk / "other-data").open("wb") as filler, contextlib.suppress(OSError):
        filler.write(b"\0" * max(free - leave, 0))  # full sooner than asked is full too
