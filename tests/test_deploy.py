"""deploy/: the service, the install script, Prometheus, Grafana and Home Assistant examples."""

from __future__ import annotations

import configparser
import json
import re
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from agent.mqtt.discovery import announcements
from agent.mqtt.topics import Topics
from agent.settings import Settings
from tests.conftest import ROOT, require_command

DEPLOY = ROOT / "deploy"
SHELL_SCRIPTS = [
    DEPLOY / "install.sh",
    ROOT / "scripts" / "run",
    ROOT / "scripts" / "test",
    ROOT / "scripts" / "bench",
    ROOT / "scripts" / "ha-env",
    ROOT / "tests" / "arm64" / "run.sh",
    ROOT / "scripts" / "lib.sh",
    ROOT / "mosquitto" / "prepare.sh",
    ROOT / ".ci" / "run",
]


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_scripts_parse_and_pass_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    checked = subprocess.run(
        [require_command("shellcheck"), "-x", str(script)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout


def test_the_service_unit_is_hardened_and_waits_for_the_grace_period():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read(DEPLOY / "systemd" / "edgeai-agent.service")
    service = unit["Service"]
    assert service["Restart"] == "on-failure"
    stop_timeout = int(service["TimeoutStopSec"])
    assert stop_timeout > Settings.model_fields["shutdown_grace_s"].default
    assert service["MemoryMax"]
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["StateDirectory"] == "edgeai-agent"
    assert service["ProtectHome"] == "yes"
    assert service["PrivateTmp"] == "yes"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert (DEPLOY / "install.sh").stat().st_mode & stat.S_IXUSR


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_command("promtool"), *args], capture_output=True, text=True, check=False
    )


def test_prometheus_config_and_alert_rules_pass_promtool():
    config = promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    rules = promtool("check", "rules", str(DEPLOY / "prometheus" / "alerts.yml"))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    names = {
        rule["alert"]
        for group in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
        for rule in group["rules"]
    }
    assert {
        "EdgeaiAgentDown",
        "EdgeaiSocHot",
        "EdgeaiThrottled",
        "EdgeaiQueueStuck",
        "EdgeaiJobsFailing",
    } <= names


def all_expressions() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "edgeai-agent.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    expressions += [
        variable["query"]
        for variable in dashboard["templating"]["list"]
        if variable["type"] == "query"
    ]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    expressions += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    return expressions


def test_every_promql_expression_names_only_metrics_the_agent_exposes(broker, make_agent, tmp_path):
    vcgencmd = tmp_path / "vcgencmd"
    vcgencmd.write_text("#!/bin/sh\necho throttled=0x0\n")
    vcgencmd.chmod(0o755)
    agent = make_agent(broker, start=False, EDGEAI_VCGENCMD=str(vcgencmd))
    zone = agent.state_dir / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "temp").write_text("50000\n")
    agent.start()
    exposed = set(re.findall(r"^(edgeai_[a-z0-9_]+)", agent.metrics(), re.MULTILINE))
    used = {
        name
        for expression in all_expressions()
        for name in re.findall(r"\bedgeai_[a-z0-9_]+", expression)
    }
    assert used, "no edgeai_ metric found in the dashboard and rules"
    assert used <= exposed, f"not exposed by the agent: {sorted(used - exposed)}"
    # The dashboard covers what the issue names.
    joined = "\n".join(all_expressions())
    for metric in (
        "edgeai_stage_seconds_bucket",
        "edgeai_queue_depth",
        "edgeai_queue_wait_seconds_bucket",
        "edgeai_soc_temperature_celsius",
        "edgeai_throttled",
        "edgeai_jobs_total",
        "edgeai_mqtt_connected",
    ):
        assert metric in joined


def test_grafana_provisioning_files_are_valid():
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "edgeai.yml").read_text()
    )
    assert datasource["datasources"][0]["type"] == "prometheus"
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "edgeai.yml").read_text()
    )
    assert provider["providers"][0]["type"] == "file"
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "edgeai-agent.json").read_text())
    assert dashboard["uid"] == "edgeai-agent"
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])


def test_home_assistant_examples_use_only_discovered_entities():
    automations = yaml.safe_load((DEPLOY / "homeassistant" / "automations.yaml").read_text())
    assert len(automations) >= 2
    discovered = {
        a.config["default_entity_id"]
        for a in announcements(
            prefix="homeassistant",
            node_id="pi5",
            topics=Topics("edgeai/pi5"),
            model="m",
            image_format="png",
            configuration_url="http://pi5:8080",
        )
    }
    text = Path(DEPLOY / "homeassistant" / "automations.yaml").read_text()
    used = set(re.findall(r"\b(?:image|text|button|sensor|binary_sensor)\.edgeai_[a-z0-9_]+", text))
    assert used, "the examples use no edgeai entity"
    assert used <= discovered, f"not discovered: {sorted(used - discovered)}"
    assert "text.edgeai_pi5_prompt" in used
