"""The Home Assistant integration, tested by Home Assistant's own harness against a real agent.

Home Assistant 2026.2 needs Python 3.13: ``scripts/ha-env`` provides it (a Debian 13 root on
Debian 12, built once and cached; a virtual environment on newer hosts). This test starts the
agent with the tiny model and runs ``tests/homeassistant`` there, with the agent's URL and token.
"""

from __future__ import annotations

import os
import subprocess

from tests.conftest import ROOT

TOKEN = "ha-test-token"


def test_the_integration_in_home_assistant(broker, make_agent):
    agent = make_agent(
        broker,
        EDGEAI_API_TOKEN=TOKEN,
        EDGEAI_HTTP_AUTH="true",
        EDGEAI_MAX_STEPS="50",
        EDGEAI_MAX_QUEUE="2",
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
        env={**os.environ, "EDGEAI_AGENT_URL": agent.url, "EDGEAI_AGENT_TOKEN": TOKEN},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    print(completed.stdout[-6000:], completed.stderr[-3000:])
    assert completed.returncode == 0, completed.stdout[-6000:] + completed.stderr[-3000:]
    assert "10 passed" in completed.stdout
