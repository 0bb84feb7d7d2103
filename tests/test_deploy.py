"""deploy/: the service, the install script, Prometheus, Grafana and Home Assistant examples."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import stat
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from agent.mqtt.discovery import announcements
from agent.mqtt.topics import Topics
from agent.settings import Settings
from tests.conftest import ROOT, free_port, generate, require_command

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
    # Far above the HTTP connection cap, which the agent fits below its open-files limit.
    open_files = int(service["LimitNOFILE"])
    assert open_files >= 4 * Settings.model_fields["http_max_connections"].default
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


def test_every_alert_has_unit_tests_that_pass_promtool():
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    names = {rule["alert"] for group in alerts["groups"] for rule in group["rules"]}
    tests = yaml.safe_load((DEPLOY / "prometheus" / "alerts_test.yml").read_text())["tests"]
    fires, quiet = set(), set()
    for test in tests:
        for case in test["alert_rule_test"]:
            (fires if case["exp_alerts"] else quiet).add(case["alertname"])
    assert fires == names, f"alerts never shown to fire: {sorted(names - fires)}"
    assert quiet == names, f"alerts never shown to stay quiet: {sorted(names - quiet)}"
    tested = promtool("test", "rules", str(DEPLOY / "prometheus" / "alerts_test.yml"))
    print(tested.stdout, tested.stderr)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def prometheus_query(port: int, expression: str) -> list[dict]:
    query = urllib.parse.urlencode({"query": expression})
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?{query}", timeout=10) as r:
        answer = json.loads(r.read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def wait_scrapes(port: int, count: int, after: float = 0.0) -> None:
    """Wait until Prometheus has scraped the agent ``count`` times (since ``after``)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            samples = prometheus_query(port, 'up{job="edgeai-agent"}[1m]')
        except OSError:
            samples = []
        times = [float(at) for at, _ in samples[0]["values"]] if samples else []
        if sum(1 for at in times if at > after) >= count:
            return
        time.sleep(0.5)
    raise AssertionError("Prometheus did not scrape the agent")


def test_prometheus_scrapes_the_agent_as_shipped_and_the_dashboard_queries_answer(
    broker, make_agent, tmp_path
):
    agent = make_agent(broker, start=False)
    zone = agent.state_dir / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "temp").write_text("57500\n")
    agent.start()
    # The shipped configuration, pointed at this agent and scraping every second.
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str(DEPLOY / "prometheus" / "alerts.yml")]
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{agent.http_port}"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    prometheus = subprocess.Popen(
        [
            shutil.which("prometheus") or "/usr/bin/prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_scrapes(port, 3)
        client = broker.client()
        for _ in range(3):  # jobs while Prometheus watches: the latency histograms move
            assert generate(client, agent)["status"] == "ok"
        client.close()
        wait_scrapes(port, 3, after=time.time())
        # As the dashboard asks: its own expressions, its variables filled in.
        expressions = {
            # Grafana's label_values(metric, label) asks Prometheus for the metric's series.
            re.sub(r"^label_values\((.+), \w+\)$", r"\1", expression)
            .replace("$instance", ".*")
            .replace("$__rate_interval", "1m")
            for expression in all_expressions()
        }
        for expression in expressions:
            prometheus_query(port, expression)  # each one evaluates
        temperature = prometheus_query(port, 'edgeai_soc_temperature_celsius{instance=~".*"}')
        assert float(temperature[0]["value"][1]) == 57.5
        assert temperature[0]["metric"]["node"] == "pi5"  # the shipped label
        latency = prometheus_query(
            port,
            "histogram_quantile(0.95, sum by (le, instance) "
            '(rate(edgeai_job_seconds_bucket{instance=~".*"}[1m])))',
        )
        p95 = float(latency[0]["value"][1])
        print(f"p95 job latency from Prometheus: {p95:.3f} s; temperature 57.5 °C")
        assert 0 < p95 < 60
        assert float(prometheus_query(port, 'up{job="edgeai-agent"}')[0]["value"][1]) == 1
    finally:
        prometheus.terminate()
        prometheus.wait(10)
