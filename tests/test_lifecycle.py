"""The agent's life: worker crashes, a model that will not load, shutdown, the last will, bounds."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import stat

import pytest

from tests.conftest import generate


def worker_pid(agent) -> int:
    _, _, body = agent.http_get("/healthz")
    pid = json.loads(body)["worker_pid"]
    assert isinstance(pid, int)
    return pid


def kill_worker_at_step(agent, client, job_id: str, run: int) -> int:
    """Kill the worker once the job's ``run``-th run reports its first step; return its pid."""

    def first_step_of_run(message):
        starts = [m for m in client.messages(message.topic) if m.json().get("step") == 1]
        return message.json().get("step") == 1 and len(starts) >= run

    client.wait_for(f"{agent.base}/jobs/{job_id}", first_step_of_run)
    pid = worker_pid(agent)
    os.kill(pid, signal.SIGKILL)
    return pid


def test_a_worker_killed_during_a_job_runs_it_again_then_fails_it(broker, make_agent):
    agent = make_agent(broker, EDGEAI_MAX_STEPS="50")
    client = broker.client()
    base = agent.base
    client.subscribe(f"{base}/jobs/+", f"{base}/result/+", f"{base}/state")
    # Killed once: the job runs again on the new worker and succeeds.
    client.publish(f"{base}/generate", json.dumps({"prompt": "x", "id": "survivor", "steps": 50}))
    first_pid = kill_worker_at_step(agent, client, "survivor", run=1)
    client.wait_for(f"{base}/state", lambda m: m.json()["state"] == "loading")
    assert client.wait_for(f"{base}/result/survivor").json()["status"] == "ok"
    assert worker_pid(agent) != first_pid
    queued = [
        m.json() for m in client.messages(f"{base}/jobs/survivor") if m.json()["event"] == "queued"
    ]
    assert len(queued) == 2
    # Killed twice: the job fails with a clear error and the agent goes on.
    client.publish(f"{base}/generate", json.dumps({"prompt": "x", "id": "doomed", "steps": 50}))
    kill_worker_at_step(agent, client, "doomed", run=1)
    kill_worker_at_step(agent, client, "doomed", run=2)
    result = client.wait_for(f"{base}/result/doomed").json()
    assert result["status"] == "error"
    assert result["error"]["code"] == "worker_crashed"
    assert "died" in result["error"]["message"]
    assert "2 times" in result["error"]["message"]
    assert generate(client, agent)["status"] == "ok"
    metrics = agent.metrics()
    assert "edgeai_worker_restarts_total 3.0" in metrics
    assert 'edgeai_jobs_total{status="failed"} 1.0' in metrics
    assert agent.process.poll() is None
    client.close()
    # The log says each restart and why, and how each job ended, one line each.
    log = agent.log()
    assert log.count("worker process died (exit code -9); restarting in") == 3
    assert "worker died during survivor (attempt 1); running it again" in log
    assert "job survivor done: from mqtt, 512x512, 50 steps" in log
    assert "job doomed failed: from mqtt, 512x512, 50 steps" in log


def test_an_exception_in_the_pipeline_fails_the_job_not_the_worker(
    broker, make_agent, tiny_model, tmp_path
):
    # A model that loads but breaks in torch at every call: its second tokenizer pads prompts to
    # 100 tokens while its text encoder has position embeddings for 77.
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    config_path = broken / "tokenizer_2" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["model_max_length"] = 100
    config_path.write_text(json.dumps(config))
    # No warm-up: it would meet the same error at load and report the model as unusable.
    agent = make_agent(broker, EDGEAI_MODEL=str(broken), EDGEAI_WARMUP="false")
    client = broker.client()
    pid = worker_pid(agent)
    for _ in range(2):
        failed = generate(client, agent)
        assert failed["status"] == "error"
        assert failed["error"]["code"] == "generation_failed"
        assert "Error" in failed["error"]["message"]
    assert worker_pid(agent) == pid
    metrics = agent.metrics()
    assert "edgeai_worker_restarts_total 0.0" in metrics
    assert 'edgeai_jobs_total{status="failed"} 2.0' in metrics
    client.close()


def test_a_model_that_cannot_load_is_reported(broker, make_agent, tmp_path):
    agent = make_agent(broker, start=False, EDGEAI_MODEL=str(tmp_path / "no-such-model"))
    agent.start(wait=False)
    state = agent.wait_state("error")
    assert "no-such-model" in state["error"]
    client = broker.client()
    result = generate(client, agent)
    assert result["error"]["code"] == "model_unavailable"
    status, _, _ = agent.http_get("/healthz")
    assert status == 503
    client.close()


@pytest.mark.parametrize(
    ("signum", "exit_code"),
    [
        pytest.param(signal.SIGTERM, 0, id="sigterm-agent-publishes-offline"),
        pytest.param(signal.SIGKILL, -signal.SIGKILL, id="kill-9-broker-sends-the-last-will"),
    ],
)
def test_availability_goes_offline_however_the_agent_stops(broker, make_agent, signum, exit_code):
    agent = make_agent(broker)
    client = broker.client()
    client.subscribe(f"{agent.base}/availability")
    client.wait_for(f"{agent.base}/availability", lambda m: m.payload == b"online")
    agent.signal(signum)
    assert agent.process.wait(60) == exit_code
    client.wait_for(f"{agent.base}/availability", lambda m: m.payload == b"offline", timeout=30)
    if signum == signal.SIGTERM:
        assert "Traceback" not in agent.log()
    client.close()


def test_a_full_queue_answers_busy(broker, make_agent):
    agent = make_agent(broker, EDGEAI_MAX_QUEUE="1", EDGEAI_MAX_STEPS="50")
    client = broker.client()
    base = agent.base
    client.subscribe(f"{base}/jobs/+", f"{base}/result/+")
    blocker = {"prompt": "x", "id": "first", "steps": 10, "width": 1024, "height": 1024}
    client.publish(f"{base}/generate", json.dumps(blocker))
    client.wait_for(f"{base}/jobs/first", lambda m: m.json().get("step") == 1)
    client.publish(f"{base}/generate", json.dumps({"prompt": "x", "id": "second"}))
    client.publish(f"{base}/generate", json.dumps({"prompt": "x", "id": "third"}))
    busy = client.wait_for(f"{base}/result/third").json()
    assert busy["error"]["code"] == "busy"
    assert "queue is full" in busy["error"]["message"]
    assert client.wait_for(f"{base}/result/first").json()["status"] == "ok"
    assert client.wait_for(f"{base}/result/second").json()["status"] == "ok"
    assert re.search(r'edgeai_requests_total\{mode="txt2img",outcome="busy"\} 1.0', agent.metrics())
    client.close()


def test_image_folder_keeps_to_its_limits(broker, make_agent):
    agent = make_agent(broker, EDGEAI_IMAGE_KEEP_COUNT="2")
    client = broker.client()
    urls = [generate(client, agent, output="url")["image"]["url"] for _ in range(3)]
    assert len(list((agent.state_dir / "images").iterdir())) == 2
    paths = [url.removeprefix(agent.url) for url in urls]
    assert [agent.http_get(path)[0] for path in paths] == [404, 200, 200]
    client.close()


def test_temperature_throttling_and_forced_float32(broker, make_agent, tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    vcgencmd = fake_bin / "vcgencmd"
    vcgencmd.write_text("#!/bin/sh\necho throttled=0x50005\n")
    vcgencmd.chmod(vcgencmd.stat().st_mode | stat.S_IEXEC)
    agent = make_agent(broker, start=False, EDGEAI_VCGENCMD=str(vcgencmd), EDGEAI_DTYPE="float32")
    zone = agent.state_dir / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "temp").write_text("61234\n")
    agent.start()
    metrics = agent.metrics()
    assert "edgeai_soc_temperature_celsius 61.234" in metrics
    assert 'edgeai_throttled{flag="under_voltage"} 1.0' in metrics
    assert 'edgeai_throttled{flag="throttled"} 1.0' in metrics
    assert 'edgeai_throttled{flag="arm_frequency_capped"} 0.0' in metrics
    assert 'edgeai_throttled_since_boot{flag="under_voltage"} 1.0' in metrics
    assert 'edgeai_throttled_since_boot{flag="throttled"} 1.0' in metrics
    assert 'dtype="float32"' in metrics  # the setting overrides the automatic choice
    state = agent.wait_state("idle")
    assert state["temperature_c"] == 61.234
    assert state["throttled"] is True
    client = broker.client()
    assert generate(client, agent)["status"] == "ok"
    client.close()


def test_a_part_that_dies_on_a_bug_stops_the_agent_for_a_restart(
    broker, tiny_model, tmp_path, monkeypatch, caplog
):
    """A dead runner would leave an agent that answers /healthz and runs nothing: it exits 1."""
    from agent.app import EXIT_PART_FAILED, Agent  # noqa: PLC0415 - the in-process agent
    from agent.jobs.runner import Runner  # noqa: PLC0415
    from agent.settings import load_settings  # noqa: PLC0415
    from tests.conftest import AgentProcess  # noqa: PLC0415

    process = AgentProcess(broker, tiny_model, tmp_path / "agent", {})
    broker.add_node(process.node_id)
    for name, value in process.env().items():
        monkeypatch.setenv(name, value)

    async def broken_run(self: Runner) -> None:
        await asyncio.sleep(0.5)
        raise RuntimeError("a bug in the runner")

    monkeypatch.setattr(Runner, "run", broken_run)
    settings = load_settings()
    exit_code = asyncio.run(asyncio.wait_for(Agent(settings).run(), 60))
    assert exit_code == EXIT_PART_FAILED != 0
    (record,) = [r for r in caplog.records if r.levelname == "CRITICAL"]
    assert "runner task ended" in record.getMessage()
    assert "a bug in the runner" in caplog.text


def test_a_port_already_taken_stops_the_start_with_one_line(broker, make_agent):
    """Another service on the agent's port is the operator's to change: exit 2 and a line that
    names the port, as for any setting, not a traceback."""
    agent = make_agent(broker, start=False)
    with socket.create_server(("127.0.0.1", agent.http_port)):
        agent.start(wait=False)
        assert agent.process.wait(60) == 2
    log = agent.log()
    assert (
        f"cannot start: cannot listen on 127.0.0.1:{agent.http_port}: Address already in use" in log
    )
    assert "Traceback" not in log
