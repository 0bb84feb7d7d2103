"""Nothing lost, nothing run twice: crashes of the agent and the broker, shutdown, bounds."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from collections import Counter

from tests.conftest import generate, start_broker

LONG = {"steps": 8, "width": 1024, "height": 1024}  # a few seconds with the tiny model


def results_by_id(client, base: str) -> Counter[str]:
    return Counter(
        m.topic.rsplit("/", 1)[1] for m in client.seen if m.topic.startswith(f"{base}/result/")
    )


def test_journal_is_sqlite_in_wal_mode(shared_agent, client):
    generate(client, shared_agent)
    with sqlite3.connect(shared_agent.state_dir / "journal.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        statuses = {row[0] for row in db.execute("SELECT status FROM jobs")}
    assert statuses <= {"delivered", "done"}


def test_kill_9_with_five_jobs_queued_then_restart_delivers_each_once(broker, make_agent):
    agent = make_agent(broker)
    client = broker.client(persistent=True)
    base = agent.base
    client.subscribe(f"{base}/result/+", f"{base}/jobs/+")
    client.publish(f"{base}/generate", json.dumps({"prompt": "blocker", "id": "blocker", **LONG}))
    client.wait_for(f"{base}/jobs/blocker", lambda m: m.json().get("step") == 1)
    ids = [f"queued-{n}" for n in range(5)]
    for job_id in ids:
        client.publish(f"{base}/generate", json.dumps({"prompt": "x", "id": job_id}))
    for job_id in ids:
        client.wait_for(f"{base}/jobs/{job_id}", lambda m: m.json()["event"] == "queued")
    agent.signal(signal.SIGKILL)
    agent.process.wait()
    assert results_by_id(client, base) == Counter()
    # Sent while the agent is down: the broker keeps it for the agent's persistent session.
    client.publish(f"{base}/generate", json.dumps({"prompt": "x", "id": "while-down"}))
    ids.append("while-down")
    agent.start()
    for job_id in ["blocker", *ids]:
        assert client.wait_for(f"{base}/result/{job_id}").json()["status"] == "ok"
    agent.stop()
    assert results_by_id(client, base) == Counter(dict.fromkeys(["blocker", *ids], 1))
    client.close()


def test_broker_killed_during_a_generation_result_arrives_after_restart(broker, make_agent):
    agent = make_agent(broker, EDGEAI_MQTT_RECONNECT_MAX_S="1")
    client = broker.client(persistent=True, client_id="durable-watcher")
    base = agent.base
    client.subscribe(f"{base}/result/+", f"{base}/jobs/+", f"{base}/availability")
    client.publish(
        f"{base}/generate", json.dumps({"prompt": "x", "id": "through-the-storm", **LONG})
    )
    client.wait_for(f"{base}/jobs/through-the-storm", lambda m: m.json().get("step") == 1)
    broker.kill()
    agent.wait_metric("edgeai_mqtt_connected 0.0")
    broker.start()
    result = client.wait_for(f"{base}/result/through-the-storm", timeout=90).json()
    assert result["status"] == "ok"
    fresh = broker.client()
    fresh.subscribe(f"{base}/availability")
    assert fresh.wait_for(f"{base}/availability", lambda m: m.retain).payload == b"online"
    fresh.close()
    agent.wait_metric("edgeai_mqtt_connected 1.0")
    assert results_by_id(client, base)["through-the-storm"] == 1
    client.close()


def test_sigterm_lets_the_running_job_finish(broker, make_agent):
    agent = make_agent(broker, EDGEAI_SHUTDOWN_GRACE_S="60")
    client = broker.client(persistent=True)
    base = agent.base
    client.subscribe(f"{base}/result/+", f"{base}/jobs/+", f"{base}/availability")
    client.publish(f"{base}/generate", json.dumps({"prompt": "x", "id": "finish-me", **LONG}))
    client.wait_for(f"{base}/jobs/finish-me", lambda m: m.json().get("step") == 1)
    assert agent.stop() == 0
    assert client.wait_for(f"{base}/result/finish-me").json()["status"] == "ok"
    assert client.wait_for(f"{base}/availability", lambda m: m.payload == b"offline")
    client.close()


def test_sigterm_past_the_grace_runs_the_job_after_the_restart(broker, make_agent):
    agent = make_agent(broker, EDGEAI_SHUTDOWN_GRACE_S="0.2")
    client = broker.client(persistent=True)
    base = agent.base
    client.subscribe(f"{base}/result/+", f"{base}/jobs/+")
    client.publish(f"{base}/generate", json.dumps({"prompt": "x", "id": "interrupted", **LONG}))
    client.wait_for(f"{base}/jobs/interrupted", lambda m: m.json().get("step") == 1)
    assert agent.stop() == 0
    assert results_by_id(client, base) == Counter()
    agent.start()
    assert client.wait_for(f"{base}/result/interrupted").json()["status"] == "ok"
    assert results_by_id(client, base) == Counter({"interrupted": 1})
    client.close()


def test_an_expired_request_is_not_run(broker, make_agent):
    agent = make_agent(broker)
    client = broker.client()
    base = agent.base
    client.subscribe(f"{base}/result/+", f"{base}/jobs/+")
    client.publish(f"{base}/generate", json.dumps({"prompt": "x", "id": "slow", **LONG}))
    client.wait_for(f"{base}/jobs/slow", lambda m: m.json().get("step") == 1)
    client.publish(f"{base}/generate", json.dumps({"prompt": "x", "id": "stale"}), expiry_s=1)
    result = client.wait_for(f"{base}/result/stale").json()
    assert result["error"]["code"] == "expired"
    assert not [m for m in client.messages(f"{base}/jobs/stale") if m.json()["event"] == "running"]
    client.close()


def test_a_result_over_the_brokers_packet_limit_carries_the_url(tmp_path, make_agent):
    small = start_broker(tmp_path / "small-broker", extra_config="max_packet_size 300000")
    try:
        agent = make_agent(small)
        client = small.client()
        result = generate(client, agent)  # a 512x512 PNG is about 800 kB in base64
        assert result["status"] == "ok"
        assert "b64" not in result["image"]
        assert result["image"]["url"].startswith(agent.url)
        assert "too large" in result["image"]["note"]
        status, _, body = agent.http_get(result["image"]["url"].removeprefix(agent.url))
        assert status == 200
        assert body.startswith(b"\x89PNG")
        client.close()
    finally:
        small.stop()


def test_a_result_over_the_setting_carries_the_url(broker, make_agent):
    agent = make_agent(broker, EDGEAI_MAX_MESSAGE_BYTES="100000")
    client = broker.client()
    result = generate(client, agent)
    assert "b64" not in result["image"]
    assert "url" in result["image"]
    client.close()


def start_hot(broker, make_agent, *topics: str, **env: str):
    """Start an agent on an 85 °C SoC (settings ``env`` besides); return it, its temperature
    file and a client that is subscribed to its state and to ``topics`` (under its base) and has
    seen it idle. Jobs wait in its queue until the file says it has cooled."""
    agent = make_agent(broker, start=False, EDGEAI_THERMAL_POLL_S="0.2", **env)
    zone = agent.state_dir / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    temperature = zone / "temp"
    temperature.write_text("85000\n")
    agent.start(wait=False)
    client = broker.client()
    client.subscribe(f"{agent.base}/state", *(f"{agent.base}/{topic}" for topic in topics))
    client.wait_for(f"{agent.base}/state", lambda m: m.json()["state"] == "idle")
    return agent, temperature, client


def test_thermal_guard_pauses_while_hot(broker, make_agent):
    agent, temperature, client = start_hot(broker, make_agent, "jobs/+", "result/+")
    base = agent.base
    client.publish(f"{base}/generate", json.dumps({"prompt": "x", "id": "hot"}))
    client.wait_for(f"{base}/state", lambda m: m.json()["state"] == "cooling")
    temperature.write_text("75000\n")  # below pause_c but above resume_c: still cooling
    assert client.wait_for(
        f"{base}/state",
        lambda m: m.json()["state"] == "cooling" and m.json()["temperature_c"] == 75.0,
        timeout=10,
    )
    assert not [m for m in client.messages(f"{base}/jobs/hot") if m.json()["event"] == "running"]
    temperature.write_text("65000\n")
    assert client.wait_for(f"{base}/result/hot").json()["status"] == "ok"
    client.wait_for(f"{base}/state", lambda m: m.json()["state"] == "idle")
    client.close()


def test_the_only_queued_job_cancelled_while_cooling_leaves_the_agent_running_the_next(
    broker, make_agent
):
    agent, temperature, client = start_hot(broker, make_agent, "result/+")
    base = agent.base
    client.publish(f"{base}/generate", json.dumps({"prompt": "x", "id": "given-up"}))
    client.wait_for(f"{base}/state", lambda m: m.json()["state"] == "cooling")
    # The runner took the job off its wait and is held by the guard; the queue empties under it.
    client.publish(f"{base}/cancel", json.dumps({"id": "given-up"}))
    assert client.wait_for(f"{base}/result/given-up").json()["error"]["code"] == "cancelled"
    temperature.write_text("65000\n")
    deadline = time.monotonic() + 30
    while "SoC cooled down" not in agent.log():  # the guard let go of a job no longer queued
        assert time.monotonic() < deadline, agent.log()
        time.sleep(0.1)
    client.publish(f"{base}/generate", json.dumps({"prompt": "x", "id": "next"}))
    assert client.wait_for(f"{base}/result/next").json()["status"] == "ok"
    assert agent.process.poll() is None
    client.close()


def test_a_reply_not_acknowledged_by_the_broker_is_published_at_start(broker, make_agent):
    agent = make_agent(broker)
    client = broker.client(persistent=True)
    base = agent.base
    client.subscribe(f"{base}/result/+")
    first = generate(client, agent, id="unconfirmed", seed=3)
    assert agent.stop() == 0
    # As if the agent had died after storing the reply but before the broker's PUBACK.
    with sqlite3.connect(agent.state_dir / "journal.sqlite3") as db:
        db.execute("UPDATE jobs SET status = 'done' WHERE id = 'unconfirmed'")
    seen_before = len(client.messages(f"{base}/result/unconfirmed"))
    agent.start()
    client.wait_for(
        f"{base}/result/unconfirmed", lambda m: len(client.messages(m.topic)) > seen_before
    )
    again = client.messages(f"{base}/result/unconfirmed")[-1]
    assert again.json() == first  # the stored reply, base64 read back from the image file
    with sqlite3.connect(agent.state_dir / "journal.sqlite3") as db:
        deadline = time.monotonic() + 10
        while (
            db.execute("SELECT status FROM jobs WHERE id = 'unconfirmed'").fetchone()[0]
            != "delivered"
        ):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    client.close()
