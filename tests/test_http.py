"""The HTTP server: images, health, metrics checked by promtool, and nothing outside the folder."""

from __future__ import annotations

import http.client
import re
import subprocess

import pytest

from agent.model.precision import machine_arithmetic
from tests.conftest import generate, require_command


def raw_get(agent, path: str) -> int:
    """Send the path exactly as written (urllib would normalise it)."""
    connection = http.client.HTTPConnection("127.0.0.1", agent.http_port, timeout=10)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        connection.endheaders()
        return connection.getresponse().status
    finally:
        connection.close()


def test_healthz(shared_agent):
    status, headers, body = shared_agent.http_get("/healthz")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert b'"mqtt_connected": true' in body


def test_metrics_pass_promtool_and_count_jobs(shared_agent, client):
    generate(client, shared_agent)
    text = shared_agent.metrics()
    checked = subprocess.run(
        [require_command("promtool"), "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
    assert re.search(r'^edgeai_jobs_total\{status="done"\} [1-9]', text, re.MULTILINE)
    accepted = r'^edgeai_requests_total\{mode="txt2img",outcome="accepted"\} [1-9]'
    assert re.search(accepted, text, re.MULTILINE)
    generated = r'^edgeai_generation_seconds_count\{mode="txt2img"\} [1-9]'
    assert re.search(generated, text, re.MULTILINE)
    assert re.search(r'^edgeai_stage_seconds_count\{stage="denoising"\} [1-9]', text, re.MULTILINE)
    assert re.search(r'^edgeai_stage_seconds_count\{stage="queue_wait"\} [1-9]', text, re.MULTILINE)
    assert re.search(r"^edgeai_queue_wait_seconds_count [1-9]", text, re.MULTILINE)
    assert "edgeai_queue_depth 0.0" in text
    assert "edgeai_mqtt_connected 1.0" in text
    assert re.search(r"^edgeai_model_load_seconds [0-9.]+$", text, re.MULTILINE)
    # auto precision: bfloat16 where the CPU computes it natively; elsewhere (a Pi) float16 or
    # float32, as the start's probe found faster.
    expected = {"bfloat16"} if machine_arithmetic().bfloat16 else {"float16", "float32"}
    assert any(f'edgeai_model_info{{device="cpu",dtype="{dtype}"' in text for dtype in expected)
    assert 'levers="' in text
    assert "tiny-vae" in text
    assert "edgeai_model_warmups_total 1.0" in text  # once, at load, not per job
    shared_agent.wait_metric('edgeai_state{edgeai_state="idle"} 1.0')
    assert 'le="600.0"' in text  # latency buckets reach ten minutes


@pytest.mark.parametrize(
    "path",
    [
        "/images/../agent.log",
        "/images/%2e%2e/agent.log",
        "/images/..%2fagent.log",
        "/images/%2e%2e%2fagent.log",
        "/images/x.png%00.png",
        "/images/.hidden.png",
        "/images/",
        "/images/../../etc/passwd",
        "/../etc/passwd",
        "/nope",
    ],
)
def test_no_path_reaches_outside_the_image_folder(shared_agent, path):
    assert raw_get(shared_agent, path) == 404


def test_a_symlink_in_the_image_folder_is_not_followed(shared_agent):
    link = shared_agent.state_dir / "images" / "sneaky.png"
    link.symlink_to(shared_agent.log_path)
    try:
        assert raw_get(shared_agent, "/images/sneaky.png") == 404
    finally:
        link.unlink()
