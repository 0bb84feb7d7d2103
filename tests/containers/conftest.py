"""The container suite's parts: podman, the image built once, a model its user can read."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT

RUN_ON_HOST = ("run", "-d", "--network", "host")
"""A container started in the background on the host's network, as the tests' broker is."""
IMAGE = os.environ.get("EDGEAI_CONTAINER_IMAGE", "localhost/edgeai-agent:test")


def podman(*args: str, check: bool = True, timeout: float = 1800) -> str:
    completed = subprocess.run(
        ["podman", *args], capture_output=True, text=True, check=False, timeout=timeout
    )
    if check and completed.returncode != 0:
        pytest.fail(f"podman {' '.join(args)} failed:\n{completed.stdout}\n{completed.stderr}")
    return completed.stdout.strip()


def container_log(name: str) -> str:
    """What the container printed: the agent logs to standard error."""
    completed = subprocess.run(
        ["podman", "logs", name], capture_output=True, text=True, check=False, timeout=60
    )
    return completed.stdout + completed.stderr


@pytest.fixture(scope="session")
def image():
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed; scripts/test-containers installs it")
    # The docker format keeps the Dockerfile's HEALTHCHECK (OCI images have none).
    build = ["build", "--pull=never", "--format", "docker", "--target", "container"]
    build += ["-t", IMAGE]
    wheels = os.environ.get("PIP_FIND_LINKS")
    if wheels and Path(wheels).is_dir():  # a local torch CPU wheel, where its index is out of reach
        build += ["-v", f"{wheels}:{wheels}:ro", "--build-arg", f"PIP_FIND_LINKS={wheels}"]
    started = time.monotonic()
    subprocess.run(["podman", *build, str(ROOT)], check=True, cwd=ROOT, timeout=3600)
    size = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE))
    print(f"built {IMAGE} in {time.monotonic() - started:.0f} s: {size / 1e9:.2f} GB")
    return IMAGE


@pytest.fixture
def model_for_containers(tiny_model):
    # The fixture's folders are private to root; the image's user (uid 1000) reads the model.
    for path in [tiny_model, *tiny_model.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    parent = tiny_model.parent
    while parent != parent.parent and not (parent.stat().st_mode & 0o001):
        parent.chmod(parent.stat().st_mode | 0o011)
        parent = parent.parent
    return tiny_model


def wait_healthy(url: str, *names: str, timeout: float = 300) -> None:
    """Wait until ``url``/healthz answers 200; fail with the containers' logs."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5):
                return
        except OSError:
            logs = "".join(container_log(name) for name in names)
            assert time.monotonic() < deadline, logs
            time.sleep(1)
