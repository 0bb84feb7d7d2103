"""The Home Assistant integration, tested by Home Assistant's own harness against a real agent.

Home Assistant 2026.2 needs Python 3.13: ``scripts/ha-env`` provides it (a Debian 13 root on
Debian 12, built once and cached; a virtual environment on newer hosts). This test starts the
agent with the tiny model and runs ``tests/homeassistant`` there, with the agent's URL and token.
"""

from __future__ import annotations

import json
import os
import subprocess

from tests.conftest import ROOT
from tests.tiny_pipeline import build_tiny_sd_pipeline

TOKEN = "ha-test-token"


def test_the_integration_in_home_assistant(broker, make_agent, tiny_model, tmp_path):
    models = {"tiny-xl": str(tiny_model), "tiny-sd": str(build_tiny_sd_pipeline(tmp_path / "sd"))}
    agent = make_agent(
        broker,
        EDGEAI_API_TOKEN=TOKEN,
        EDGEAI_HTTP_AUTH="true",
        EDGEAI_MAX_STEPS="50",
        EDGEAI_MAX_QUEUE="2",
        EDGEAI_MODELS=json.dumps(models),
    )
    completed = subprocess.run(
        [
            str(ROOT / "scripts" / "ha-env"),
            "run",
            "python",
            "-m",
            "pytest",
            "-c",
            "tests/homeassistant/pytest.ini",
            "-p",
            "no:cacheprovider",
            "-v",
            "-s",
            "tests/homeassistant",
        ],
        env={
            **os.environ,
            "EDGEAI_AGENT_URL": agent.url,
            "EDGEAI_AGENT_TOKEN": TOKEN,
            # Home Assistant's MQTT integration on the same broker, as a client.
            "EDGEAI_MQTT_PORT": str(broker.port),
            "EDGEAI_MQTT_PASSWORD": broker.password("edgeai-client"),
            "EDGEAI_NODE_ID": agent.node_id,
        },
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    print(completed.stdout[-6000:], completed.stderr[-3000:])
    assert completed.returncode == 0, completed.stdout[-6000:] + completed.stderr[-3000:]
    assert "12 passed" in completed.stdout
